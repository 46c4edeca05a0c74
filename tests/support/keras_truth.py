"""The truth, from Keras: train a real model for one step and record what moved.

This is test code. It never applies bnfreeze's rule: it snapshots every variable, runs one
real ``fit()`` step with a fresh SGD optimizer, and compares. bnfreeze's predictions are then
checked against it (``tests/model/test_modes_measured.py``).

Layer paths use bnfreeze's scheme: names joined by "/" from the outermost container down,
through nested Functional/Sequential models and through wrappers (``TimeDistributed.layer``,
``Bidirectional.forward_layer`` / ``backward_layer``, whose names are what the saved config
records under ``layer`` / ``backward_layer``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Every input value is drawn around this mean, so that batch statistics differ visibly from
#: freshly initialised moving statistics (mean 0, variance 1).
INPUT_MEAN = 5.0


@dataclass(frozen=True)
class Moved:
    """What one layer's own variables did during one ``fit()`` step.

    ``None`` means the layer has no such variables: ``moving_stats`` and ``gamma_beta`` are
    None for every layer that is not a BatchNormalization (and ``gamma_beta`` is None for a BN
    with ``scale=False, center=False``); ``other_weights`` is None when the layer owns no
    variables besides those.
    """

    class_name: str
    is_batchnorm: bool
    moving_stats: bool | None
    gamma_beta: bool | None
    other_weights: bool | None


def layer_children(layer: Any) -> list[Any]:
    """What bnfreeze's walk descends into: a nested model's layers, a wrapper's inner
    layer(s).

    A Functional model's ``operations`` are what its config lists: its layers, and the Keras
    ops applied to its tensors (``x + 3`` is an ``Add`` operation, not a layer, and owns no
    variables). Sequential's ``layers`` leaves out its InputLayer, which owns none either.
    """
    import keras

    if isinstance(layer, keras.Model):
        operations = getattr(layer, "operations", None)
        return list(operations if isinstance(operations, list) else layer.layers)
    children = []
    for attr in ("forward_layer", "backward_layer"):
        inner = getattr(layer, attr, None)
        if isinstance(inner, keras.layers.Layer):
            children.append(inner)
    if not children:
        inner = getattr(layer, "layer", None)
        if isinstance(inner, keras.layers.Layer):
            children.append(inner)
    return children


def layer_paths(model: Any) -> dict[str, Any]:
    """Every layer below ``model``, by path, in model order."""
    out: dict[str, Any] = {}

    def visit(layer: Any, prefix: str) -> None:
        for child in layer_children(layer):
            path = prefix + child.name
            if path in out:
                raise AssertionError(f"two layers share the path {path!r}")
            out[path] = child
            visit(child, path + "/")

    visit(model, "")
    return out


def every_layer_paths(model: Any) -> dict[str, Any]:
    """Every layer Keras tracks below ``model``, by path of names: nested models' layers and
    the sublayers that custom layers, subclassed models and keras-hub classes hold as
    attributes (what ``Layer._flatten_layers`` walks), each reached once."""
    out: dict[str, Any] = {}
    seen: set[int] = set()

    def visit(layer: Any, prefix: str) -> None:
        for child in layer._flatten_layers(include_self=False, recursive=False):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = prefix + child.name
            if path in out:
                raise AssertionError(f"two layers share the path {path!r}")
            out[path] = child
            visit(child, path + "/")

    visit(model, "")
    return out


def _own_variables(layers: dict[str, Any]) -> dict[str, list[Any]]:
    """Each layer's variables, less those of the layers listed below it."""
    owned: dict[str, list[Any]] = {}
    for path, layer in layers.items():
        below = {
            id(v)
            for other, sub in layers.items()
            if other.startswith(path + "/")
            for v in getattr(sub, "weights", [])
        }
        seen: set[int] = set()
        own = []
        for v in getattr(layer, "weights", []):
            if id(v) not in below and id(v) not in seen:
                seen.add(id(v))
                own.append(v)
        owned[path] = own
    return owned


def synthetic_batch(model: Any, batch_size: int = 4, seed: int = 0) -> tuple[Any, Any]:
    """Deterministic inputs (mean ``INPUT_MEAN``) and targets matching the model's tensors."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def make(tensor: Any, mean: float) -> Any:
        shape = [batch_size] + [3 if d is None else int(d) for d in tensor.shape[1:]]
        dtype = str(tensor.dtype)
        if "int" in dtype:
            return rng.integers(0, 2, size=shape).astype(dtype)
        return rng.normal(mean, 2.0, size=shape).astype(dtype if "float" in dtype else "float32")

    xs = [make(t, INPUT_MEAN) for t in model.inputs]
    ys = [make(t, 0.0) for t in model.outputs]
    return (xs[0] if len(xs) == 1 else xs), (ys[0] if len(ys) == 1 else ys)


def snapshot(variables: dict[str, list[Any]]) -> dict[int, Any]:
    import numpy as np

    return {id(v): np.array(v.numpy(), copy=True) for vs in variables.values() for v in vs}


#: Nudge for variables that are exactly zero before the step (biases, beta, moving means):
#: weight decay cannot move a zero.
_ZERO_NUDGE = 0.01


def measure_fit_step(
    model: Any,
    *,
    batch_size: int = 4,
    learning_rate: float = 0.01,
    weight_decay: float = 0.1,
    run_eagerly: bool = True,
    seed: int = 0,
    layers: dict[str, Any] | None = None,
    data: tuple[Any, Any] | None = None,
) -> dict[str, Moved]:
    """Compile ``model`` with a fresh SGD optimizer, run one real ``fit()`` step on synthetic
    data, and report, per layer path, which of its variables moved.

    A variable can train and still not move: its gradient may be exactly zero (gamma right
    before a BN in training mode, which undoes any per-channel scale; a saturated sigmoid
    gate), or too small to change a float32. So the optimizer applies weight decay, which
    moves every variable it updates, and variables that are exactly zero are first nudged off
    zero. Which variables the optimizer updates, and which statistics BN layers update, is
    still decided by Keras alone.

    ``run_eagerly=True`` runs the same ``train_step`` without tracing a graph, which is much
    faster for a single step; a test checks both modes agree on a model where it matters.
    The model is changed (it has trained a step and is recompiled).

    ``layers`` (default :func:`layer_paths`) chooses which layers to report, by path, e.g.
    :func:`every_layer_paths`; ``data`` is an ``(x, y)`` batch for models without symbolic
    inputs (subclassed models).
    """
    import keras
    import numpy as np

    if layers is None:
        layers = layer_paths(model)
    owned = _own_variables(layers)
    for variables in owned.values():
        for v in variables:
            if "float" in str(v.dtype) and not np.any(v.numpy()):
                v.assign(np.full(v.shape, _ZERO_NUDGE, dtype=str(v.dtype)))
    x, y = data if data is not None else synthetic_batch(model, batch_size=batch_size, seed=seed)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=learning_rate, weight_decay=weight_decay),
        loss="mse",
        metrics=[],  # a keras-hub task would add its own, which may not fit the data
        run_eagerly=run_eagerly,
    )
    return _moved_during(
        layers,
        owned,
        lambda: model.fit(
            x, y, batch_size=batch_size, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False
        ),
    )


def measure_predict(model: Any, *, batch_size: int = 4, seed: int = 0) -> dict[str, Moved]:
    """Run ``predict()`` and ``evaluate()`` on synthetic data and report what moved (nothing
    should: both call the model with training=False)."""
    import keras

    layers = layer_paths(model)
    owned = _own_variables(layers)
    x, y = synthetic_batch(model, batch_size=batch_size, seed=seed)
    model.compile(optimizer=keras.optimizers.SGD(), loss="mse", run_eagerly=True)

    def run() -> None:
        model.predict(x, batch_size=batch_size, verbose=0)
        model.evaluate(x, y, batch_size=batch_size, verbose=0)

    return _moved_during(layers, owned, run)


def _moved_during(
    layers: dict[str, Any], owned: dict[str, list[Any]], run: Any
) -> dict[str, Moved]:
    import keras
    import numpy as np

    before = snapshot(owned)
    run()
    after = snapshot(owned)

    def moved(variables: list[Any]) -> bool | None:
        if not variables:
            return None
        return any(not np.array_equal(before[id(v)], after[id(v)]) for v in variables)

    result: dict[str, Moved] = {}
    for path, layer in layers.items():
        own = owned[path]
        if isinstance(layer, keras.layers.BatchNormalization):
            stats = [layer.moving_mean, layer.moving_variance]
            gamma_beta = [v for v in (layer.gamma, layer.beta) if v is not None]
            special = {id(v) for v in stats + gamma_beta}
            result[path] = Moved(
                class_name=type(layer).__name__,
                is_batchnorm=True,
                moving_stats=moved(stats),
                gamma_beta=moved(gamma_beta),
                other_weights=moved([v for v in own if id(v) not in special]),
            )
        else:
            result[path] = Moved(
                class_name=type(layer).__name__,
                is_batchnorm=False,
                moving_stats=None,
                gamma_beta=None,
                other_weights=moved(own),
            )
    return result


def edit_keras_config(src: Any, dst: Any, edit: Any) -> None:
    """Copy the ``.keras`` archive ``src`` to ``dst`` with ``edit(config)`` applied to its
    ``config.json`` (in place, on the parsed dict); every other member is copied verbatim."""
    import json
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "config.json":
                config = json.loads(data)
                edit(config)
                data = json.dumps(config).encode("utf-8")
            zout.writestr(info.filename, data)


def set_every_flag(config: dict[str, Any], value: bool) -> None:
    """Set ``trainable`` on every layer dict of a saved config, recursively (not the root)."""

    def visit(layer: dict[str, Any]) -> None:
        inner = layer.get("config", {})
        if "trainable" in inner:
            inner["trainable"] = value
        for child in inner.get("layers", []) or []:
            visit(child)
        for key in ("layer", "backward_layer"):
            if isinstance(inner.get(key), dict):
                visit(inner[key])

    for child in config["config"].get("layers", []):
        visit(child)
