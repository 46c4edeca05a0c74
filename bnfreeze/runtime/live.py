"""A live ``keras.Model`` seen through bnfreeze's records: the same
:class:`~bnfreeze.model.records.LayerRecord` values and inspect
:class:`~bnfreeze.model.records.Report` as for a saved file.

Layer paths follow the walk's scheme (:mod:`bnfreeze.model.walk`): names joined by ``/`` from the
outermost container down, through nested models, wrappers (``TimeDistributed.layer``,
``Bidirectional.forward_layer`` / ``backward_layer``) and the sublayers of custom layers. Two
corrections only a live model allows: a custom BatchNormalization subclass is a BN
(``isinstance``, docs/semantics.md, rule 7), and layers a config does not list (a subclassed
model's, a custom layer's sublayers) are found on the object.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from bnfreeze.errors import ModelFormatError
from bnfreeze.model import diagnostics, modes
from bnfreeze.model.assignments import Flags
from bnfreeze.model.keras_classes import OTHER_NORMALIZATION_CLASSES
from bnfreeze.model.records import (
    LayerKind,
    LayerRecord,
    ModelFile,
    ModelFormat,
    Report,
    Runtime,
    WeightIndex,
)
from bnfreeze.model.walk import walk
from bnfreeze.runtime import environment
from bnfreeze.runtime.branches import is_frozen_stats_layer
from bnfreeze.runtime.measure import graph_layers, held_layers

_BUILTIN_PREFIXES = ("keras", "tf_keras", "tensorflow")


def _keras_of(obj: Any) -> Any:
    return environment.keras_module(runtime_of(obj))


def runtime_of(obj: Any) -> Runtime:
    """The Keras a live layer or model belongs to: ``tf_keras`` (Keras 2) or Keras 3. Never
    imports tf_keras: an object of it exists only if the caller imported it."""
    tf_keras = sys.modules.get("tf_keras")
    if tf_keras is not None and isinstance(obj, tf_keras.layers.Layer):
        return Runtime.TF_KERAS
    return Runtime.KERAS3


def _is_builtin(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] in _BUILTIN_PREFIXES


def children(layer: Any) -> list[Any]:
    """The layers directly below ``layer`` in bnfreeze's path scheme.

    A model's ``layers``, then the layers with variables it holds outside its graph
    (:func:`bnfreeze.runtime.measure.held_layers`: a keras-hub backbone's wrapped encoder);
    a wrapper's wrapped layer(s); the sublayers of a custom layer. A built-in layer made of
    sublayers (``MultiHeadAttention``, say) is one leaf, as in the saved config.
    """
    keras = _keras_of(layer)
    if isinstance(layer, keras.Model):
        return list(layer.layers) + held_layers(keras, layer)
    inner = [
        getattr(layer, attr)
        for attr in ("forward_layer", "backward_layer")
        if isinstance(getattr(layer, attr, None), keras.layers.Layer)
    ]
    if not inner and isinstance(getattr(layer, "layer", None), keras.layers.Layer):
        inner = [layer.layer]
    if inner or _is_builtin(layer):
        return inner
    return list(layer._flatten_layers(include_self=False, recursive=False))


def live_layers(model: Any) -> dict[str, Any]:
    """Every layer below ``model``, by path, in model order. A layer a model holds outside
    its graph comes after the graph's layers, once, and only when no graph reaches it (a
    layer that one does keeps its path there)."""
    out: dict[str, Any] = {}
    keras = _keras_of(model)
    graph = graph_layers(keras, model, children)
    placed: set[int] = set()

    def visit(layer: Any, prefix: str, depth: int, held: bool) -> None:
        if depth > 64:
            raise ModelFormatError("the model nests layers more than 64 deep.")
        listed = {id(c) for c in layer.layers} if isinstance(layer, keras.Model) else None
        for child in children(layer):
            inside = held or (listed is not None and id(child) not in listed)
            if inside and (id(child) in graph or id(child) in placed):
                continue
            placed.add(id(child))
            path = prefix + child.name
            if path in out:
                raise ModelFormatError(
                    f"two layers share the path {path!r}; bnfreeze cannot address them apart."
                )
            out[path] = child
            visit(child, path + "/", depth + 1, inside)

    visit(model, "", 0, False)
    return out


def _live_kind(layer: Any, has_children: bool) -> LayerKind:
    keras = _keras_of(layer)
    if isinstance(layer, keras.layers.InputLayer):
        return LayerKind.INPUT
    if isinstance(layer, keras.layers.BatchNormalization):
        return LayerKind.BATCHNORM
    if isinstance(layer, keras.Model):
        return LayerKind.CONTAINER
    if has_children:
        wrapper = any(hasattr(layer, a) for a in ("layer", "forward_layer"))
        return LayerKind.WRAPPER if wrapper else LayerKind.CONTAINER
    if not _is_builtin(layer):
        return LayerKind.UNKNOWN
    if type(layer).__name__ in OTHER_NORMALIZATION_CLASSES:
        return LayerKind.NORMALIZATION
    return LayerKind.LAYER


def serialized_config(model: Any) -> dict[str, Any]:
    """The model's config as Keras saves it (``serialize_keras_object``); a minimal one for a
    subclassed model whose ``get_config`` cannot serialize it. A tf_keras model's config has
    the Keras 2 layout, the one legacy ``.h5`` files hold, which the walk reads too."""
    keras = _keras_of(model)
    try:
        config = keras.saving.serialize_keras_object(model)
    except Exception:
        config = None
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        config = {
            "class_name": type(model).__name__,
            "config": {"name": model.name, "trainable": bool(model.trainable)},
        }
    return config


@dataclass(frozen=True)
class LiveModel:
    """A live model seen through bnfreeze's records."""

    model: Any
    config: dict[str, Any]
    records: tuple[LayerRecord, ...]
    layers: dict[str, Any]  # path -> live layer, for the records that have one

    def flags(self) -> Flags:
        return {r.path: r.trainable for r in self.records}


def live_model(model: Any) -> LiveModel:
    """Records for a live model, the same as :func:`bnfreeze.model.walk.walk` gives for its saved
    config, with two corrections only a live model allows: a custom BN subclass is a BN
    (``isinstance``), and layers the config does not list (a subclassed model's, a custom
    layer's sublayers) are found on the object."""
    config = serialized_config(model)
    live = live_layers(model)
    try:
        walked = walk(config, f"model {model.name!r}")
        walked_records: tuple[LayerRecord, ...] = walked.layers
    except ModelFormatError:
        walked_records = ()
    by_path = {r.path: r for r in walked_records}
    if walked_records and set(live) <= set(by_path):
        records = tuple(_corrected(r, live.get(r.path)) for r in walked_records)
    else:
        records = tuple(_from_live(live, by_path))
    return LiveModel(model=model, config=config, records=records, layers=live)


def _corrected(record: LayerRecord, layer: Any) -> LayerRecord:
    if layer is None:
        return record
    keras = _keras_of(layer)
    updates: dict[str, Any] = {}
    is_bn = isinstance(layer, keras.layers.BatchNormalization)
    if is_bn and record.kind is not LayerKind.BATCHNORM:
        updates["kind"] = LayerKind.BATCHNORM
    if record.kind is not LayerKind.INPUT and record.trainable is not bool(layer.trainable):
        updates["trainable"] = bool(layer.trainable)
    if is_frozen_stats_layer(layer) is not record.frozen_stats:
        updates["frozen_stats"] = is_frozen_stats_layer(layer)
    return replace(record, **updates) if updates else record


def _from_live(live: Mapping[str, Any], walked: Mapping[str, LayerRecord]) -> Iterator[LayerRecord]:
    paths = list(live)
    for path, layer in live.items():
        parent = path.rsplit("/", 1)[0] if "/" in path else None
        has_children = any(p.startswith(path + "/") for p in paths)
        kind = _live_kind(layer, has_children)
        known = walked.get(path)
        yield LayerRecord(
            path=path,
            name=layer.name,
            class_name=type(layer).__name__,
            kind=kind,
            depth=path.count("/"),
            parent=parent,
            trainable=None if kind is LayerKind.INPUT else bool(layer.trainable),
            call_kwargs=known.call_kwargs if known is not None else (),
            config_path=known.config_path if known is not None else (),
            synchronized=bool(getattr(layer, "synchronized", False)),
            module=type(layer).__module__,
            custom=not _is_builtin(layer) and not is_frozen_stats_layer(layer),
            frozen_stats=is_frozen_stats_layer(layer),
        )


def _has_own_weights(live: LiveModel, record: LayerRecord) -> bool | None:
    layer = live.layers.get(record.path)
    if layer is None:
        return modes.has_weights_by_class(record)
    if record.kind in (LayerKind.CONTAINER, LayerKind.WRAPPER, LayerKind.INPUT):
        return False
    return bool(layer.weights)


def live_report(
    model: Any,
    *,
    path: str | None = None,
    fmt: ModelFormat = ModelFormat.MEMORY,
    optimizer_variables: int | None = None,
    runtime: Runtime | None = None,
    live: LiveModel | None = None,
) -> Report:
    """The inspect :class:`~bnfreeze.model.records.Report` of a live model.

    The same walk, rules and warnings as for a saved file; ``has_weights`` comes from the live
    layers. ``path`` defaults to ``<in-memory model 'name'>``. ``runtime`` defaults to the
    model's own (:func:`runtime_of`); its rules are applied to the live flags
    (``loaded=False``: on tf_keras a frozen container freezes what is below it in memory).
    """
    runtime = runtime_of(model) if runtime is None else runtime
    keras = _keras_of(model)
    live = live if live is not None else live_model(model)
    compiled = environment.is_compiled(model)
    compile_config = None
    if compiled:
        with contextlib.suppress(Exception):
            compile_config = model.get_compile_config()
    variables, index = _own_variables(live)
    model_file = ModelFile(
        path=path or f"<in-memory model {model.name!r}>",
        format=fmt,
        config=live.config,
        keras_version=str(getattr(keras, "__version__", "")) or None,
        compiled=compiled,
        compile_config=compile_config,
        optimizer_variables=optimizer_variables,
        weights=WeightIndex(variables=index),
    )
    model_trainable = bool(model.trainable)
    states = modes.resolve(
        live.records,
        model_trainable=model_trainable,
        has_weights={r.path: _has_own_weights(live, r) for r in live.records},
        runtime=runtime,
    )
    findings = diagnostics.find(
        model_file,
        states,
        model_trainable=model_trainable,
        read_values=lambda names: {n: variables[n].numpy() for n in names if n in variables},
        runtime=runtime,
    )
    return Report(
        model=model_file,
        runtime=runtime,
        model_trainable=model_trainable,
        layers=states,
        warnings=findings,
    )


def _own_variables(live: LiveModel) -> tuple[dict[str, Any], dict[str, tuple[str, ...]]]:
    """Each layer's own variables, named ``<path>/<variable name>``, and their names by
    layer path: the same checks as for a file (untrained BN statistics) read them off the
    live model."""
    variables: dict[str, Any] = {}
    index: dict[str, tuple[str, ...]] = {}
    for record in live.records:
        layer = live.layers.get(record.path)
        if layer is None or _has_own_weights(live, record) is not True:
            continue
        names = []
        for variable in layer.weights:
            name = f"{record.path}/{variable.name}"
            variables[name] = variable
            names.append(name)
        index[record.path] = tuple(names)
    return variables, index
