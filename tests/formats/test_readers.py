"""Readers: what they find in good files, and one clear error for every bad input.

Every bad input the foundation issue lists gets, from ``bnfreeze inspect``: exit code 2,
nothing on stdout, exactly one line on stderr that starts with "error:" and says what the
file is, and no traceback. The library (``inspect_file``) raises ``ModelFormatError`` for the
same inputs.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from paths import SAMPLES

from bnfreeze.cli import cli
from bnfreeze.errors import EXIT_USAGE, ModelFormatError
from bnfreeze.formats.readers import read_model
from bnfreeze.model.records import ModelFormat
from bnfreeze.ops.inspect import inspect_file
from bnfreeze.render.json import report_dict

# --- good files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt", "compiled", "optimizer_variables"),
    [
        ("seed_bn.keras", ModelFormat.KERAS, False, None),
        ("sequential.keras", ModelFormat.KERAS, False, None),
        ("bn_under_frozen.keras", ModelFormat.KERAS, False, None),
        # Adam on the head's kernel and bias: iteration, learning rate, 2 x (m, v).
        ("guide_pattern.keras", ModelFormat.KERAS, True, 6),
        # Adam on 10 trainable variables (3 BN x gamma/beta, d1 and head kernel/bias):
        # iteration, learning rate, 2 x 10 slots.
        ("nested_legacy.h5", ModelFormat.H5, True, 22),
    ],
)
def test_reads_samples(name, fmt, compiled, optimizer_variables):
    model = read_model(SAMPLES / name)
    assert model.format is fmt
    assert model.keras_version == "3.15.1"
    assert model.compiled is compiled
    assert (model.compile_config is not None) is compiled
    assert model.optimizer_variables == optimizer_variables
    assert model.weights is not None and model.weights.variables
    assert isinstance(model.config["config"]["layers"], list)


def test_weights_false_skips_the_weights_file():
    model = read_model(SAMPLES / "guide_pattern.keras", weights=False)
    assert model.weights is None
    assert model.config == read_model(SAMPLES / "guide_pattern.keras").config


def test_bn_weights_are_indexed_by_layer_path():
    keras_file = read_model(SAMPLES / "bn_under_frozen.keras").weights.variables
    assert len(keras_file["backbone/inner_bn"]) == 4  # gamma, beta, moving mean, variance
    assert keras_file["features"] == ()
    h5 = read_model(SAMPLES / "nested_legacy.h5").weights.variables
    assert [d.rsplit("/", 1)[-1] for d in h5["bn_bn/bn1"]] == [
        "gamma",
        "beta",
        "moving_mean",
        "moving_variance",
    ]


def _unzip(src: Path, dst: Path) -> Path:
    with zipfile.ZipFile(src) as archive:
        archive.extractall(dst)
    return dst


def _same_report(a: Path, b: Path, *, folder: bool = False) -> None:
    doc_a, doc_b = report_dict(inspect_file(a)), report_dict(inspect_file(b))
    doc_a["model"].pop("path")
    doc_b["model"].pop("path")
    if folder:
        # Only the advice differs: freeze remaps a .keras file's optimizer state, and drops a
        # folder's (it writes a new .keras archive from the folder).
        for doc, says in ((doc_a, "remaps them"), (doc_b, "drops them")):
            for w in doc["warnings"]:
                if w["code"] == "optimizer-state":
                    assert says in w["message"]
                    w["message"] = None
    assert doc_a == doc_b


@pytest.mark.parametrize("name", ["guide_pattern.keras", "bn_under_frozen.keras"])
def test_unzipped_keras_folder_reads_like_the_archive(tmp_path, name):
    folder = _unzip(SAMPLES / name, tmp_path / "model")
    model = read_model(folder)
    assert model.format is ModelFormat.KERAS_DIR
    assert model.format.json_name == "keras"
    _same_report(SAMPLES / name, folder, folder=True)


def test_deflated_archive_reads_like_the_stored_one(tmp_path):
    """Keras stores members uncompressed; a user who re-zips a folder usually deflates."""
    src = SAMPLES / "guide_pattern.keras"
    deflated = tmp_path / "deflated.keras"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    _same_report(src, deflated)


@pytest.mark.keras
def test_keras_itself_loads_an_unzipped_folder(tmp_path):
    """Folder support exists because Keras 3.15's load_model accepts one."""
    import keras

    folder = _unzip(SAMPLES / "bn_under_frozen.keras", tmp_path / "model")
    model = keras.models.load_model(folder)
    assert model.get_layer("backbone").get_layer("inner_bn").trainable is True


# --- bad inputs -----------------------------------------------------------------------------


def _seed_bytes() -> bytes:
    return (SAMPLES / "seed_bn.keras").read_bytes()


def _member_start(data: bytes, member: str) -> tuple[int, int]:
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(member)
    return info.header_offset + 30 + len(info.filename.encode()) + len(info.extra), info.file_size


def _zip(path: Path, members: dict[str, str | bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def make_missing(tmp: Path) -> Path:
    return tmp / "missing.keras"


def make_directory(tmp: Path) -> Path:
    (tmp / "folder").mkdir()
    return tmp / "folder"


def make_empty(tmp: Path) -> Path:
    (tmp / "empty.keras").write_bytes(b"")
    return tmp / "empty.keras"


def make_non_model_zip(tmp: Path) -> Path:
    return _zip(tmp / "photos.zip", {"readme.txt": "hello"})


def make_zipped_saved_model(tmp: Path) -> Path:
    return _zip(tmp / "exported.zip", {"exported/saved_model.pb": b"\x08\x01"})


def make_non_model_h5(tmp: Path) -> Path:
    import h5py

    with h5py.File(tmp / "data.h5", "w") as h5:
        h5["x"] = [1.0, 2.0]
    return tmp / "data.h5"


def make_tf_keras_weights_h5(tmp: Path) -> Path:
    """The layout of tf_keras's save_weights: a layer_names attribute, no model_config."""
    import h5py

    with h5py.File(tmp / "old.weights.h5", "w") as h5:
        h5.attrs["layer_names"] = [b"dense"]
        group = h5.create_group("dense")
        group.attrs["weight_names"] = [b"dense/kernel:0"]
        group["dense/kernel:0"] = [[0.0]]
    return tmp / "old.weights.h5"


def make_truncated_keras(tmp: Path) -> Path:
    data = _seed_bytes()
    (tmp / "truncated.keras").write_bytes(data[: len(data) // 2])
    return tmp / "truncated.keras"


def make_truncated_h5(tmp: Path) -> Path:
    data = (SAMPLES / "nested_legacy.h5").read_bytes()
    (tmp / "truncated.h5").write_bytes(data[: len(data) // 2])
    return tmp / "truncated.h5"


def make_random_bytes(tmp: Path) -> Path:
    import random

    (tmp / "noise.keras").write_bytes(random.Random(0).randbytes(4096))
    return tmp / "noise.keras"


def make_corrupt_config(tmp: Path) -> Path:
    """One flipped byte inside config.json: the zip's CRC no longer matches."""
    data = bytearray(_seed_bytes())
    start, _ = _member_start(bytes(data), "config.json")
    data[start + 10] ^= 0xFF
    (tmp / "flipped.keras").write_bytes(bytes(data))
    return tmp / "flipped.keras"


def make_corrupt_weights(tmp: Path) -> Path:
    """model.weights.h5 zeroed: its HDF5 signature is gone."""
    data = bytearray(_seed_bytes())
    start, size = _member_start(bytes(data), "model.weights.h5")
    data[start : start + size] = bytes(size)
    (tmp / "zeroed.keras").write_bytes(bytes(data))
    return tmp / "zeroed.keras"


def make_weights_past_the_end(tmp: Path) -> Path:
    """The central directory claims model.weights.h5 runs on past the archive's last byte (as
    when a copy of the archive was cut and its directory patched back on): the member's
    own bytes are all there, so only the claimed size betrays it."""
    data = bytearray(_seed_bytes())
    start, size = _member_start(bytes(data), "model.weights.h5")
    entry = data.index(b"PK\x01\x02")  # the central directory's first entry
    name = b"model.weights.h5"
    while data[entry + 46 : entry + 46 + len(name)] != name:
        entry = data.index(b"PK\x01\x02", entry + 4)
    claimed = len(data) - start + 1
    struct.pack_into("<II", data, entry + 20, claimed, claimed)
    assert start + size < len(data) < start + claimed
    (tmp / "past_the_end.keras").write_bytes(bytes(data))
    return tmp / "past_the_end.keras"


def make_invalid_json(tmp: Path) -> Path:
    return _zip(tmp / "badjson.keras", {"config.json": "{not json", "metadata.json": "{}"})


def make_wrong_shape_json(tmp: Path) -> Path:
    return _zip(tmp / "list.keras", {"config.json": "[1, 2]"})


def make_string_trainable(tmp: Path) -> Path:
    config = {
        "class_name": "Functional",
        "config": {
            "name": "m",
            "layers": [{"class_name": "Dense", "config": {"name": "d", "trainable": "no"}}],
        },
    }
    return _zip(tmp / "string_flag.keras", {"config.json": json.dumps(config)})


def make_empty_folder_with_weights_only(tmp: Path) -> Path:
    folder = tmp / "half"
    folder.mkdir()
    (folder / "model.weights.h5").write_bytes(b"")
    return folder


#: (id, factory, words the one-line error must contain to say what the file is)
BAD_INPUTS: list[tuple[str, Callable[[Path], Path], str]] = [
    ("missing", make_missing, "no such file"),
    ("directory", make_directory, "a directory, not a model"),
    ("folder-without-config", make_empty_folder_with_weights_only, "a directory, not a model"),
    ("empty", make_empty, "the file is empty"),
    ("non-model-zip", make_non_model_zip, "a zip archive without config.json"),
    ("zipped-saved-model", make_zipped_saved_model, "a zipped TensorFlow SavedModel"),
    ("non-model-h5", make_non_model_h5, "an HDF5 file without a Keras model_config"),
    ("tf-keras-weights-h5", make_tf_keras_weights_h5, "a weights-only file"),
    ("truncated-keras", make_truncated_keras, "a damaged or truncated zip archive"),
    ("truncated-h5", make_truncated_h5, "a damaged or truncated HDF5 file"),
    ("random-bytes", make_random_bytes, "not a Keras model file"),
    ("corrupt-config", make_corrupt_config, "config.json is damaged"),
    ("corrupt-weights", make_corrupt_weights, "model.weights.h5 is not a readable HDF5 file"),
    (
        "weights-past-the-end",
        make_weights_past_the_end,
        "model.weights.h5 is damaged (it extends past the end of the archive)",
    ),
    ("invalid-json", make_invalid_json, "config.json is not valid JSON"),
    ("wrong-shape-json", make_wrong_shape_json, "does not describe a Keras model"),
    ("string-trainable", make_string_trainable, "trainable='no'; it must be true or false"),
]


BAD_IDS = [b[0] for b in BAD_INPUTS]


def assert_one_line_error(path: Path, words: str) -> str:
    result = CliRunner().invoke(cli, ["inspect", str(path)], catch_exceptions=False)
    assert result.exit_code == EXIT_USAGE, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith(f"error: {path}: "), line
    assert words in line
    assert "Traceback" not in result.output
    return line


@pytest.mark.parametrize(("factory", "words"), [b[1:] for b in BAD_INPUTS], ids=BAD_IDS)
def test_bad_input_one_line_error_exit_2(tmp_path, factory, words):
    path = factory(tmp_path)
    assert_one_line_error(path, words)
    with pytest.raises(ModelFormatError, match=re.escape(words)):
        inspect_file(path)


@pytest.mark.parametrize(("factory", "words"), [b[1:] for b in BAD_INPUTS], ids=BAD_IDS)
def test_bad_input_json_mode_too(tmp_path, factory, words):
    """--json changes nothing for a bad input: no half document on stdout."""
    path = factory(tmp_path)
    result = CliRunner().invoke(cli, ["inspect", "--json", str(path)], catch_exceptions=False)
    assert (result.exit_code, result.stdout) == (EXIT_USAGE, "")
    assert result.stderr.startswith("error: ") and words in result.stderr


@pytest.fixture(scope="module")
def keras_made_bad_inputs(tmp_path_factory) -> dict[str, Path]:
    """Files Keras itself writes that are not models bnfreeze (or Keras) can load as one."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")], name="tiny")
    out = tmp_path_factory.mktemp("keras_made")
    model.save_weights(out / "tiny.weights.h5")
    model.export(out / "saved_model", verbose=False)
    return {"weights": out / "tiny.weights.h5", "saved_model": out / "saved_model"}


@pytest.mark.keras
def test_keras3_weights_only_file(keras_made_bad_inputs):
    line = assert_one_line_error(keras_made_bad_inputs["weights"], "a weights-only file")
    assert "model.save('x.keras')" in line


@pytest.mark.keras
def test_saved_model_folder(keras_made_bad_inputs):
    line = assert_one_line_error(
        keras_made_bad_inputs["saved_model"], "a TensorFlow SavedModel folder"
    )
    assert "TFSMLayer" in line


@pytest.mark.keras
def test_saved_model_folder_is_not_loadable_by_keras_either(keras_made_bad_inputs):
    import keras

    with pytest.raises(ValueError, match="File format not supported"):
        keras.models.load_model(keras_made_bad_inputs["saved_model"])


def test_a_copy_of_a_bad_file_under_another_suffix_says_the_same(tmp_path):
    """The error comes from the bytes, not the file name."""
    src = make_non_model_h5(tmp_path)
    renamed = tmp_path / "model.keras"
    shutil.copy(src, renamed)
    assert_one_line_error(renamed, "an HDF5 file without a Keras model_config")


@pytest.mark.parametrize("kind", ["keras", "h5", "keras-dir"])
def test_with_weights_completes_a_model_read_without_them(kind, tmp_path):
    """freeze reads a model with weights=False and indexes its weights later
    (readers.with_weights): the result must be what read_model gives at once."""
    from bnfreeze.formats.readers import read_model, with_weights

    path = {
        "keras": SAMPLES / "guide_pattern.keras",
        "h5": SAMPLES / "nested_legacy.h5",
        "keras-dir": tmp_path / "guide",
    }[kind]
    if kind == "keras-dir":
        zipfile.ZipFile(SAMPLES / "guide_pattern.keras").extractall(path)
    light = read_model(path, weights=False)
    assert light.weights is None
    full = with_weights(light)
    assert full == read_model(path)
    assert full.weights is not None and full.weights.variables == read_model(path).weights.variables
