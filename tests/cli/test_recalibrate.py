"""``bnfreeze recalibrate`` on a saved ``.keras`` file (TensorFlow, in process).

The output must hold the statistics the in-memory API computes on the same data, every other
variable bit-identical, and every byte outside the rewritten statistics datasets identical to
the input; bad input is one line and exit 2; an interruption leaves nothing written.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bnfreeze.cli import cli

pytestmark = pytest.mark.keras


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> Path:
    import keras

    keras.utils.set_random_seed(7)
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv1")(inp)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(5, 3, padding="same", name="conv2")(h)
    h = keras.layers.BatchNormalization(name="bn2")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    out = keras.layers.Dense(2, name="head")(h)
    model = keras.Model(inp, out)
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(8, 8, 8, 3)), rng.normal(size=(8, 2)), verbose=0)
    folder = tmp_path_factory.mktemp("recalibrate")
    path = folder / "cnn.keras"
    model.save(path)
    np.save(folder / "x.npy", rng.normal(2.0, 3.0, (30, 8, 8, 3)).astype("float32"))
    np.savez(folder / "two.npz", x=np.zeros((4, 8, 8, 3), "float32"), y=np.zeros((4, 2)))
    return path


def run(*args: object) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _values(path: Path) -> dict[str, np.ndarray]:
    import keras

    model = keras.models.load_model(path, compile=False)
    return {v.path: np.array(v.numpy()) for v in model.weights}


def test_output_equals_the_api_and_only_the_statistics_change(cnn, tmp_path):
    import keras

    import bnfreeze

    out = tmp_path / "out.keras"
    result = run("recalibrate", cnn, "--data", cnn.parent / "x.npy", "--batch-size", "8", "-o", out)
    assert result.exit_code == 0, result.output
    assert "2 BN layer(s) recalibrated from 4 batch(es), 30 sample(s)" in result.stdout
    assert "4 statistics datasets rewritten" in result.stderr

    reference = keras.models.load_model(cnn, compile=False)
    bnfreeze.recalibrate(reference, np.load(cnn.parent / "x.npy"), batch_size=8)
    expected = {v.path: np.array(v.numpy()) for v in reference.weights}
    before, after = _values(cnn), _values(out)
    stats = {f"{n}/{s}" for n in ("bn1", "bn2") for s in ("moving_mean", "moving_variance")}
    for name, value in after.items():
        if name in stats:
            assert not np.array_equal(value, before[name]), name
            np.testing.assert_allclose(value, expected[name], rtol=1e-6, atol=1e-6)
        else:
            assert value.tobytes() == before[name].tobytes(), name

    # every byte outside the rewritten datasets (and the weights member's CRC) is the input's
    a, b = cnn.read_bytes(), out.read_bytes()
    assert len(a) == len(b)
    with zipfile.ZipFile(cnn) as za, zipfile.ZipFile(out) as zb:
        for info in za.infolist():
            assert zb.read(info.filename) == za.read(info.filename) or (
                info.filename == "model.weights.h5"
            )
        wa, wb = za.read("model.weights.h5"), zb.read("model.weights.h5")
    import io

    import h5py

    with h5py.File(io.BytesIO(wa)) as h5:
        ranges = [
            (h5[f"layers/{g}/vars/{i}"].id.get_offset(), h5[f"layers/{g}/vars/{i}"].nbytes)
            for g in ("batch_normalization", "batch_normalization_1")
            for i in (2, 3)
        ]
    differ = [i for i, (x, y) in enumerate(zip(wa, wb, strict=True)) if x != y]
    assert differ
    assert all(any(o <= i < o + n for o, n in ranges) for i in differ)


def test_selection_leaves_other_layers_bit_identical(cnn, tmp_path):
    out = tmp_path / "out.keras"
    result = run("recalibrate", cnn, "--data", cnn.parent / "x.npy", "--layers", "bn2", "-o", out)
    assert result.exit_code == 0, result.output
    before, after = _values(cnn), _values(out)
    changed = sorted(n for n in before if before[n].tobytes() != after[n].tobytes())
    assert changed == ["bn2/moving_mean", "bn2/moving_variance"]


def test_json(cnn):
    import json

    from json_schemas import validate

    result = run(
        "recalibrate",
        cnn,
        "--data",
        cnn.parent / "x.npy",
        "--batch-size",
        "8",
        "--batches",
        "2",
        "--dry-run",
        "--json",
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    validate("recalibrate", doc)
    assert (doc["batches"], doc["samples"], doc["output"], doc["dry_run"]) == (2, 16, None, True)
    assert [layer["path"] for layer in doc["layers"]] == ["bn1", "bn2"]
    assert doc["runtime"]["measured"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--data", "missing.npy"), "error: --data missing.npy: no such file or folder.\n"),
        (
            ("--data", "{folder}/two.npz"),
            "error: --data {folder}/two.npz holds 2 arrays (x, y); name the inputs with --key.\n",
        ),
        (
            ("--data", "{folder}/two.npz", "--key", "z"),
            "error: --key 'z': {folder}/two.npz holds no such array (it holds x, y).\n",
        ),
        (
            ("--data", "{folder}/x.npy", "--layers", "conv*"),
            "error: the selection matches no BatchNormalization layer to recalibrate.\n",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cnn, tmp_path, args, message):
    out = tmp_path / "out.keras"
    folder = str(cnn.parent)
    result = run("recalibrate", cnn, *(a.format(folder=folder) for a in args), "-q", "-o", out)
    assert result.exit_code == 2
    assert result.stderr == message.format(folder=folder)
    assert not out.exists()


def test_interrupted_writes_nothing(cnn, tmp_path, monkeypatch):
    from bnfreeze.formats.writers import keras_zip

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "out.keras"
    monkeypatch.setattr(keras_zip, "copy_patched", interrupted)
    result = run("recalibrate", cnn, "--data", cnn.parent / "x.npy", "-q", "-o", out)
    assert result.exit_code == 130
    assert result.stderr == "interrupted; nothing was written.\n"
    assert list(tmp_path.iterdir()) == []
