"""The `.keras` writer: only config.json changes, every other member is copied as stored;
optimizer state is dropped dataset-exactly; and the result is what the Keras API would save.
"""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import bnfreeze
from bnfreeze.errors import OutputError
from bnfreeze.formats.readers import read_model
from bnfreeze.formats.readers._keras_common import Member, MemberFile
from bnfreeze.formats.writers import WriteRequest
from bnfreeze.formats.writers.dispatch import writer_for
from bnfreeze.formats.writers.keras_zip import WRITER, data_offset, serialize_config
from bnfreeze.model.assignments import Assignment, apply_to_config, assign, current_flags
from bnfreeze.model.selection import select
from bnfreeze.model.walk import walk
from bnfreeze.ops.request import EditRequest, LayerSelection, Output
from bnfreeze.runtime.routes import edit

KERAS_SAMPLES = [
    "seed_bn.keras",
    "guide_pattern.keras",
    "bn_under_frozen.keras",
    "sequential.keras",
]


def raw_member(path: Path, name: str) -> bytes:
    """A member's bytes exactly as stored in the archive (compressed, if it is)."""
    with zipfile.ZipFile(path) as archive, open(path, "rb") as fh:
        info = archive.getinfo(name)
        fh.seek(data_offset(fh, info))
        return fh.read(info.compress_size)


def h5_datasets(path: Path) -> dict[str, tuple[bytes, str, tuple[int, ...], dict[str, Any]]]:
    """Every dataset of a .keras file's weights, by HDF5 path: raw bytes, dtype, shape, attrs."""
    import io

    import h5py

    with zipfile.ZipFile(path) as archive:
        data = archive.read("model.weights.h5")
    out: dict[str, Any] = {}
    with h5py.File(io.BytesIO(data), "r") as h5:

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                value = obj[()]
                raw = value.tobytes() if hasattr(value, "tobytes") else bytes(value)
                out[name] = (raw, str(obj.dtype), obj.shape, dict(obj.attrs))

        h5.visititems(visit)
    return out


def edited_request(path: Path, assignment: Assignment, **kw: Any) -> WriteRequest:
    model = read_model(path)
    layers = walk(model.config).layers
    flags = assign(layers, current_flags(layers), select(layers), assignment)
    return WriteRequest(model, apply_to_config(model.config, layers, flags), layers, flags, **kw)


def test_dispatch_by_format():
    from bnfreeze.model.records import ModelFormat

    assert writer_for(ModelFormat.KERAS) is WRITER
    assert writer_for(ModelFormat.MEMORY) is None


def test_serialize_config_is_keras_json_dumps():
    expected = b'{"a": [1, 0.5, null], "\\u00e9": true}'
    assert serialize_config({"a": [1, 0.5, None], "é": True}) == expected


@pytest.mark.parametrize("name", KERAS_SAMPLES)
def test_no_change_is_byte_identical(samples, tmp_path, name):
    out = tmp_path / name
    # Give the first BN layer the flag it already has.
    bn = next(r for r in walk(read_model(samples / name).config).layers if r.is_batchnorm)
    assignment = Assignment(others=None, batchnorm=bn.trainable)
    result = edit(
        EditRequest(str(samples / name), assignment, LayerSelection((bn.path,)), Output(str(out)))
    )
    assert result.changes == () and result.selected == (bn.path,)
    assert out.read_bytes() == (samples / name).read_bytes()


@pytest.mark.parametrize("name", KERAS_SAMPLES)
def test_only_config_json_changes(samples, tmp_path, name):
    src, out = samples / name, tmp_path / name
    result = bnfreeze.unfreeze(src, output=out, keep_bn_inference=True, optimizer_state="keep")
    assert result.changes, "the recipe must change something on every sample"
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(out) as b:
        before, after = a.infolist(), b.infolist()
        assert [i.filename for i in before] == [i.filename for i in after]
        for x, y in zip(before, after, strict=True):
            assert (x.date_time, x.compress_type, x.external_attr, x.create_system) == (
                y.date_time,
                y.compress_type,
                y.external_attr,
                y.create_system,
            )
            if x.filename == "config.json":
                config = json.loads(b.read(y))
                assert b.read(y) == json.dumps(config).encode()  # Keras's own serialization
                continue
            assert (x.CRC, x.file_size, x.compress_size) == (y.CRC, y.file_size, y.compress_size)
            assert raw_member(src, x.filename) == raw_member(out, y.filename)
    flags = {r.path: r.trainable for r in walk(read_model(out).config).layers}
    assert all(flags[c.path] is c.after for c in result.changes)


def test_compressed_members_and_assets_are_copied_as_stored(samples, tmp_path):
    """Not what Keras writes, but a valid archive: deflated members, an assets folder."""
    src = tmp_path / "odd.keras"
    with zipfile.ZipFile(samples / "sequential.keras") as zin, zipfile.ZipFile(src, "w") as zout:
        for info in zin.infolist():
            stored = info.filename == "model.weights.h5"
            kind = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
            zout.writestr(
                zipfile.ZipInfo(info.filename, (2020, 5, 17, 10, 0, 0)),
                zin.read(info),
                compress_type=kind,
                compresslevel=1,
            )
        zout.writestr("assets/vocab.txt", "a\nb\n" * 500, compress_type=zipfile.ZIP_DEFLATED)
        zout.comment = b"an archive comment"
    out = tmp_path / "out.keras"
    result = bnfreeze.freeze(src, output=out)
    assert result.changes
    for name in ("metadata.json", "assets/vocab.txt", "model.weights.h5"):
        assert raw_member(src, name) == raw_member(out, name)
    with zipfile.ZipFile(out) as archive:
        assert archive.testzip() is None
        assert archive.comment == b"an archive comment"
        assert archive.getinfo("config.json").compress_type == zipfile.ZIP_DEFLATED
        assert [i.filename for i in archive.infolist()][-1] == "assets/vocab.txt"


def test_drop_optimizer_keeps_every_other_dataset_bit_identical(samples, tmp_path):
    src, out = samples / "guide_pattern.keras", tmp_path / "out.keras"
    result = bnfreeze.unfreeze(src, output=out, keep_bn_inference=True, optimizer_state="drop")
    assert result.optimizer_variables == 6 and result.optimizer_variables_dropped == 6
    before, after = h5_datasets(src), h5_datasets(out)
    dropped = {k for k in before if k.startswith("optimizer/")}
    assert len(dropped) == 6
    assert after == {k: v for k, v in before.items() if k not in dropped}
    # The nested model's own optimizer group is never loaded by Keras: kept as it was.
    assert any(k.startswith("layers/functional/optimizer/") for k in after)
    assert read_model(out).optimizer_variables is None
    config_delta = len(serialize_config(read_model(out).config)) - len(
        serialize_config(read_model(src).config)
    )
    # The dropped slots' bytes stay in the file, unreferenced; only the new, empty
    # optimizer/vars group's structures are appended.
    assert out.stat().st_size <= src.stat().st_size + max(config_delta, 0) + 4096
    assert result.output_bytes == out.stat().st_size
    # Metadata is still copied as stored.
    assert raw_member(src, "metadata.json") == raw_member(out, "metadata.json")


def test_keep_optimizer_state_copies_the_weights_as_stored(samples, tmp_path):
    src, out = samples / "guide_pattern.keras", tmp_path / "out.keras"
    result = bnfreeze.unfreeze(src, output=out, keep_bn_inference=True, optimizer_state="keep")
    assert result.optimizer_variables_dropped == 0
    assert raw_member(src, "model.weights.h5") == raw_member(out, "model.weights.h5")


def test_verify_refuses_a_file_with_other_flags(samples, tmp_path):
    src = samples / "sequential.keras"
    request = edited_request(src, Assignment.freeze())
    written = tmp_path / "w.keras"
    WRITER.write(request, written)
    WRITER.verify(request, written)  # what was asked
    wrong = WriteRequest(
        request.model, request.config, request.layers, {**request.flags, "dense_1": True}
    )
    with pytest.raises(OutputError, match="does not read back with the intended flags"):
        WRITER.verify(wrong, written)


def test_verify_refuses_a_changed_member(samples, tmp_path):
    src = samples / "sequential.keras"
    request = edited_request(src, Assignment.freeze())
    written = tmp_path / "w.keras"
    WRITER.write(request, written)
    tampered = tmp_path / "t.keras"
    with zipfile.ZipFile(written) as zin, zipfile.ZipFile(tampered, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, data + b" " if info.filename == "metadata.json" else data)
    with pytest.raises(OutputError, match=r"member metadata\.json was not copied exactly"):
        WRITER.verify(request, tampered)


def test_verify_refuses_changed_weights_when_dropping(samples, tmp_path):
    import io

    import h5py
    import numpy as np

    src = samples / "guide_pattern.keras"
    request = edited_request(src, Assignment.unfreeze(), drop_optimizer_state=True)
    written = tmp_path / "w.keras"
    assert WRITER.write(request, written).optimizer_variables_dropped == 6
    WRITER.verify(request, written)
    with zipfile.ZipFile(written) as zin:
        weights = io.BytesIO(zin.read("model.weights.h5"))
    with h5py.File(weights, "r+") as h5:
        name = "layers/dense/vars/0"
        h5[name][...] = np.asarray(h5[name][()]) + 1
    tampered = tmp_path / "t.keras"
    with zipfile.ZipFile(written) as zin, zipfile.ZipFile(tampered, "w") as zout:
        for info in zin.infolist():
            data = weights.getvalue() if info.filename == "model.weights.h5" else zin.read(info)
            zout.writestr(info, data)
    # The weights member's CRC-32 is planned from the input's and the patches, so any other
    # byte fails the check (the h5py route, for files the patching path does not handle,
    # names the dataset that differs).
    with pytest.raises(
        OutputError,
        match=r"model\.weights\.h5 was not written as planned|weights dataset "
        r"/layers/dense/vars/0 differs",
    ):
        WRITER.verify(request, tampered)


def test_member_file_reads_a_slice(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)))
    with open(path, "rb") as fh:
        window = MemberFile(fh.fileno(), Member(str(path), 10, 20))
        assert window.read(5) == bytes(range(10, 15))
        window.seek(-3, 2)
        assert window.read() == bytes(range(27, 30))
        window.seek(100)
        assert window.read(4) == b""


# --- Keras: the measured truth -------------------------------------------------------------


def _load(path: Path) -> Any:
    """Load with a fixed global seed: Dropout layers (EfficientNet's stochastic depth) draw
    their seed generators' state when they are built."""
    import keras

    keras.utils.set_random_seed(7)
    return keras.models.load_model(path)


def _flags(model: Any) -> dict[str, bool]:
    from keras_truth import layer_paths

    # Operations recorded as layers (MobileNetV3's ops.numpy.Add) have no flag at all.
    return {path: getattr(layer, "trainable", None) for path, layer in layer_paths(model).items()}


def _weights(model: Any) -> dict[str, bytes]:
    values = {v.path: v.numpy().tobytes() for v in model.weights}
    assert len(values) == len(model.weights), "variable paths must be unique"
    return values


def _one_step(model: Any) -> dict[str, bytes]:
    """One fit() step with a fresh SGD on fixed data; every variable afterwards, by path."""
    import keras
    from keras_truth import synthetic_batch

    x, y = synthetic_batch(model, batch_size=4, seed=0)
    keras.utils.set_random_seed(7)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01), loss="mse", run_eagerly=True)
    model.fit(x, y, batch_size=4, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False)
    return _weights(model)


def _every_layer(model: Any) -> Iterator[Any]:
    """``model.layers``, and each nested model's right after it, recursively: the loop a Keras
    user writes (a container comes before the layers below it)."""
    import keras

    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _every_layer(layer)


# Each recipe as a Keras user writes it on the loaded model, independently of bnfreeze: the
# README's words for the option, as a loop. Setting a container's flag sets it on everything
# below it; the layers below are visited after it and set their own.


def _keras_bn_inference(model: Any) -> None:
    import keras

    for layer in _every_layer(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def _keras_train_bn(model: Any) -> None:
    import keras

    for layer in _every_layer(model):
        layer.trainable = isinstance(layer, keras.layers.BatchNormalization)


def _keras_keep_bn_inference(model: Any) -> None:
    import keras

    for layer in _every_layer(model):
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)


def _keras_freeze_up_to(name: str) -> Callable[[Any], None]:
    def freeze(model: Any) -> None:
        for layer in _every_layer(model):
            layer.trainable = False
            if layer.name == name:
                break

    return freeze


RECIPES: dict[str, tuple[Callable[[Path, Path], Any], Callable[[Any], None]]] = {
    "bn-inference": (
        lambda src, out: bnfreeze.freeze(src, output=out, bn_inference=True),
        _keras_bn_inference,
    ),
    "train-bn": (lambda src, out: bnfreeze.freeze(src, output=out, train_bn=True), _keras_train_bn),
    "keep-bn-inference": (
        lambda src, out: bnfreeze.unfreeze(src, output=out, keep_bn_inference=True),
        _keras_keep_bn_inference,
    ),
}


def _equivalence(src: Path, tmp_path: Path, recipe: str | tuple) -> None:
    """bnfreeze's recipe on the file, against the same recipe written as a Keras loop over the
    loaded model and saved: the loaded flags, every weight bit for bit, one training step."""
    import warnings

    ours, theirs = tmp_path / "bnfreeze.keras", tmp_path / "keras_api.keras"
    edit, keras_loop = RECIPES[recipe] if isinstance(recipe, str) else recipe
    result = edit(src, ours)
    assert result.changes
    model = _load(src)
    compile_config = model.get_compile_config()
    keras_loop(model)
    if compile_config:  # after a flag change, compile() again with a new optimizer (trap 3)
        model.compile_from_config(compile_config)
    model.save(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the optimizer-skipping message, measured elsewhere
        a, b = _load(ours), _load(theirs)
    assert _flags(a) == _flags(b)
    assert _weights(a) == _weights(b)
    assert _one_step(a) == _one_step(b)


@pytest.mark.keras
@pytest.mark.parametrize(
    ("name", "recipe"),
    [
        ("seed_bn.keras", "bn-inference"),
        ("guide_pattern.keras", "keep-bn-inference"),
        ("bn_under_frozen.keras", "train-bn"),
        ("sequential.keras", "keep-bn-inference"),
    ],
)
def test_same_as_the_keras_api_on_samples(samples, tmp_path, name, recipe):
    _equivalence(samples / name, tmp_path, recipe)


@pytest.mark.keras
def test_same_as_the_keras_api_mobilenetv2_guide(guide_phase2_keras, tmp_path):
    _equivalence(guide_phase2_keras, tmp_path, "keep-bn-inference")


@pytest.mark.keras
def test_same_as_the_keras_api_mobilenetv3small(mobilenetv3small_keras, tmp_path):
    _equivalence(mobilenetv3small_keras, tmp_path, "train-bn")


@pytest.mark.keras
def test_same_as_the_keras_api_efficientnetb0(efficientnetb0_keras, tmp_path):
    name = "block3a_expand_activation"
    up_to = (
        lambda src, out: bnfreeze.freeze(src, output=out, up_to=name),
        _keras_freeze_up_to(name),
    )
    _equivalence(efficientnetb0_keras, tmp_path, up_to)


@pytest.mark.keras
@pytest.mark.parametrize("recipe", ["bn-inference", "keep-bn-inference"])
def test_same_as_the_keras_api_nested_three_deep(nested_deep_keras, tmp_path, recipe):
    """BN layers one, two and three containers deep, under a frozen container two deep."""
    _equivalence(nested_deep_keras, tmp_path, recipe)


@pytest.mark.keras
def test_keras_loads_dropped_optimizer_state_with_a_fresh_optimizer(samples, tmp_path):
    """Measured: Keras 3 compiles from compile_config, builds a fresh optimizer, warns once
    that the saved optimizer has 0 variables, and trains."""
    import warnings

    out = tmp_path / "out.keras"
    shutil.copy(samples / "guide_pattern.keras", tmp_path / "in.keras")
    bnfreeze.unfreeze(
        tmp_path / "in.keras", output=out, keep_bn_inference=True, optimizer_state="drop"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _load(out)
    messages = [str(w.message) for w in caught if "optimizer" in str(w.message)]
    assert len(messages) == 1
    assert "the saved optimizer has 0 variables" in messages[0]
    assert model.optimizer is not None and int(model.optimizer.iterations.numpy()) == 0
    assert all(not v.numpy().any() for v in model.optimizer.variables[2:])  # fresh slots
    from keras_truth import synthetic_batch

    x, y = synthetic_batch(model)
    model.run_eagerly = True  # the same train_step, without tracing a graph: faster
    model.fit(x, y, epochs=1, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 1


@pytest.mark.keras
def test_kept_optimizer_state_of_the_same_count_lands_on_the_wrong_variables(tmp_path):
    """Measured: saved optimizer variables are matched by position. Three Dense layers of the
    same shape, a and b trainable, c frozen; Adam steps once; then a is frozen and c made
    trainable, keeping the optimizer state (the count is the same). Keras loads it without a
    word, and c's kernel receives the moments a's kernel had: why bnfreeze drops the state
    by default whenever the set of trainable variables changes."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    x = keras.layers.Dense(3, name="a")(inputs)
    x = keras.layers.Dense(3, name="b")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="c")(x))
    model.get_layer("c").trainable = False
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), verbose=0)
    src = tmp_path / "src.keras"
    model.save(src)

    def moments(m: Any) -> dict[str, Any]:
        # Adam's slots, named after the variable they belong to: "adam/a_kernel_momentum"
        # (the optimizer's own name, "adam_3" later in a process, is left out).
        return {
            v.path.split("/", 1)[1]: np.array(keras.ops.convert_to_numpy(v))
            for v in m.optimizer.variables
            if v.path.endswith("kernel_momentum")
        }

    saved = moments(model)
    assert saved["a_kernel_momentum"].any()
    out = tmp_path / "edited.keras"
    bnfreeze.freeze(src, output=out, layers=("a",), optimizer_state="keep")
    bnfreeze.unfreeze(out, layers=("c",), in_place=True, optimizer_state="keep")
    with warnings_recorded() as caught:
        loaded = keras.models.load_model(out)
    assert not [w for w in caught if "optimizer" in w]  # silently
    assert [layer.trainable for layer in loaded.layers[1:]] == [False, True, True]
    got = moments(loaded)
    # Now b and c are trainable: slot 0 (a's kernel moments) is c's... by position.
    assert np.array_equal(got["b_kernel_momentum"], saved["a_kernel_momentum"])
    assert np.array_equal(got["c_kernel_momentum"], saved["b_kernel_momentum"])


def warnings_recorded():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def recording():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            messages: list[str] = []
            yield messages
            messages.extend(str(w.message) for w in caught)

    return recording()


# -- large members keep their bytes' offset within a page --------------------------------


def _page_offsets(path: Path) -> dict[str, int]:
    """Each member's data offset within a 4096-byte page."""
    with zipfile.ZipFile(path) as archive, open(path, "rb") as fh:
        return {i.filename: data_offset(fh, i) % 4096 for i in archive.infolist()}


def _padded_weights(samples: Path, out: Path, mib: int) -> Path:
    """guide_pattern.keras (compiled, with optimizer state) with ``mib`` MiB more weights: a
    dataset at the root of model.weights.h5, which no layer owns."""
    import io

    import h5py
    import numpy as np

    with zipfile.ZipFile(samples / "guide_pattern.keras") as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    buf = io.BytesIO(members["model.weights.h5"])
    with h5py.File(buf, "r+") as h5:
        h5.create_dataset("padding", data=np.arange(mib << 18, dtype="<f4"))
    members["model.weights.h5"] = buf.getvalue()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out


@pytest.mark.parametrize("optimizer_state", ["remap", "keep"])
def test_a_large_member_keeps_its_offset_within_a_page(samples, tmp_path, optimizer_state):
    """The weights member (>= ALIGN_FROM) starts at the same offset within a page as in the
    input, though config.json changed size before it; zip readers skip the padding record,
    the central directory keeps the member's own extra field, small members are not moved."""
    from bnfreeze.formats.writers.keras_zip import ALIGN_FROM

    src = _padded_weights(samples, tmp_path / "in.keras", mib=ALIGN_FROM >> 20)
    out = tmp_path / "out.keras"
    result = bnfreeze.unfreeze(
        src, output=out, keep_bn_inference=True, optimizer_state=optimizer_state
    )
    assert result.changes
    before, after = _page_offsets(src), _page_offsets(out)
    assert after["model.weights.h5"] == before["model.weights.h5"]
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(out) as b, open(out, "rb") as fh:
        assert b.testzip() is None
        weights = b.getinfo("model.weights.h5")
        assert weights.extra == b""
        fh.seek(weights.header_offset + 14)  # the local header's CRC-32 and sizes
        local = struct.unpack("<III", fh.read(12))
        assert local == (weights.CRC, weights.compress_size, weights.file_size)
        small = a.getinfo("config.json")
        assert small.compress_size < ALIGN_FROM
        assert b.getinfo("config.json").header_offset == small.header_offset
        if optimizer_state == "keep":
            assert b.read("model.weights.h5") == a.read("model.weights.h5")
    saved = bnfreeze.inspect(out).model.optimizer_variables  # bnfreeze reads its output
    assert saved == 6 if optimizer_state == "keep" else saved > 6  # slots for what now trains


@pytest.mark.keras
def test_keras_loads_a_large_member_written_aligned(tmp_path):
    """Keras 3 loads an output whose weights member carries the padding record: every weight
    as saved, the optimizer's iterations restored."""
    import keras
    import numpy as np

    from bnfreeze.formats.writers.keras_zip import ALIGN_FROM

    model = keras.Sequential(
        [keras.Input((1500,)), keras.layers.Dense(1500), keras.layers.BatchNormalization()]
    )
    model.compile("adam", "mse")
    model.fit(np.ones((4, 1500)), np.ones((4, 1500)), verbose=0)
    src, out = tmp_path / "in.keras", tmp_path / "out.keras"
    model.save(src)
    with zipfile.ZipFile(src) as archive:
        assert archive.getinfo("model.weights.h5").compress_size >= ALIGN_FROM
    bnfreeze.freeze(src, output=out, bn_inference=True)
    assert _page_offsets(out)["model.weights.h5"] == _page_offsets(src)["model.weights.h5"]
    assert _page_offsets(out)["config.json"] == _page_offsets(src)["config.json"]
    loaded = keras.models.load_model(out)
    assert [w.tolist() for w in loaded.get_weights()] == [w.tolist() for w in model.get_weights()]
    assert int(loaded.optimizer.iterations.numpy()) == 1
    assert not loaded.layers[-1].trainable
