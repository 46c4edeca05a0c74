"""Training scenarios for ``bnfreeze.BatchNormGuard``, run in a fresh interpreter per backend.

``python tests/support/guard_scenarios.py`` (with ``KERAS_BACKEND`` set) trains real models with and
without the guard and prints one JSON document of what Keras did and what the guard reported;
``tests/runtime/test_guard.py`` asserts on it. Every claim about a mode is measured here by Keras
(variables compared before and after), never derived from bnfreeze's rules.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

import bnfreeze

RNG = np.random.default_rng(0)
X = RNG.normal(5, 2, (8, 16, 16, 3)).astype("float32")
Y = RNG.normal(size=(8, 2)).astype("float32")


def backbone() -> keras.Model:
    """A small conv + BN backbone (two blocks), as keras.applications builds them."""
    inputs = keras.Input((16, 16, 3))
    x = inputs
    for i in (1, 2):
        x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    return keras.Model(inputs, x, name="base")


def guide(base: keras.Model, shape: tuple[int, ...]) -> keras.Model:
    """The Keras transfer-learning guide: ``base(inputs, training=False)`` plus a head."""
    inputs = keras.Input(shape)
    x = base(inputs, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(2, name="head")(x)
    return keras.Model(inputs, outputs, name="guide")


def values(model: keras.Model) -> dict[str, np.ndarray]:
    return {v.path: np.array(v.numpy(), copy=True) for v in model.weights}


def moved(before: dict[str, np.ndarray], model: keras.Model) -> list[str]:
    try:
        after = values(model)
    except Exception as exc:  # JAX leaves the variables unreadable after a failed step
        return [f"unreadable: {type(exc).__name__}"]
    return sorted(k for k in before if not np.array_equal(before[k], after[k]))


def fit(model, callbacks=(), x=X, y=Y, batch_size=4, epochs=1):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        error = None
        try:
            model.fit(
                x,
                y,
                batch_size=batch_size,
                epochs=epochs,
                verbose=0,
                shuffle=False,
                callbacks=list(callbacks),
            )
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
    ours = [
        {"category": w.category.__name__, "message": str(w.message)}
        for w in caught
        if issubclass(w.category, bnfreeze.RecompileWarning | guard_warning())
    ]
    return ours, error


def guard_warning():
    from bnfreeze.runtime.guard import GuardWarning

    return GuardWarning


def summary(guard) -> dict:
    r = guard.report
    if r is None:
        return {"report": None}
    return {
        "stale": None
        if r.stale is None
        else {"effect": r.stale.effect.value, "gained": r.stale.gained, "lost": r.stale.lost},
        "traps": [[f.code.value, f.path] for f in r.traps],
        "predicted_failures": [[e.name, len(fs)] for e, fs in r.predicted],
        "measured": r.measured_batch,
        "batch_branch": list(r.batch_branch),
        "inference_branch": list(r.inference_branch),
        "stats_moved": list(r.stats_moved),
        "weights_trained": list(r.weights_trained),
        "disagreements": [d.message for d in r.disagreements],
        "measured_failures": [[e.name, len(fs)] for e, fs in r.expectations],
        "stopped": r.stopped,
        "ok": r.ok,
    }


def stale_after_fit(strict: bool) -> dict:
    """Phase 1 with the base frozen, then base.trainable=True without compile()."""
    keras.utils.set_random_seed(1)
    base = backbone()
    base.trainable = False
    model = guide(base, (16, 16, 3))
    model.compile(keras.optimizers.SGD(0.01), "mse")
    fit(model)
    base.trainable = True
    before = values(model)
    guard = bnfreeze.BatchNormGuard(strict=strict)
    caught, error = fit(model, [guard])
    return {"warnings": caught, "error": error, "moved": moved(before, model), **summary(guard)}


def stale_new_shape() -> dict:
    """Flags changed after fit(), then a fit() whose last batch has a new shape: the traced
    step ignores the change, the new shape is traced anew and raises 'Unknown variable' on
    TensorFlow (JAX raises at the first step)."""
    keras.utils.set_random_seed(4)
    base = backbone()
    base.trainable = False
    model = guide(base, (16, 16, 3))
    model.compile(keras.optimizers.SGD(0.01), "mse")
    fit(model)
    base.trainable = True
    guard = bnfreeze.BatchNormGuard()
    caught, error = fit(model, [guard], x=X[:6], y=Y[:6])  # batches of 4, then 2
    return {"warnings": caught, "error": error, **summary(guard)}


def mobilenet_phase2() -> dict:
    """The guide's phase 2 on a tiny MobileNetV2, with expect='bn-inference'."""
    keras.utils.set_random_seed(2)
    base = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), include_top=False, weights=None, alpha=0.35
    )
    base.trainable = False
    model = guide(base, (32, 32, 3))
    # One batch: the guard measures after batch 1, and that batch is what the tests check.
    x = RNG.normal(5, 2, (2, 32, 32, 3)).astype("float32")
    y = RNG.normal(size=(2, 2)).astype("float32")
    base.trainable = True  # phase 2 (phase 1's training changes nothing the guard checks)
    # TensorFlow runs it eagerly: tracing MobileNetV2's step costs 8x the CPU (measured: 39 s
    # traced, 4.7 s eager, for one batch; the traced step is exercised by the small models).
    # JAX jits it in ~20 s, while running it eagerly costs minutes.
    eager = keras.backend.backend() == "tensorflow"
    model.compile(keras.optimizers.Adam(1e-5), "mse", run_eagerly=eager)
    before = values(model)
    guard = bnfreeze.BatchNormGuard(expect="bn-inference")
    caught, error = fit(model, [guard], x=x, y=y, batch_size=2)
    bn_stats = sorted(
        f"base/{layer.name}"
        for layer in base.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    return {
        "warnings": caught,
        "error": error,
        "moved": moved(before, model),
        "backbone_bn": bn_stats,
        **summary(guard),
    }


def recipe(with_guard: bool, strict: bool = False, epochs: int = 2) -> dict:
    """The --bn-inference recipe for phase 2: every BN frozen, the rest unfrozen, recompiled."""
    keras.utils.set_random_seed(3)
    base = backbone()
    base.trainable = False
    model = guide(base, (16, 16, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bnfreeze.RecompileWarning)
        bnfreeze.unfreeze(model, keep_bn_inference=True)
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    before = values(model)
    guard = bnfreeze.BatchNormGuard(expect=["bn-inference", "trains=conv*"], strict=strict)
    caught, error = fit(model, [guard] if with_guard else [], epochs=epochs)
    after = values(model)
    return {
        "warnings": caught,
        "error": error,
        "moved": moved(before, model),
        "weights": {k: v.tobytes().hex() for k, v in after.items()},
        **(summary(guard) if with_guard else {}),
    }


def main() -> None:
    import time

    out: dict = {"backend": keras.backend.backend(), "seconds": {}}
    for name, run in (
        ("stale", lambda: stale_after_fit(strict=False)),
        ("stale_strict", lambda: stale_after_fit(strict=True)),
        ("phase2", mobilenet_phase2),
        ("recipe_plain", lambda: recipe(with_guard=False)),
    ):
        start = time.perf_counter()
        out[name] = run()
        out["seconds"][name] = round(time.perf_counter() - start, 1)
    out["recipe_guarded"] = recipe(with_guard=True, strict=True)
    out["new_shape"] = stale_new_shape()
    try:
        bnfreeze.BatchNormGuard(expect="no-such-thing")
    except bnfreeze.api.BnfreezeError as exc:
        out["bad_expect"] = str(exc)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
