"""Saved optimizer state across freeze and unfreeze (bnfreeze.ops.optimizer_state), measured
with real Keras: every checkpoint here is trained one step and saved by Keras, edited by
bnfreeze, then loaded with ``keras.models.load_model`` and trained again.

The truth each test compares against is Keras's own: slot variables are matched by their
names in ``optimizer.variables`` (Keras names a slot after its variable, e.g.
``adam/conv_kernel_momentum``), never by bnfreeze's positional rule; and one training step
on the loaded file must give bit for bit the weights of an in-memory Keras run that sets the
same flags and gives a new optimizer the old slots of the same variables.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest

import bnfreeze
from bnfreeze.ops.optimizer_state import OptimizerState

pytestmark = pytest.mark.keras

OPTIMIZERS = {
    "adam": lambda k: k.optimizers.Adam(1e-2),
    "adamw": lambda k: k.optimizers.AdamW(1e-2, amsgrad=True),
    "sgd-momentum": lambda k: k.optimizers.SGD(1e-2, momentum=0.9),
    "rmsprop": lambda k: k.optimizers.RMSprop(1e-2, momentum=0.5, centered=True),
    "adam-ema": lambda k: k.optimizers.Adam(1e-2, use_ema=True),
}


def _batch(seed: int = 0) -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return (
        rng.normal(3.0, 2.0, (8, 6, 6, 2)).astype("float32"),
        rng.normal(0.0, 1.0, (8, 1)).astype("float32"),
    )


def _build(keras: Any, frozen: tuple[str, ...] = ()) -> Any:
    """conv -> bn -> a nested model (conv -> bn) -> dense, with ``frozen`` layers
    trainable=False (the nested model's layers by their own names)."""
    inp = keras.Input((6, 6, 2), name="x")
    h = keras.layers.Conv2D(3, 3, name="conv")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    sub_in = keras.Input((4, 4, 3), name="sub_x")
    s = keras.layers.Conv2D(3, 1, name="inner_conv")(sub_in)
    s = keras.layers.BatchNormalization(name="inner_bn")(s)
    h = keras.Model(sub_in, s, name="sub")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    out = keras.layers.Dense(1, name="dense")(h)
    model = keras.Model(inp, out, name="m")
    for layer in model._flatten_layers(include_self=False):
        if layer.name in frozen:
            layer.trainable = False
    return model


def _trained(tmp: Path, optimizer: str, frozen: tuple[str, ...] = ()) -> Path:
    import keras

    keras.utils.set_random_seed(3)
    model = _build(keras, frozen)
    model.compile(OPTIMIZERS[optimizer](keras), "mse", run_eagerly=True)
    x, y = _batch(0)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)  # two steps: no slot is zero by luck
    path = tmp / f"{optimizer}-{'-'.join(frozen) or 'all'}.keras"
    model.save(path)
    return path


def _slots(model: Any) -> dict[str, Any]:
    """The optimizer's variables by Keras's own name (the part after the optimizer name)."""
    return {v.path.split("/", 1)[1]: v.numpy() for v in model.optimizer.variables}


def _load(path: Path) -> tuple[Any, list[str]]:
    import keras

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = keras.models.load_model(path)
    return model, [str(w.message) for w in caught]


def _layer(model: Any, name: str) -> Any:
    return next(x for x in model._flatten_layers(include_self=False) if x.name == name)


def _reference(src: Path, flags: dict[str, bool]) -> Any:
    """The in-memory Keras run: load the checkpoint, set the same flags, compile a new
    optimizer of the same config, build it, and give it the old value of every variable of
    the same name (iteration, learning rate, the slots of variables that still train)."""
    import keras

    model, _ = _load(src)
    old = _slots(model)
    for name, value in flags.items():
        _layer(model, name).trainable = value
    optimizer = model.optimizer.__class__.from_config(model.optimizer.get_config())
    model.compile(optimizer, "mse", run_eagerly=True)
    optimizer.build(model.trainable_variables)
    for v in optimizer.variables:
        key = v.path.split("/", 1)[1]
        if key in old:
            v.assign(old[key])
    assert isinstance(model.optimizer, keras.optimizers.Optimizer)
    return model


def _step(model: Any, batch: tuple[Any, Any] | None = None) -> dict[str, Any]:
    x, y = batch if batch is not None else _batch(1)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    return {v.path: v.numpy() for v in model.weights}


def _weights(path: Path) -> dict[str, tuple[str, bytes]]:
    import h5py

    out: dict[str, tuple[str, bytes]] = {}
    with zipfile.ZipFile(path) as archive:
        data = io.BytesIO(archive.read("model.weights.h5"))
    with h5py.File(data, "r") as h5:

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset) and not name.startswith("optimizer/"):
                out[name] = (str(obj.dtype), obj[()].tobytes())

        h5.visititems(visit)
    return out


CASES = {
    # freeze: the BN layers stop training (their slots are left out)
    "freeze": ((), {"bn": False, "inner_bn": False}),
    # unfreeze: the nested model trained frozen; now every layer trains (new zero slots)
    "unfreeze": (("inner_conv", "inner_bn"), {"inner_conv": True, "inner_bn": True}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_remap_is_what_keras_would_do_in_memory(tmp_path, optimizer, case):
    import numpy as np

    frozen, flags = CASES[case]
    src = _trained(tmp_path, optimizer, frozen)
    out = tmp_path / "out.keras"
    if case == "freeze":
        result = bnfreeze.freeze(src, output=out, bn_inference=True)
    else:
        result = bnfreeze.unfreeze(src, output=out)
    assert result.optimizer_state is OptimizerState.REMAPPED, result.optimizer_plan
    before, _ = _load(src)
    old = _slots(before)
    loaded, messages = _load(out)
    assert not [m for m in messages if "Skipping variable loading" in m]
    new = _slots(loaded)
    assert len(new) == result.optimizer_plan.expected
    created = 0
    for name, value in new.items():
        if name in old:  # the same variable's slot (or iteration, learning rate): kept
            assert np.array_equal(value, old[name]) and value.dtype == old[name].dtype, name
        else:  # a variable that starts training: a zero slot
            assert not value.any(), name
            created += 1
    assert created == result.optimizer_plan.created
    assert (created > 0) == (case == "unfreeze")
    assert int(loaded.optimizer.iterations.numpy()) == int(before.optimizer.iterations.numpy())
    assert int(loaded.optimizer.iterations.numpy()) == 2
    # Nothing lost: every weight equal by path and dtype.
    assert _weights(out) == _weights(src)
    # One step on the loaded file == one step in memory with the same flags and state.
    reference = _reference(src, flags)
    got, want = _step(loaded), _step(reference)
    assert got.keys() == want.keys()
    for path in want:
        assert got[path].tobytes() == want[path].tobytes(), path


def _two_bn_checkpoint(tmp: Path) -> Path:
    """bn_a trains, bn_b (same shape) is frozen: after swapping them the count of optimizer
    variables is the same, so Keras assigns by position without a word."""
    import keras

    keras.utils.set_random_seed(5)
    inp = keras.Input((4,), name="x")
    h = keras.layers.Dense(3, name="dense")(inp)
    h = keras.layers.BatchNormalization(name="bn_a")(h)
    h = keras.layers.BatchNormalization(name="bn_b")(h)
    model = keras.Model(inp, keras.layers.Dense(1, name="head")(h), name="two_bn")
    _layer(model, "bn_b").trainable = False
    model.compile(keras.optimizers.Adam(1e-2), "mse", run_eagerly=True)
    import numpy as np

    rng = np.random.default_rng(0)
    model.fit(rng.normal(2, 1, (8, 4)), rng.normal(0, 1, (8, 1)), epochs=2, verbose=0)
    path = tmp / "two_bn.keras"
    model.save(path)
    return path


def _swap(src: Path, out: Path, **kwargs: Any) -> Any:
    first = out.with_name("half.keras")
    bnfreeze.freeze(src, output=first, layers=["bn_a"], **kwargs)
    return bnfreeze.unfreeze(first, output=out, layers=["bn_b"], **kwargs)


def test_count_matches_keep_misassigns_and_remap_does_not(tmp_path):
    import numpy as np

    src = _two_bn_checkpoint(tmp_path)
    before, _ = _load(src)
    old = _slots(before)
    # keep: Keras loads the moments silently, and bn_b gets bn_a's (measured).
    kept = _swap(src, tmp_path / "kept.keras", optimizer_state="keep")
    assert kept.optimizer_state is OptimizerState.KEPT
    (warning,) = [w for w in kept.warnings if w.code.value == "optimizer-state"]
    assert "the count matches here" in warning.message and "WILL" in warning.message
    loaded, messages = _load(tmp_path / "kept.keras")
    assert not [m for m in messages if "Skipping variable loading" in m]
    new = _slots(loaded)
    assert np.array_equal(new["bn_b_gamma_momentum"], old["bn_a_gamma_momentum"])
    assert old["bn_a_gamma_momentum"].any()
    # remap (the default): bn_b starts from zero slots, bn_a's are left out.
    remapped = _swap(src, tmp_path / "remapped.keras")
    assert remapped.optimizer_state is OptimizerState.REMAPPED
    loaded, messages = _load(tmp_path / "remapped.keras")
    assert not [m for m in messages if "Skipping variable loading" in m]
    new = _slots(loaded)
    assert not new["bn_b_gamma_momentum"].any() and not new["bn_b_beta_velocity"].any()
    for name in ("dense_kernel_momentum", "head_bias_velocity", "iteration", "learning_rate"):
        assert np.array_equal(new[name], old[name]), name
    reference = _reference(src, {"bn_a": False, "bn_b": True})
    rng = np.random.default_rng(1)
    batch = (rng.normal(2, 1, (8, 4)).astype("float32"), rng.normal(0, 1, (8, 1)).astype("float32"))
    got, want = _step(loaded, batch), _step(reference, batch)
    assert all(got[p].tobytes() == want[p].tobytes() for p in want)


def test_an_unmeasured_optimizer_is_dropped_with_the_reason(tmp_path):
    import keras

    keras.utils.set_random_seed(3)
    model = _build(keras)
    model.compile(keras.optimizers.Nadam(1e-2), "mse", run_eagerly=True)
    x, y = _batch(0)
    model.fit(x, y, epochs=1, verbose=0)
    src = tmp_path / "nadam.keras"
    model.save(src)
    result = bnfreeze.freeze(src, output=tmp_path / "out.keras", bn_inference=True)
    assert result.optimizer_state is OptimizerState.DROPPED
    assert "not Nadam" in result.optimizer_plan.reason
    (warning,) = [w for w in result.warnings if w.code.value == "optimizer-state"]
    assert "could not be remapped" in warning.message and "not Nadam" in warning.message
    loaded, messages = _load(tmp_path / "out.keras")
    assert any("the saved optimizer has 0 variables" in m for m in messages)
    assert int(loaded.optimizer.iterations.numpy()) == 0
    assert _weights(tmp_path / "out.keras") == _weights(src)


def test_drop_and_keep_on_request(tmp_path):
    src = _trained(tmp_path, "adam")
    dropped = bnfreeze.freeze(
        src, output=tmp_path / "d.keras", bn_inference=True, optimizer_state="drop"
    )
    assert dropped.optimizer_state is OptimizerState.DROPPED
    assert dropped.optimizer_plan.reason is None
    assert dropped.report.model.optimizer_variables is None
    kept = bnfreeze.freeze(
        src, output=tmp_path / "k.keras", bn_inference=True, optimizer_state="keep"
    )
    assert kept.optimizer_state is OptimizerState.KEPT
    (warning,) = [w for w in kept.warnings if w.code.value == "optimizer-state"]
    assert "skip them on load" in warning.message  # 22 saved, 14 built: not the same count
    _, messages = _load(tmp_path / "k.keras")
    assert any("Skipping variable loading" in m for m in messages)


#: Written by Keras 3.3.3 itself (tests/data/keras_3_3_3/make.py): no layer names in the
#: weights file, optimizer variables by position. main left their state "unchanged" on
#: freeze, with 22 variables for 14 trainable ones: Keras 3.15 then skipped all of it.
OLD_KERAS = {
    "adam_trained.keras": ("freeze", {"bn": False, "inner_bn": False}),
    "adam_trained_sub_frozen.keras": ("unfreeze", {"inner_conv": True, "inner_bn": True}),
}


@pytest.mark.parametrize("name", sorted(OLD_KERAS))
def test_files_from_keras_3_3_remap_as_keras_would(tmp_path, name):
    import numpy as np
    from paths import TESTS

    src = TESTS / "data" / "keras_3_3_3" / name
    case, flags = OLD_KERAS[name]
    out = tmp_path / "out.keras"
    if case == "freeze":
        result = bnfreeze.freeze(src, output=out, bn_inference=True)
    else:
        result = bnfreeze.unfreeze(src, output=out)
    assert result.optimizer_state is OptimizerState.REMAPPED, result.optimizer_plan
    before, _ = _load(src)
    assert before.optimizer.iterations.numpy() == 2  # Keras 3.15 loads the 3.3.3 state
    old = _slots(before)
    loaded, messages = _load(out)
    assert not [m for m in messages if "Skipping variable loading" in m]
    new = _slots(loaded)
    for key, value in new.items():
        if key in old:
            assert np.array_equal(value, old[key]), key
        else:
            assert not value.any(), key
    assert (len(new) - len(set(new) & set(old)) > 0) == (case == "unfreeze")
    assert _weights(out) == _weights(src)
    # The optimizer Keras builds in memory for the same flags, given the old slots by name,
    # holds the same variables in the same order (what Keras assigns a saved list by). No
    # training step here: these files are compiled for graph mode, where a step differs from
    # an eager reference by rounding that Adam amplifies for the biases before a BN.
    reference = _reference(src, flags)
    want = [(v.path, v.numpy()) for v in reference.optimizer.variables]
    got = [(v.path, v.numpy()) for v in loaded.optimizer.variables]
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, value), (_, expected) in zip(got, want, strict=True):
        assert np.array_equal(value, expected), path
