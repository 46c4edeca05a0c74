"""Plans and phases that change BN layers' class or ``synchronized``, run for real on one
Keras 3 backend in a fresh process: ``python tests/support/plan_bn_cases.py BACKEND DIR OUT.json``.

Measured from Keras, never from bnfreeze's rules: the bytes of the archives' members, the
config Keras saved, the variables by path before and after a training batch, and what the
layer computes when Keras calls it with ``training=True``.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path

BACKEND, DIR, OUT = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
os.environ["KERAS_BACKEND"] = BACKEND

import keras  # noqa: E402
import numpy as np  # noqa: E402

import bnfreeze  # noqa: E402
import bnfreeze.layers  # noqa: E402
from bnfreeze.ops.plans import load_plan, plan_edit_request  # noqa: E402
from bnfreeze.ops.request import Output  # noqa: E402
from bnfreeze.runtime.routes import apply_plan  # noqa: E402

results: dict[str, object] = {"backend": keras.backend.backend()}


def kind(layer) -> str:
    """The layer's class: its ``__name__`` is BatchNormalization for both."""
    return (
        "frozen-stats"
        if isinstance(layer, bnfreeze.layers.FrozenStatsBatchNormalization)
        else ("batchnorm")
    )


def data() -> tuple[np.ndarray, np.ndarray]:
    """Mean 0.5: a BN layer in training mode would move its statistics (momentum 0.99)."""
    rng = np.random.RandomState(0)
    return rng.normal(0.5, 1.0, (8, 6)).astype("float32"), rng.normal(size=(8, 2)).astype("float32")


def tiny(synchronized: bool = False) -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    h = keras.layers.Dense(4, name="d1")(inp)
    h = keras.layers.BatchNormalization(name="bn1", synchronized=synchronized)(h)
    h = keras.layers.Dense(4, name="d2")(h)
    h = keras.layers.BatchNormalization(name="bn2", synchronized=synchronized)(h)
    return keras.Model(inp, keras.layers.Dense(2, name="head")(h), name="tiny")


def values(model: keras.Model) -> dict[str, np.ndarray]:
    return {v.path: np.array(v.numpy(), copy=True) for v in model.variables}


def moved(before: dict, after: dict) -> list[str]:
    return sorted(p for p in before if not np.array_equal(before[p], after[p]))


def uses_moving_statistics(layer, h: np.ndarray) -> bool:
    """Keras runs the layer with training=True; is the output the moving-statistics one?"""
    out = np.asarray(layer(h, training=True))
    mean, var = np.asarray(layer.moving_mean), np.asarray(layer.moving_variance)
    expect = (h - mean) / np.sqrt(var + layer.epsilon) * np.asarray(layer.gamma) + np.asarray(
        layer.beta
    )
    batch = (h - h.mean(0)) / np.sqrt(h.var(0) + layer.epsilon)
    return bool(np.allclose(out, expect, atol=1e-5) and not np.allclose(out, batch, atol=1e-3))


def apply(source: Path, plan_text: str, name: str) -> Path:
    plan_file = DIR / f"{name}.toml"
    plan_file.write_text(plan_text)
    out = DIR / f"{name}.keras"
    apply_plan(plan_edit_request(source, load_plan(str(plan_file)), Output(path=str(out))))
    return out


def case(fn):
    try:
        results[fn.__name__] = fn()
    except Exception as exc:  # reported, so the test shows it
        results[fn.__name__] = {"error": f"{type(exc).__name__}: {exc}"}
    return fn


@case
def synchronized_off() -> dict:
    """A file saved with synchronized=True; a plan turns it off."""
    source = DIR / "sync.keras"
    model = tiny(synchronized=True)
    model.compile(optimizer="adam", loss="mse")
    model.fit(*data(), epochs=1, verbose=0)
    model.save(source)
    out = apply(source, '[[rule]]\nonly = "bn"\nsynchronized = false\n', "sync_off")
    with zipfile.ZipFile(source) as a, zipfile.ZipFile(out) as b:
        same_weights = a.read("model.weights.h5") == b.read("model.weights.h5")
        config = json.loads(b.read("config.json"))
    saved = {
        layer["config"]["name"]: layer["config"].get("synchronized")
        for layer in config["config"]["layers"]
        if layer["class_name"] == "BatchNormalization"
    }
    loaded = keras.models.load_model(out)
    before = values(model)
    return {
        "weights_member_identical": same_weights,
        "saved_synchronized": saved,
        "loaded_synchronized": {n: loaded.get_layer(n).synchronized for n in saved},
        "weights_equal_by_path": all(
            np.array_equal(before[p], v) for p, v in values(loaded).items() if p in before
        )
        and set(values(loaded)) >= {p for p in before if "/bn" in p},
    }


@case
def frozen_stats_plan() -> dict:
    """bn = "frozen-stats" on bn2 only; one fit() batch on the loaded output."""
    source = DIR / "plain.keras"
    model = tiny()
    model.compile(optimizer="adam", loss="mse")
    model.fit(*data(), epochs=1, verbose=0)
    model.save(source)
    out = apply(source, '[[rule]]\nlayers = "bn2"\nbn = "frozen-stats"\n', "frozen")
    with zipfile.ZipFile(source) as a, zipfile.ZipFile(out) as b:
        same_weights = a.read("model.weights.h5") == b.read("model.weights.h5")
    loaded = bnfreeze.load_model(out)
    loaded.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = values(loaded)
    loaded.fit(*data(), epochs=1, batch_size=8, verbose=0)
    x, _ = data()
    h = np.asarray(keras.Model(loaded.inputs, loaded.get_layer("d2").output)(x))
    return {
        "weights_member_identical": same_weights,
        "classes": {n: kind(loaded.get_layer(n)) for n in ("bn1", "bn2")},
        "moved": moved(before, values(loaded)),
        "bn2_uses_moving_statistics": uses_moving_statistics(loaded.get_layer("bn2"), h),
    }


class FirstBatch(keras.callbacks.Callback):
    """Every model variable by path before each fit() and after its first batch."""

    def __init__(self) -> None:
        super().__init__()
        self.moved: list[list[str]] = []

    def on_train_begin(self, logs=None):
        self.before = values(self.model)

    def on_train_batch_end(self, batch, logs=None):
        if batch == 0:
            self.moved.append(moved(self.before, values(self.model)))


@case
def frozen_stats_phase() -> dict:
    """Three phases: the head; every layer with bn = "frozen-stats"; then bn = "inference"."""
    model = tiny()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(*data(), epochs=1, verbose=0)  # statistics away from 0/1
    watch = FirstBatch()
    classes: list[dict[str, str]] = []

    class Classes(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            classes.append({n: kind(model.get_layer(n)) for n in ("bn1", "bn2")})

    x, y = data()
    result = bnfreeze.finetune(
        model,
        [
            bnfreeze.Phase(epochs=1, trains="head"),
            bnfreeze.Phase(epochs=1, bn="frozen-stats"),
            bnfreeze.Phase(epochs=1, trains="head", bn="train"),
        ],
        x,
        y,
        batch_size=8,
        verbose=0,
        callbacks=[watch, Classes()],
    )
    second = result.phases[1].guard
    return {
        "classes": classes,
        "moved": watch.moved,
        "problems": [list(p.problems) for p in result.phases],
        "guard_moving": sorted(
            m.path
            for m in second.measured
            if m.normalizes_with is not None and m.normalizes_with.value == "moving"
        ),
        "declared": sorted(result.phases[1].declaration.bn_frozen_stats),
    }


Path(OUT).write_text(json.dumps(results, indent=1), encoding="utf-8")
