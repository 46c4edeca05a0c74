"""The fine-tuning schedules of tests/runtime/test_finetune.py, run on one Keras 3 backend in a
fresh process: ``python tests/support/finetune_cases.py BACKEND OUT.json``.

Every claim is measured from Keras here, not taken from bnfreeze: which variables a phase's
first batch moved (a callback compares every model variable by path before and after it),
the optimizer's slots by variable path at the end of one phase and the start of the next, the
weights a hand-written Keras 3 script reaches, the gradient from ``tf.GradientTape`` or
``jax.grad``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

BACKEND, OUT = sys.argv[1], sys.argv[2]
os.environ["KERAS_BACKEND"] = BACKEND

import keras  # noqa: E402
import numpy as np  # noqa: E402

import bnfreeze  # noqa: E402
import bnfreeze.errors  # noqa: E402

SLOT_LISTS = ("_momentums", "_velocities", "momentums")
results: dict[str, object] = {"backend": keras.backend.backend()}


def data(n: int = 8, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Inputs of mean 0.5 (a BN layer in training mode would move its statistics), small
    enough that no ReLU6 saturates; unbalanced labels, so that no gradient is exactly zero."""
    rng = np.random.RandomState(0)
    x = rng.normal(0.5, 1.0, (n, size, size, 3)).astype("float32")
    y = np.array([1, 0, 1, 1, 1, 0, 1, 1] * (n // 8))
    return x, y


def tiny(seed: int = 0) -> keras.Model:
    """A nested conv+BN backbone called with training=False (the guide's pattern), a head."""
    keras.utils.set_random_seed(seed)
    b_in = keras.Input((8, 8, 3))
    h = b_in
    for i in (1, 2, 3):
        h = keras.layers.Conv2D(4, 3 if i < 3 else 1, name=f"c{i}")(h)
        h = keras.layers.BatchNormalization(name=f"bn{i}")(h)
        h = keras.layers.ReLU(name=f"relu{i}")(h)
    base = keras.Model(b_in, h, name="backbone")
    inp = keras.Input((8, 8, 3))
    h = base(inp, training=False)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    out = keras.layers.Dense(2, name="head")(h)
    return keras.Model(inp, out, name="tiny")


def mobilenet(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    base = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, include_top=False
    )
    inp = keras.Input((32, 32, 3))
    h = base(inp, training=False)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    out = keras.layers.Dense(2, name="head")(h)
    return keras.Model(inp, out, name="guide")


def loss() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def values(model: keras.Model) -> dict[str, np.ndarray]:
    return {v.path: np.array(v.numpy(), copy=True) for v in model.variables}


class FirstBatch(keras.callbacks.Callback):
    """Every model variable by path before each fit() and after its first batch."""

    def __init__(self) -> None:
        super().__init__()
        self.moved: list[list[str]] = []

    def on_train_begin(self, logs=None):
        self.before = values(self.model)
        self.pending = True

    def on_train_batch_end(self, batch, logs=None):
        if self.pending:
            self.pending = False
            after = values(self.model)
            self.moved.append(
                sorted(p for p, v in after.items() if not np.array_equal(v, self.before[p]))
            )


class Slots(keras.callbacks.Callback):
    """The optimizer's slots by variable path and its iteration count, at the start and the
    end of each fit()."""

    def __init__(self) -> None:
        super().__init__()
        self.begin: list[dict] = []
        self.end: list[dict] = []

    def snapshot(self) -> dict:
        opt = self.model.optimizer
        paths = [v.path for v in getattr(opt, "_trainable_variables", [])]
        slots = {}
        for kind in SLOT_LISTS:
            for path, slot in zip(paths, getattr(opt, kind, []) or [], strict=False):
                slots[f"{kind}:{path}"] = np.array(slot.numpy(), copy=True)
        return {"iterations": int(opt.iterations.numpy()), "slots": slots}

    def on_train_begin(self, logs=None):
        self.begin.append(self.snapshot())

    def on_train_end(self, logs=None):
        self.end.append(self.snapshot())


def weight_paths(layers) -> list[str]:
    return sorted(v.path for layer in layers for v in layer.weights)


# ------------------------------------------------------------------ 1. the guide, two phases
def guide_case() -> dict:
    """Head only, then the top of the backbone with BN in inference; one batch per phase."""
    # A keras.applications backbone on both backends: eager on TensorFlow (no trace for two
    # batches), jitted on JAX (17 s of CPU in all with the suite's XLA flags, 25 s eager).
    model, top, size = mobilenet(), "block_16_expand", 32
    model.compile(keras.optimizers.Adam(1e-3), loss(), run_eagerly=BACKEND == "tensorflow")
    x, y = data(8, size)
    base = model.layers[1]
    names = [layer.name for layer in base.layers]
    top_layers = base.layers[names.index(top) :]
    bn = keras.layers.BatchNormalization
    expected = [
        weight_paths([model.get_layer("head")]),
        weight_paths(
            [layer for layer in top_layers if not isinstance(layer, bn)] + [model.get_layer("head")]
        ),
    ]
    probe = FirstBatch()
    phases = [
        bnfreeze.Phase(epochs=1, trains=["pool", "head"], learning_rate=1e-3, name="head"),
        bnfreeze.Phase(epochs=1, from_=top, bn="inference", learning_rate=1e-4, name="top"),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = bnfreeze.finetune(
            model, phases, x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[probe]
        )
    stats = [v.path for v in model.variables if "moving_" in v.path]
    return {
        "moved": probe.moved,
        "expected": expected,
        "stats_moved": [sorted(set(m) & set(stats)) for m in probe.moved],
        "n_stats": len(stats),
        "problems": [list(p.problems) for p in result.phases],
        "guard_batch_branch": [len(p.guard.batch_branch) for p in result.phases],
        "guard_measured": [len(p.guard.measured) for p in result.phases],
        "boundaries": list(result.boundaries),
        "history_len": {k: len(v) for k, v in result.history.items()},
        "finite": all(np.isfinite(v.numpy()).all() for v in model.variables),
        "warnings": sorted({type(w.message).__name__ for w in caught}),
    }


# ------------------------------------------------------------ 2. reset == a hand-written script
def reset_case() -> dict:
    x, y = data()
    model = tiny(1)
    model.compile(keras.optimizers.Adam(1e-3), loss())
    phases = [
        bnfreeze.Phase(epochs=2, trains=["head"], learning_rate=1e-2),
        bnfreeze.Phase(epochs=2, from_="c2", bn="inference", learning_rate=1e-3),
    ]
    bnfreeze.finetune(
        model, phases, x, y, optimizer_state="reset", batch_size=4, shuffle=False, verbose=0
    )
    ours = values(model)

    # The correct Keras 3 script: per-BN trainable=False, compile() with a new optimizer.
    hand = tiny(1)
    base = hand.get_layer("backbone")
    base.trainable = False
    hand.get_layer("pool").trainable = True
    hand.compile(keras.optimizers.Adam(1e-2), loss())
    hand.fit(x, y, epochs=2, batch_size=4, shuffle=False, verbose=0)
    base.trainable = True
    seen = False
    for layer in base.layers:
        seen = seen or layer.name == "c2"
        layer.trainable = seen and not isinstance(layer, keras.layers.BatchNormalization)
    hand.compile(keras.optimizers.Adam(1e-3), loss())
    hand.fit(x, y, epochs=4, initial_epoch=2, batch_size=4, shuffle=False, verbose=0)
    theirs = values(hand)
    return {
        "paths_equal": sorted(ours) == sorted(theirs),
        "different": sorted(p for p in ours if not np.array_equal(ours[p], theirs.get(p))),
        "changed_from_init": sorted(
            p for p, v in values(tiny(1)).items() if not np.array_equal(v, ours[p])
        ),
    }


# ----------------------------------------------------- 3. carry over three gradual phases
def carry_case() -> dict:
    x, y = data()
    model = tiny(2)
    model.compile(keras.optimizers.Adam(1e-3), loss())
    probe = Slots()
    phases = [
        bnfreeze.Phase(epochs=1, trains=["head"]),
        bnfreeze.Phase(epochs=1, from_="c3"),
        bnfreeze.Phase(epochs=1, from_="c2", learning_rate=1e-4),
    ]
    result = bnfreeze.finetune(
        model, phases, x, y, batch_size=4, shuffle=False, verbose=0, callbacks=[probe]
    )
    boundaries = []
    for before, after in zip(probe.end, probe.begin[1:], strict=False):
        carried = sorted(k for k in after["slots"] if k in before["slots"])
        new = sorted(k for k in after["slots"] if k not in before["slots"])
        boundaries.append(
            {
                "iterations_end": before["iterations"],
                "iterations_begin": after["iterations"],
                "carried": len(carried),
                "carried_equal": all(
                    np.array_equal(after["slots"][k], before["slots"][k]) for k in carried
                ),
                "carried_nonzero": sum(bool(np.any(before["slots"][k])) for k in carried),
                "new": len(new),
                "new_zero": all(not np.any(after["slots"][k]) for k in new),
            }
        )
    return {
        "boundaries": boundaries,
        "reported": [
            None if p.carry is None else [p.carry.carried, p.carry.zeroed, p.carry.iterations]
            for p in result.phases
        ],
        "final_iterations": int(model.optimizer.iterations.numpy()),
        "finite": all(np.isfinite(v.numpy()).all() for v in model.variables),
    }


# ------------------------------------------------- 4. discriminative rates, SGD, one step
def gradients(model: keras.Model, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    fn = loss()
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            value = fn(y, model(x, training=True))
        grads = tape.gradient(value, model.trainable_variables)
        return {
            v.path: np.asarray(g) for v, g in zip(model.trainable_variables, grads, strict=True)
        }
    import jax

    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]

    def compute(tv):
        out, _ = model.stateless_call(tv, frozen, x, training=True)
        return fn(y, out)

    grads = jax.grad(compute)(trainable)
    return {v.path: np.asarray(g) for v, g in zip(model.trainable_variables, grads, strict=True)}


def rates_case() -> dict:
    keras.utils.set_random_seed(3)
    inp = keras.Input((6,))
    h = keras.layers.Dense(5, activation="tanh", name="low")(inp)
    h = keras.layers.Dense(5, activation="tanh", name="mid")(h)
    out = keras.layers.Dense(2, name="head")(h)
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.SGD(0.5), loss())
    rng = np.random.RandomState(4)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = rng.randint(0, 2, 16)
    grads = gradients(model, x, y)  # every layer trainable: the phase trains them all
    before = values(model)
    rates = {"low": 0.1, "mid": 0.01}
    phase = bnfreeze.Phase(epochs=1, learning_rate=0.001, learning_rates=rates)
    result = bnfreeze.finetune(model, [phase], x, y, batch_size=16, shuffle=False, verbose=0)
    after = values(model)
    expected_rate = {"low": 0.1, "mid": 0.01, "head": 0.001}
    errors = {}
    for path, g in grads.items():
        rate = expected_rate[path.split("/")[0]]
        delta = before[path] - after[path]
        errors[path] = float(np.max(np.abs(delta - rate * g)) / (np.max(np.abs(rate * g)) + 1e-12))
    return {"errors": errors, "optimizer": result.phases[0].optimizer}


# ------------------------------------------- 5. a plan by path; strict; errors before fit()
PLAN = """
[plan]
name = "two-phase"

[[phase]]
name = "head"
max_depth = 0
epochs = 1
learning_rate = 1e-3

[[phase]]
from = "${first}"
epochs = 2
learning_rate = 1e-4

[params]
first = "c3"
"""


def plan_case() -> dict:
    import tempfile

    x, y = data()
    model = tiny(4)
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), loss())
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "two.toml")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(PLAN)
        result = bnfreeze.finetune(
            model, path, x, y, params={"first": "c2"}, batch_size=8, verbose=0
        )
    return {
        "labels": [p.label for p in result.phases],
        "boundaries": list(result.boundaries),
        "epochs_run": [p.epochs_run for p in result.phases],
        "optimizer": [p.optimizer for p in result.phases],
        "trains": [sorted(p.declaration.trains) for p in result.phases],
        "carry": [None if p.carry is None else p.carry.carried for p in result.phases],
        "ok": result.ok,
    }


class Block(keras.layers.Layer):
    """A custom layer whose Python code calls its BN with training=False: Keras runs that BN
    in inference mode whatever its flag says."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(4, 1, name="conv")
        self.bn = keras.layers.BatchNormalization(name="bn")

    def call(self, x, training=None):
        return self.bn(self.conv(x), training=False)


def strict_case() -> dict:
    x, y = data()
    keras.utils.set_random_seed(5)
    inp = keras.Input((8, 8, 3))
    h = Block(name="block")(inp)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    out = keras.layers.Dense(2, name="head")(h)
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.Adam(1e-3), loss())
    phases = [
        bnfreeze.Phase(epochs=1, trains=["head"]),
        bnfreeze.Phase(epochs=3, bn="train"),
    ]
    out_ = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loose = bnfreeze.finetune(model, phases, x, y, batch_size=4, verbose=0)
    out_["loose_problems"] = [list(p.problems) for p in loose.phases]
    out_["loose_epochs"] = [p.epochs_run for p in loose.phases]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bnfreeze.finetune(model, phases, x, y, strict=True, batch_size=4, verbose=0)
        out_["stopped"] = None
    except bnfreeze.errors.BnfreezeError as exc:
        out_["stopped"] = {
            "type": type(exc).__name__,
            "message": str(exc),
            "phases": len(exc.result.phases),
            "epochs_run": [p.epochs_run for p in exc.result.phases],
        }
    return out_


def errors_case() -> dict:
    x, y = data()
    out = {}
    model = tiny(6)
    for name, call in (
        ("uncompiled", lambda: bnfreeze.finetune(model, [bnfreeze.Phase(epochs=1)], x, y)),
        (
            "epochs",
            lambda: bnfreeze.finetune(model, [bnfreeze.Phase(epochs=1)], x, y, epochs=3),
        ),
        ("no_match", lambda: bnfreeze.finetune(model, [bnfreeze.Phase(1, trains=["nope*"])], x, y)),
        ("apply_plan", lambda: bnfreeze.finetune(model, "freeze-up-to", x, y)),
        (
            "state",
            lambda: bnfreeze.finetune(model, [bnfreeze.Phase(1)], x, y, optimizer_state="keep"),
        ),
    ):
        if name == "epochs":
            model.compile(keras.optimizers.Adam(), loss())
        before = values(model)
        try:
            call()
            out[name] = None
        except bnfreeze.errors.BnfreezeError as exc:
            out[name] = str(exc)
        out[name + "_untouched"] = all(
            np.array_equal(v, before[p]) for p, v in values(model).items()
        )
    return out


def docs_case() -> dict:
    """docs/finetune.md's complete example, run as written (TensorFlow only: the guide case
    measures the same schedule on JAX)."""
    import contextlib
    import io
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent.parent
    page = (root / "docs" / "finetune.md").read_text(encoding="utf-8")
    code = re.search(r"^```python\n(.*?)^```", page, flags=re.M | re.S).group(1)
    printed = io.StringIO()
    here = os.getcwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(printed), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(compile(code, "docs/finetune.md", "exec"), {})
    finally:
        os.chdir(here)
    shown = re.search(r"It prints:\n\n```text\n(.*?)```", page, flags=re.S).group(1)
    return {
        "printed": printed.getvalue(),
        "shown": shown,
        "warnings": sorted({type(w.message).__name__ for w in caught}),
    }


CASES = [
    ("plan", plan_case),
    ("strict", strict_case),
    ("errors", errors_case),
    ("guide", guide_case),
    ("reset", reset_case),
    ("carry", carry_case),
    ("rates", rates_case),
]
if BACKEND == "tensorflow":
    CASES.append(("docs", docs_case))

for name, case in CASES:
    try:
        results[name] = case()
    except Exception as exc:  # reported to the test, which fails with the message
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}

with open(OUT, "w", encoding="utf-8") as fh:
    json.dump(results, fh, indent=1)
