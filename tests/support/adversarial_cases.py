"""Adversarial but ordinary models, saved and measured by Keras in a subprocess of their own.

Run as ``python tests/support/adversarial_cases.py OUT_DIR`` with ``KERAS_BACKEND`` set (one process
holds one backend). For each case it builds the model, saves it (``.keras``, and ``.h5``
where the case says so), loads every file back, trains **one real fit() step**, and writes
``OUT_DIR/measured.json``: per file, per BN layer path, which normalization each call in
``fit()`` used, and whether gamma/beta and the moving statistics moved.

The branch is measured, not inferred from the statistics (``momentum=1.0`` takes the batch
branch and leaves them bit-identical): ``BatchNormalization.call`` is wrapped, and each call's
output is compared with the two normalizations computed here by hand, with the statistics of
the batch and with the moving statistics as they were just before the call. Calls on symbolic
tensors (JAX traces every layer once with ``training=False`` while it builds the train step)
are skipped. This is test code and never applies bnfreeze's rule.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras
import numpy as np
from keras_truth import INPUT_MEAN, layer_paths

L = keras.layers


@keras.saving.register_keras_serializable(package="adversarial")
class InferenceWrapper(keras.layers.Wrapper):
    """A custom Wrapper whose call() always runs the wrapped layer with training=False."""

    def call(self, inputs, training=None):
        return self.layer(inputs, training=False)


# -- the cases ---------------------------------------------------------------------------


def custom_wrapper() -> Any:
    inp = keras.Input((4,), name="x")
    x = L.Dense(4, name="dense")(inp)
    x = InferenceWrapper(L.BatchNormalization(name="inner_bn"), name="wrap")(x)
    out = L.BatchNormalization(name="head_bn")(x)
    return keras.Model(inp, out, name="custom_wrapper")


def shared_bn_two_calls() -> Any:
    a = keras.Input((4,), name="a")
    b = keras.Input((4,), name="b")
    bn = L.BatchNormalization(name="shared_bn")
    out = L.Add(name="add")([bn(a), bn(b, training=False)])
    return keras.Model([a, b], out, name="shared_bn")


def sub_model_reused() -> Any:
    inner_in = keras.Input((4,))
    y = L.Dense(4, name="proj")(inner_in)
    y = L.BatchNormalization(name="bn")(y)
    sub = keras.Model(inner_in, y, name="block")
    a = keras.Input((4,), name="a")
    b = keras.Input((4,), name="b")
    out = L.Concatenate(name="cat")([sub(a), sub(b)])
    return keras.Model([a, b], out, name="reused")


def duplicate_names() -> Any:
    def block(name: str) -> Any:
        i = keras.Input((4,))
        y = L.Dense(4, name="dense")(i)
        y = L.BatchNormalization(name="bn")(y)
        return keras.Model(i, y, name=name)

    inp = keras.Input((4,), name="x")
    first = block("first")
    second = block("second")
    second.trainable = False
    second.get_layer("bn").trainable = False
    out = L.Add(name="add")([first(inp), second(inp)])
    return keras.Model(inp, out, name="duplicates")


def multi_io() -> Any:
    a = keras.Input((4,), name="a")
    b = keras.Input((6,), name="b")
    x = L.BatchNormalization(name="bn_a")(L.Dense(4, name="da")(a))
    y = L.BatchNormalization(name="bn_b", trainable=False)(L.Dense(4, name="db")(b))
    joint = L.Concatenate(name="cat")([x, y])
    out1 = L.Dense(2, name="out1")(L.BatchNormalization(name="bn_joint")(joint))
    out2 = L.Dense(3, name="out2")(y)
    return keras.Model([a, b], [out1, out2], name="multi_io")


def seq_in_func_in_seq() -> Any:
    innermost = keras.Sequential(
        [L.Dense(4, name="d"), L.BatchNormalization(name="bn_deep")], name="innermost"
    )
    i = keras.Input((4,))
    y = innermost(i, training=False)
    y = L.BatchNormalization(name="bn_mid", trainable=False)(y)
    middle = keras.Model(i, y, name="middle")
    return keras.Sequential(
        [keras.Input((4,)), middle, L.BatchNormalization(name="bn_top")], name="outer"
    )


def time_distributed() -> Any:
    inp = keras.Input((3, 4), name="x")
    x = L.TimeDistributed(L.BatchNormalization(name="td_bn"), name="td")(inp)
    frozen = L.TimeDistributed(L.BatchNormalization(name="td_bn_frozen"), name="td_frozen")
    frozen.layer.trainable = False
    return keras.Model(inp, frozen(x), name="time_distributed")


def bn_variants() -> Any:
    inp = keras.Input((4, 3), name="x")
    # synchronized=True exists on the TensorFlow backend only.
    sync = keras.backend.backend() == "tensorflow"
    x = L.BatchNormalization(name="sync", synchronized=sync)(inp)
    x = L.BatchNormalization(name="no_center_scale", center=False, scale=False)(x)
    x = L.BatchNormalization(name="no_scale", scale=False)(x)
    x = L.BatchNormalization(name="axis1", axis=1)(x)
    x = L.BatchNormalization(name="momentum0", momentum=0.0)(x)
    x = L.BatchNormalization(name="momentum1", momentum=1.0)(x)
    x = L.BatchNormalization(name="momentum1_frozen", momentum=1.0, trainable=False)(x)
    return keras.Model(inp, L.Dense(2, name="head")(L.Flatten()(x)), name="variants")


def mixed_precision() -> Any:
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        inp = keras.Input((4,), name="x")
        x = L.Dense(4, name="dense")(inp)
        x = L.BatchNormalization(name="bn_train")(x)
        x = L.BatchNormalization(name="bn_frozen", trainable=False)(x)
        out = L.Dense(2, name="head", dtype="float32")(x)
        return keras.Model(inp, out, name="mixed")
    finally:
        keras.mixed_precision.set_global_policy("float32")


#: case name -> (builder, formats to save it in)
CASES: dict[str, tuple[Any, tuple[str, ...]]] = {
    "custom_wrapper": (custom_wrapper, (".keras", ".h5")),
    "shared_bn_two_calls": (shared_bn_two_calls, (".keras",)),
    "sub_model_reused": (sub_model_reused, (".keras",)),
    "duplicate_names": (duplicate_names, (".keras", ".h5")),
    "multi_io": (multi_io, (".keras",)),
    "seq_in_func_in_seq": (seq_in_func_in_seq, (".keras", ".h5")),
    "time_distributed": (time_distributed, (".keras",)),
    "bn_variants": (bn_variants, (".keras",)),
    "mixed_precision": (mixed_precision, (".keras",)),
}


# -- measuring ---------------------------------------------------------------------------


class BranchRecorder:
    """Wraps ``BatchNormalization.call`` and records, per layer object, which normalization
    each concrete call's output matches: ``"batch"`` or ``"moving"``."""

    def __init__(self) -> None:
        self.calls: dict[int, list[str]] = {}
        self._original = keras.layers.BatchNormalization.call

    def __enter__(self) -> BranchRecorder:
        recorder, original = self, self._original

        def call(layer: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(inputs, keras.KerasTensor):  # a symbolic build, not a step
                return original(layer, inputs, *args, **kwargs)
            jax = keras.backend.backend() == "jax"
            # A copy taken now: TensorFlow's read of a variable can alias its buffer, which
            # the call is about to update.
            before = [
                None
                if v is None
                else (keras.ops.convert_to_tensor(v) if jax else np.array(v.numpy(), copy=True))
                for v in (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance)
            ]
            out = original(layer, inputs, *args, **kwargs)

            def record(x: Any, got: Any, *values: Any) -> None:
                it = iter(values)
                state = [None if v is None else np.asarray(next(it), "float64") for v in before]
                branch = _branch(layer, np.asarray(x, "float64"), np.asarray(got, "float64"), state)
                recorder.calls.setdefault(id(layer), []).append(branch)

            present = [v for v in before if v is not None]
            if jax:
                # Inside jax.grad even an eager step holds tracers: read them when they run.
                import jax as jax_module

                jax_module.debug.callback(record, inputs, out, *present)
            else:
                record(
                    keras.ops.convert_to_numpy(inputs), keras.ops.convert_to_numpy(out), *present
                )
            return out

        keras.layers.BatchNormalization.call = call
        return self

    def __exit__(self, *exc: Any) -> None:
        keras.layers.BatchNormalization.call = self._original


def _branch(layer: Any, x: Any, got: Any, before: list[Any]) -> str:
    gamma, beta, mean, var = before
    axis = layer.axis % x.ndim
    reduce = tuple(i for i in range(x.ndim) if i != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]

    def normalized(m: Any, v: Any) -> Any:
        y = (x - np.reshape(m, shape)) / np.sqrt(np.reshape(v, shape) + layer.epsilon)
        if gamma is not None:
            y = y * np.reshape(gamma, shape)
        if beta is not None:
            y = y + np.reshape(beta, shape)
        return y

    candidates = {
        "batch": normalized(x.mean(axis=reduce), x.var(axis=reduce)),
        "moving": normalized(mean, var),
    }
    errors = {name: float(np.max(np.abs(y - got))) for name, y in candidates.items()}
    best = min(errors, key=errors.get)
    other = max(errors, key=errors.get)
    scale = max(1.0, float(np.max(np.abs(got))))
    if not (errors[best] < 0.02 * scale and errors[other] > 0.5):
        return f"unclear {errors}"
    return best


def synthetic(model: Any, seed: int = 0) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)

    def make(t: Any, mean: float) -> Any:
        shape = [4] + [int(d) for d in t.shape[1:]]
        return rng.normal(mean, 2.0, size=shape).astype("float32")

    xs = [make(t, INPUT_MEAN) for t in model.inputs]
    ys = [make(t, 0.0) for t in model.outputs]
    return (xs if len(xs) > 1 else xs[0]), (ys if len(ys) > 1 else ys[0])


def measure(model: Any) -> dict[str, Any]:
    """One real fit() step; per BN path: branches taken, gamma/beta moved, stats moved."""
    paths = layer_paths(model)
    bns = {p: layer for p, layer in paths.items() if isinstance(layer, L.BatchNormalization)}

    def values(layer: Any) -> dict[str, Any]:
        return {
            name: np.array(v.numpy(), copy=True)
            for name in ("gamma", "beta", "moving_mean", "moving_variance")
            if (v := getattr(layer, name)) is not None
        }

    # Moving statistics far from any batch's (inputs around 5, and around 0 after another
    # BN), so the two normalizations differ by whole units and each call's output tells.
    for layer in bns.values():
        layer.moving_mean.assign(np.full(layer.moving_mean.shape, 3.0, "float32"))
        layer.moving_variance.assign(np.full(layer.moving_variance.shape, 0.25, "float32"))
    before = {p: values(layer) for p, layer in bns.items()}
    x, y = synthetic(model)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", run_eagerly=True)
    with BranchRecorder() as recorder:
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    out = {}
    for path, layer in bns.items():
        after = values(layer)

        def moved(names: tuple[str, ...], layer_path: str = path, now: Any = after) -> Any:
            present = [n for n in names if n in now]
            if not present:
                return None
            return any(not np.array_equal(before[layer_path][n], now[n]) for n in present)

        out[path] = {
            "branches": sorted(set(recorder.calls.get(id(layer), []))),
            "gamma_beta_moved": moved(("gamma", "beta")),
            "stats_moved": moved(("moving_mean", "moving_variance")),
            "momentum": float(layer.momentum),
        }
    return out


def main(out_dir: str, *also: str) -> None:
    """Build, save and measure every case into ``out_dir``; ``also``: files made elsewhere
    (a crafted legacy .h5 frozen by bnfreeze), loaded and measured the same way."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(7)
    results: dict[str, Any] = {"backend": keras.backend.backend(), "files": {}}
    for name, (build, formats) in CASES.items():
        model = build()
        for suffix in formats:
            path = out / f"{name}{suffix}"
            model.save(path)
            loaded = keras.models.load_model(path, compile=False)
            results["files"][path.name] = measure(loaded)
    for extra in also:
        loaded = keras.models.load_model(extra, compile=False)
        results["files"][Path(extra).name] = measure(loaded)
    (out / "measured.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
