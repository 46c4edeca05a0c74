"""The walk: a saved model config, recursively, as a flat tuple of :class:`LayerRecord`.

It descends into nested Functional and Sequential models at any depth and into wrappers
(``TimeDistributed``, ``Bidirectional``, ``SpectralNormalization``) whose inner layers are in
the config. Each layer gets a path of names joined by ``/``, from the outermost container
down, e.g. ``mobilenetv2_1.00_224/block_1_expand_BN``. Custom or unknown classes are kept and
marked :attr:`LayerKind.UNKNOWN`, never dropped.

The walk knows config structure, not modes: deciding what a layer does in ``fit()`` is
``bnfreeze.model.modes``'s job.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bnfreeze.errors import ModelFormatError
from bnfreeze.limits import MAX_LAYERS, MAX_NESTING_DEPTH
from bnfreeze.model.frozen_stats import is_frozen_stats
from bnfreeze.model.keras_classes import (
    BATCHNORM_CLASSES,
    CONTAINER_CLASSES,
    OTHER_NORMALIZATION_CLASSES,
)
from bnfreeze.model.records import LayerKind, LayerRecord

#: Config keys under which a wrapper keeps the layer(s) it wraps.
WRAPPED_LAYER_KEYS = ("layer", "backward_layer")

_BUILTIN_MODULE_PREFIXES = ("keras", "tf_keras", "tensorflow")

#: Modules of Keras *operations*: ``x + 3`` on a tensor in a Functional graph is saved as an
#: ``Add`` entry from ``keras.src.ops.numpy``. Operations have no ``trainable`` flag and hold
#: no variables.
OPERATION_MODULE_PREFIXES = ("keras.src.ops.", "keras.ops.")


@dataclass(frozen=True)
class WalkedModel:
    """The model's own name and flag, and every layer below it in model order."""

    name: str
    class_name: str
    trainable: bool
    layers: tuple[LayerRecord, ...]
    lists_layers: bool  # False for a subclassed model whose config does not list its layers


def is_builtin(layer: dict[str, Any]) -> bool:
    """Whether a serialized layer is a Keras built-in rather than a custom class.

    Keras 3 records ``module`` (``keras.layers``, ``keras.src.models.functional``...) and a
    ``registered_name`` of null for built-ins; custom classes carry their own module or a
    ``Package>Name`` registered name. A legacy ``.h5`` records no module and names a
    registered class ``Package>Name`` in ``class_name`` itself. Old tf_keras configs record
    neither and are taken as built-in.
    """
    module = layer.get("module")
    registered = layer.get("registered_name")
    class_name = layer.get("class_name")
    if isinstance(class_name, str) and ">" in class_name:
        # A legacy .h5 names a registered class "Package>Name" and records no module.
        return False
    if isinstance(registered, str) and registered and registered != layer.get("class_name"):
        return False
    if module is None:
        return True
    return isinstance(module, str) and module.split(".")[0] in _BUILTIN_MODULE_PREFIXES


def is_operation(layer: dict[str, Any]) -> bool:
    """Whether a config entry is a Keras operation applied to tensors, not a layer."""
    module = layer.get("module")
    return isinstance(module, str) and module.startswith(OPERATION_MODULE_PREFIXES)


def classify(layer: dict[str, Any]) -> LayerKind:
    """What a serialized layer is. A custom class is :attr:`LayerKind.UNKNOWN` whatever its
    config holds, except a model that lists its layers (a Functional subclass)."""
    class_name = layer.get("class_name")
    raw = layer.get("config")
    config: dict[str, Any] = raw if isinstance(raw, dict) else {}
    if class_name == "InputLayer":
        return LayerKind.INPUT
    if is_frozen_stats(layer):
        return LayerKind.BATCHNORM  # bnfreeze's own subclass: its call is known
    builtin = is_builtin(layer)
    if isinstance(config.get("layers"), list):
        # A custom Functional subclass that lists its layers is rebuilt from that graph by
        # Functional.from_config, so its structure is the one recorded.
        return LayerKind.CONTAINER
    if not builtin:
        # Decided before structure: a custom Wrapper subclass keeps its inner layer under
        # "layer" like TimeDistributed, but its own call() decides how that layer is called
        # (training=False passed in Python wins everywhere), which the config cannot show.
        return LayerKind.UNKNOWN
    if any(isinstance(config.get(k), dict) for k in WRAPPED_LAYER_KEYS):
        return LayerKind.WRAPPER
    if class_name in BATCHNORM_CLASSES:
        return LayerKind.BATCHNORM
    if class_name in OTHER_NORMALIZATION_CLASSES:
        return LayerKind.NORMALIZATION
    if class_name in CONTAINER_CLASSES:
        # A Functional/Sequential whose config lists no layers: nothing to descend into.
        return LayerKind.CONTAINER
    return LayerKind.LAYER


def call_kwargs(layer: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """Keyword arguments recorded at each call site, from ``inbound_nodes``.

    Keras 3 records ``[{"args": [...], "kwargs": {...}}, ...]``; tf_keras records
    ``[[[name, node, tensor, kwargs], ...], ...]``. Layers inside a Sequential record none.
    """
    nodes = layer.get("inbound_nodes")
    found: list[dict[str, Any]] = []
    if not isinstance(nodes, list):
        return ()
    for node in nodes:
        if isinstance(node, dict):
            kwargs = node.get("kwargs")
            if isinstance(kwargs, dict):
                found.append(kwargs)
        elif isinstance(node, list):
            for entry in node:
                if isinstance(entry, list) and len(entry) >= 4 and isinstance(entry[3], dict):
                    found.append(entry[3])
    return tuple(found)


def walk(config: dict[str, Any], source: str = "the model") -> WalkedModel:
    """Walk a top-level model config (``{"class_name", "config": {...}}``)."""
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        raise ModelFormatError(f"{source}: the model config is not an object.")
    root = config["config"]
    model_name = root.get("name")
    trainable = _flag(root, source, f"model {model_name or config.get('class_name')!r}")
    layers = root.get("layers")
    records: list[LayerRecord] = []
    if layers is not None:
        _walk_list(layers, ("config", "layers"), "", None, 0, records, source)
    seen: set[str] = set()
    for record in records:
        if record.path in seen:
            raise ModelFormatError(
                f"{source}: two layers have the path {record.path!r}; Keras requires unique "
                "layer names within a model."
            )
        seen.add(record.path)
    name = root.get("name")
    return WalkedModel(
        name=name if isinstance(name, str) else "",
        class_name=str(config.get("class_name")),
        trainable=True if trainable is None else trainable,
        layers=tuple(records),
        lists_layers=isinstance(layers, list),
    )


def _flag(config: dict[str, Any], source: str, what: str) -> bool | None:
    value = config.get("trainable")
    if value is None or isinstance(value, bool):
        return value
    raise ModelFormatError(f"{source}: {what} has trainable={value!r}; it must be true or false.")


def _walk_list(
    layers: Any,
    config_path: tuple[str | int, ...],
    prefix: str,
    parent: str | None,
    depth: int,
    out: list[LayerRecord],
    source: str,
) -> None:
    if not isinstance(layers, list):
        raise ModelFormatError(f"{source}: 'layers' of {parent or 'the model'} is not a list.")
    for index, layer in enumerate(layers):
        _walk_layer(layer, (*config_path, index), prefix, parent, depth, out, source)


def _walk_layer(
    layer: Any,
    config_path: tuple[str | int, ...],
    prefix: str,
    parent: str | None,
    depth: int,
    out: list[LayerRecord],
    source: str,
) -> None:
    class_name, config, name = _layer_parts(layer, parent, depth, len(out), source)
    record = _record(layer, class_name, config, name, config_path, prefix, parent, depth, source)
    out.append(record)
    path = record.path
    if record.kind is LayerKind.CONTAINER and config.get("layers") is not None:
        _walk_list(
            config["layers"],
            (*config_path, "config", "layers"),
            path + "/",
            path,
            depth + 1,
            out,
            source,
        )
    elif record.kind is LayerKind.WRAPPER:
        for key in WRAPPED_LAYER_KEYS:
            inner = config.get(key)
            if isinstance(inner, dict):
                _walk_layer(
                    inner, (*config_path, "config", key), path + "/", path, depth + 1, out, source
                )


def _layer_parts(
    layer: Any, parent: str | None, depth: int, walked: int, source: str
) -> tuple[str, dict[str, Any], str]:
    """A layer's class name, config and name, or a ModelFormatError that says which is
    missing (or that the model is nested too deep or has too many layers)."""
    where = parent or "the model"
    if depth > MAX_NESTING_DEPTH:
        raise ModelFormatError(
            f"{source}: models nested more than {MAX_NESTING_DEPTH} deep; refusing to walk it."
        )
    if walked >= MAX_LAYERS:
        raise ModelFormatError(f"{source}: more than {MAX_LAYERS} layers; refusing to walk it.")
    if not isinstance(layer, dict):
        raise ModelFormatError(f"{source}: a layer of {where} is not an object.")
    class_name = layer.get("class_name")
    if not isinstance(class_name, str):
        raise ModelFormatError(f"{source}: a layer of {where} has no class_name.")
    config = layer.get("config")
    if not isinstance(config, dict):
        raise ModelFormatError(f"{source}: layer of class {class_name} in {where} has no config.")
    name = config.get("name", layer.get("name"))
    if not isinstance(name, str) or not name:
        raise ModelFormatError(f"{source}: a {class_name} layer in {where} has no name.")
    return class_name, config, name


def _record(
    layer: dict[str, Any],
    class_name: str,
    config: dict[str, Any],
    name: str,
    config_path: tuple[str | int, ...],
    prefix: str,
    parent: str | None,
    depth: int,
    source: str,
) -> LayerRecord:
    """The record of one layer, as its config says it."""
    path = prefix + name
    kind = classify(layer)
    trainable = _flag(config, source, f"layer {path!r}")
    if trainable is None and kind is not LayerKind.INPUT and not is_operation(layer):
        trainable = True  # Keras's default when the key is absent
    module = layer.get("module")
    return LayerRecord(
        path=path,
        name=name,
        class_name=class_name,
        kind=kind,
        depth=depth,
        parent=parent,
        trainable=trainable,
        call_kwargs=call_kwargs(layer),
        config_path=config_path,
        synchronized=config.get("synchronized") is True,
        scale=config.get("scale") is not False,
        center=config.get("center") is not False,
        renorm=config.get("renorm") is True,
        momentum=_momentum(config) if kind is LayerKind.BATCHNORM else None,
        module=module if isinstance(module, str) else None,
        # bnfreeze's own subclass is a known class, not a custom one.
        custom=not is_builtin(layer) and not is_frozen_stats(layer),
        frozen_stats=is_frozen_stats(layer),
    )


def ancestors(layers: tuple[LayerRecord, ...], record: LayerRecord) -> Iterator[LayerRecord]:
    """The containers above ``record``, nearest first."""
    by_path = {r.path: r for r in layers}
    parent = record.parent
    while parent is not None:
        node = by_path[parent]
        yield node
        parent = node.parent


def descendants(layers: tuple[LayerRecord, ...], record: LayerRecord) -> Iterator[LayerRecord]:
    """Every layer below ``record``, in model order."""
    prefix = record.path + "/"
    return (r for r in layers if r.path.startswith(prefix))


def _momentum(config: dict[str, Any]) -> float | None:
    value = config.get("momentum")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
