"""Layers that code builds: BN layers the config does not list, found in the weights file.

A keras-hub ``Backbone`` or task, a registered custom ``Functional``/``Model`` subclass and a
custom layer that holds ``BatchNormalization`` as attributes (``self.bn1 = ...``) save their
*constructor arguments*, not a layer list: Keras rebuilds their layers by running
``__init__`` when it loads the file. The weights file still holds every variable, grouped
by layer. This module finds the groups beneath each such container (a *code-built owner*),
recognises BatchNormalization only from what the file proves, and describes each as a
:class:`~bnfreeze.model.records.LayerRecord` with ``source=WEIGHTS``.

What the file proves:

* a ``.keras`` group in a layer list is named by the layer's class and index
  (``batch_normalization_3``): that name says "BatchNormalization";
* a legacy ``.h5`` names each variable (``.../moving_mean``, ``.../moving_variance``);
* otherwise, the structure: four 1-D variables of the same length (gamma, beta, moving mean,
  moving variance, in the order ``BatchNormalization.build`` creates them) whose last,
  the moving variance, is non-negative.

Two or three same-length vectors (a BN with ``center``/``scale`` off, but equally a
LayerNormalization's gamma and beta) are BN only when the class name proves it; when only a
layer or attribute name hints at BN (``bn``, ``batch_norm``), the group is reported as
undecided (``is_batchnorm: null`` and a warning), never guessed. LayerNormalization,
GroupNormalization and the other normalizations without moving statistics are never BN.

The flags of these layers are not saved, so after loading each reads ``trainable=True``:
Keras's rebuild does not pass the container's saved ``trainable=False`` down (see the
docs/keras-hub.md, "keras-hub and code-built models").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bnfreeze.model.records import LayerKind, LayerRecord, LayerSource, ModelFile, ModelFormat
from bnfreeze.model.walk import WalkedModel

#: keras-hub registers its classes as ``keras_hub>ClassName``.

#: snake_case class names of BatchNormalization, as a ``.keras`` layer list names groups.
_BN_GROUP_CLASSES = frozenset({"batch_normalization", "sync_batch_normalization"})
#: ... and of the normalizations that are not BN (no moving statistics).
_OTHER_NORM_GROUP_CLASSES = frozenset(
    {
        "layer_normalization",
        "group_normalization",
        "unit_normalization",
        "rms_normalization",
        "normalization",
        "spectral_normalization",
    }
)
_GROUP_INDEX = re.compile(r"^(.*?)(?:_\d+)?$")
#: Names that hint at BN without proving it: "bn", "bn1", "conv_bn", "batch_norm", "batchnorm".
_BN_HINT = re.compile(r"(?:^|[_/])(?:bn\d*|batch_?norm\w*)(?:$|[_/\d])", re.IGNORECASE)

_BN_VARIABLES = ("gamma", "beta", "moving_mean", "moving_variance")
_RENORM_VARIABLES = ("moving_stddev", "renorm_mean", "renorm_stddev")


@dataclass(frozen=True)
class Owner:
    """A container whose layers code builds: the model itself (``path`` "") or a layer."""

    path: str
    class_name: str
    trainable: bool  # the flag the config stores for the container itself
    depth: int  # the depth of the rows below it
    #: Serialized among another owner's constructor arguments (``config.backbone``): the walk
    #: has no row for it, so one is added.
    argument: bool = False


@dataclass(frozen=True)
class Group:
    """One layer's variable group in the weights file."""

    path: str  # bnfreeze's layer path: layer names joined by "/"
    key: str  # the group's own name in the file: a class-and-index name or an attribute
    datasets: tuple[str, ...]  # in creation order
    in_layer_list: bool  # the group is an entry of a layer list (its key names the class)
    order: tuple[int | str, ...] = ()  # sorts a .keras layer list's groups in creation order


@dataclass(frozen=True)
class CodeBuilt:
    """What the weights file adds to the walk."""

    owners: tuple[Owner, ...]
    records: tuple[LayerRecord, ...]  # BN layers and undecided groups, with source WEIGHTS
    datasets: dict[str, tuple[str, ...]]  # each new record's variable datasets, by path
    #: Walked owners (custom layers) whose variables include their sublayers': Keras rebuilds
    #: those sublayers trainable, so these weights train even when the owner's flag is False.
    rebuilt_weights: frozenset[str] = frozenset()


def owners(walked: WalkedModel, config: dict[str, Any]) -> tuple[Owner, ...]:
    """The containers whose layers the saved config does not list: the model itself when its
    config has no layer list, every custom (or keras-hub) layer of the walk, and the layers
    serialized among such a container's constructor arguments (a keras-hub task's
    ``config.backbone``)."""
    found: list[Owner] = []
    if not walked.lists_layers:
        found.append(Owner("", str(config.get("class_name")), walked.trainable, 0))
        _nested(config.get("config"), "", 0, found)
    for record in walked.layers:
        if record.kind is LayerKind.UNKNOWN:
            node: Any = config
            for key in record.config_path:
                try:
                    node = node[key]
                except (KeyError, IndexError, TypeError):
                    node = None
                    break
            arguments = node.get("config") if isinstance(node, dict) else None
            if isinstance(arguments, dict) and isinstance(arguments.get("layer"), dict):
                # A custom keras.layers.Wrapper: its own call() decides how the wrapped layer
                # is called (a training=False written there wins), so no mode is claimed for
                # what it wraps; the walk gives it an unknown-layer warning.
                continue
            trainable = record.trainable is not False
            found.append(Owner(record.path, record.class_name, trainable, record.depth + 1))
            if isinstance(node, dict):
                _nested(arguments, record.path + "/", record.depth + 1, found)
    return tuple(found)


def _nested(arguments: Any, prefix: str, depth: int, out: list[Owner]) -> None:
    """Layers serialized as constructor arguments (``{"class_name", "config": {"name",
    "trainable", ...}}``), as owners below ``prefix``."""
    if not isinstance(arguments, dict) or depth > 32:
        return
    for key, value in arguments.items():
        if key == "layers" or not isinstance(value, dict):
            continue
        inner = value.get("config")
        if not (isinstance(value.get("class_name"), str) and isinstance(inner, dict)):
            continue
        name = inner.get("name")
        if not isinstance(name, str) or not name or "trainable" not in inner:
            continue
        if isinstance(inner.get("layers"), list):
            continue  # a model with a layer list inside arguments: not walked, not ours
        path = prefix + name
        trainable = inner.get("trainable") is not False
        out.append(Owner(path, value["class_name"], trainable, depth + 1, argument=True))
        _nested(inner, path + "/", depth + 1, out)


def wrapped(walked: WalkedModel, config: dict[str, Any]) -> tuple[LayerRecord, ...]:
    """The inner layer of each custom ``keras.layers.Wrapper`` (its config holds it under
    ``layer``), as a row below the wrapper: listed, with its stored flag, so that verify's
    measurement of it is matched; its mode is left to the wrapper's own ``call()``
    (:attr:`LayerRecord.call_decided_by`)."""
    from bnfreeze.model.walk import is_builtin

    out: list[LayerRecord] = []
    listed = {r.path for r in walked.layers}
    for record in walked.layers:
        if record.kind is not LayerKind.UNKNOWN:
            continue
        node: Any = config
        for key in record.config_path:
            try:
                node = node[key]
            except (KeyError, IndexError, TypeError):
                node = None
                break
        arguments = node.get("config") if isinstance(node, dict) else None
        inner = arguments.get("layer") if isinstance(arguments, dict) else None
        if not isinstance(inner, dict) or not isinstance(inner.get("config"), dict):
            continue
        inner_config = inner["config"]
        name = inner_config.get("name")
        class_name = inner.get("class_name")
        if not isinstance(name, str) or not isinstance(class_name, str):
            continue
        path = f"{record.path}/{name}"
        if path in listed:
            continue
        bn = class_name in ("BatchNormalization", "SyncBatchNormalization") and is_builtin(inner)
        out.append(
            LayerRecord(
                path=path,
                name=name,
                class_name=class_name,
                kind=LayerKind.BATCHNORM if bn else LayerKind.UNKNOWN,
                depth=record.depth + 1,
                parent=record.path,
                trainable=inner_config.get("trainable") is not False,
                scale=inner_config.get("scale") is not False,
                center=inner_config.get("center") is not False,
                renorm=inner_config.get("renorm") is True,
                custom=not is_builtin(inner),
                config_path=(*record.config_path, "config", "layer"),
                call_decided_by=record.path,
            )
        )
    return tuple(out)


def find(
    model: ModelFile,
    walked: WalkedModel,
    *,
    read_shapes: Callable[[list[str]], dict[str, tuple[int, ...]]],
    read_values: Callable[[list[str]], dict[str, object]],
) -> CodeBuilt:
    """The BN layers (and undecided groups) below the model's code-built owners."""
    found_owners = owners(walked, model.config)
    if model.weights is None or not found_owners:
        return CodeBuilt(found_owners, (), {})
    rebuilt = frozenset(
        owner.path
        for owner in found_owners
        if owner.path and not owner.argument and _holds_sublayer_weights(model, owner.path)
    )
    candidates = _candidates(model, walked, found_owners, read_shapes)
    variances = read_values([v.variance for _, _, v in candidates if v.variance is not None])
    records = [_argument_record(owner) for owner in found_owners if owner.argument]
    datasets: dict[str, tuple[str, ...]] = {}
    for owner, group, verdict in candidates:
        kind = verdict.kind
        if kind is LayerKind.BATCHNORM and verdict.variance is not None:
            value = variances.get(verdict.variance)
            if value is None:
                kind = LayerKind.UNKNOWN  # unreadable: cannot tell
            elif not _non_negative(value):
                continue  # a moving variance is never negative: not BN
        if kind is LayerKind.UNKNOWN and not _hints_bn(group):
            continue
        records.append(_record(owner, group, kind, verdict))
        datasets[group.path] = group.datasets
    return CodeBuilt(found_owners, tuple(records), datasets, rebuilt)


def _candidates(
    model: ModelFile,
    walked: WalkedModel,
    found_owners: tuple[Owner, ...],
    read_shapes: Callable[[list[str]], dict[str, tuple[int, ...]]],
) -> list[tuple[Owner, Group, _Verdict]]:
    """The weight groups the config does not list, below a code-built owner, whose shapes
    look like a layer's (:func:`_structure`), in the order of the file."""
    listed = {r.path for r in walked.layers}
    groups = sorted(
        (g for g in _groups(model) if g.path not in listed and g.datasets),
        key=lambda g: g.order,
    )
    owned: list[tuple[Owner, Group]] = []
    for group in groups:
        owner = _owner_of(found_owners, group.path)
        if owner is not None:
            owned.append((owner, group))
    shapes = read_shapes([d for _, g in owned for d in g.datasets])
    candidates = []
    for owner, group in owned:
        verdict = _structure(group, shapes, model.format)
        if verdict is not None:
            candidates.append((owner, group, verdict))
    return candidates


def _argument_record(owner: Owner) -> LayerRecord:
    """A layer passed to its owner as an argument: a container of the layers found below it."""
    return LayerRecord(
        path=owner.path,
        name=owner.path.rsplit("/", 1)[-1],
        class_name=owner.class_name,
        kind=LayerKind.CONTAINER,
        depth=owner.depth - 1,
        parent=owner.path.rpartition("/")[0] or None,
        trainable=owner.trainable,
        custom=True,
    )


def _holds_sublayer_weights(model: ModelFile, path: str) -> bool:
    """Whether the layer at ``path`` holds variables through sublayers (``.../bn1/vars/0``,
    or, in a legacy ``.h5``, variables named ``<path>/conv1/kernel``)."""
    assert model.weights is not None
    index = model.weights
    if model.format is ModelFormat.H5:
        prefix = path + "/"
        return any(k.startswith(prefix) and v for k, v in index.variables.items())
    return any(d.rpartition("/vars/")[0] in index.names for d in index.variables.get(path, ()))


@dataclass(frozen=True)
class _Verdict:
    kind: LayerKind  # BATCHNORM, or UNKNOWN: the file cannot tell
    scale: bool
    center: bool
    variance: str | None  # the dataset to check for non-negative values
    renorm: bool = False


def _structure(
    group: Group, shapes: dict[str, tuple[int, ...]], fmt: ModelFormat
) -> _Verdict | None:
    """Whether a group is BN from what the file proves; None when it is not (or, for 2-3
    vectors without proof, an UNKNOWN verdict the caller keeps only if a name hints at BN)."""
    leaves = [d.rsplit("/", 1)[-1].split(":")[0] for d in group.datasets]
    sizes = [shapes.get(d) for d in group.datasets]
    if any(s is None for s in sizes):
        return _Verdict(LayerKind.UNKNOWN, True, True, None) if len(sizes) <= 4 else None
    vectors = all(s is not None and len(s) == 1 for s in sizes)
    same = vectors and len({s for s in sizes}) == 1
    if not all(leaf.isdigit() for leaf in leaves):
        # A legacy .h5 names its variables: moving statistics prove BN.
        if not same or "moving_mean" not in leaves or "moving_variance" not in leaves:
            return None
        if set(leaves) - set(_BN_VARIABLES) - set(_RENORM_VARIABLES):
            return None
        variance = group.datasets[leaves.index("moving_variance")]
        renorm = bool(set(leaves) & set(_RENORM_VARIABLES))
        return _Verdict(LayerKind.BATCHNORM, "gamma" in leaves, "beta" in leaves, variance, renorm)
    if same and len(sizes) == len(_BN_VARIABLES) + len(_RENORM_VARIABLES):
        # BatchNormalization(renorm=True) (Keras 3.14+): gamma, beta, moving mean and
        # variance, then moving_stddev, renorm_mean, renorm_stddev, in build() order.
        named_class = _GROUP_INDEX.match(group.key)
        klass = named_class.group(1) if (named_class and group.in_layer_list) else None
        if klass in _OTHER_NORM_GROUP_CLASSES:
            return None
        return _Verdict(LayerKind.BATCHNORM, True, True, group.datasets[3], renorm=True)
    if not same or not 2 <= len(sizes) <= 4:
        return None
    named_class = _GROUP_INDEX.match(group.key)
    klass = named_class.group(1) if (named_class and group.in_layer_list) else None
    if klass in _OTHER_NORM_GROUP_CLASSES:
        return None
    variance = group.datasets[-1]
    if len(sizes) == 4:
        return _Verdict(LayerKind.BATCHNORM, True, True, variance)
    if klass in _BN_GROUP_CLASSES:
        # center or scale off: which one cannot be told, and it does not change the mode.
        return _Verdict(LayerKind.BATCHNORM, len(sizes) == 3, False, variance)
    return _Verdict(LayerKind.UNKNOWN, len(sizes) == 3, False, None)


def _hints_bn(group: Group) -> bool:
    return bool(_BN_HINT.search(group.path) or _BN_HINT.search(group.key))


def _non_negative(value: object) -> bool:
    if hasattr(value, "ravel"):  # numpy, from h5py
        value = value.ravel().tolist()
    values = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    try:
        return all(float(v) >= 0.0 for v in values)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _record(owner: Owner, group: Group, kind: LayerKind, verdict: _Verdict) -> LayerRecord:
    prefix = owner.path + "/" if owner.path else ""
    relative = group.path[len(prefix) :]
    return LayerRecord(
        path=group.path,
        name=relative.rsplit("/", 1)[-1],
        class_name="BatchNormalization" if kind is LayerKind.BATCHNORM else "unknown",
        kind=kind,
        depth=owner.depth,
        parent=owner.path or None,
        trainable=True,  # not saved: Keras rebuilds the layer with its default flag
        scale=verdict.scale,
        center=verdict.center,
        renorm=verdict.renorm,
        source=LayerSource.WEIGHTS,
    )


def _owner_of(found: tuple[Owner, ...], path: str) -> Owner | None:
    """The nearest code-built owner above ``path`` (the model's own, "", is above all)."""
    best: Owner | None = None
    for owner in found:
        above = owner.path == "" or path.startswith(owner.path + "/")
        if above and (best is None or len(owner.path) > len(best.path)):
            best = owner
    return best


def _groups(model: ModelFile) -> list[Group]:
    """Every layer's variable group in the weights file, with bnfreeze's layer path."""
    assert model.weights is not None
    index = model.weights
    out: list[Group] = []
    if model.format is ModelFormat.H5:
        # The legacy index is already by layer path, sublayers included (their variables are
        # named "block1a_/block1a_expand_bn/gamma").
        for path, datasets in index.variables.items():
            out.append(Group(path, path.rsplit("/", 1)[-1], datasets, False))
        return out
    for path, datasets in index.variables.items():
        # Split the layer's datasets into its own (".../<group>/vars/N") and those of the
        # sublayers it holds as attributes (".../<group>/bn1/vars/N"), whose groups the reader
        # recorded with their layer names.
        by_group: dict[str, list[str]] = {}
        for dataset in datasets:
            head, sep, _ = dataset.rpartition("/vars/")
            if sep:
                by_group.setdefault(head, []).append(dataset)
        for head, members in by_group.items():
            if head not in index.names:
                key = head.rsplit("/", 1)[-1]
                out.append(Group(path, key, tuple(members), _in_layer_list(head), _natural(head)))
                continue
            chain = []
            parts = head.split("/")
            for i in range(1, len(parts) + 1):
                name = index.names.get("/".join(parts[:i]))
                if name is not None:
                    chain.append(name)
            out.append(
                Group(
                    f"{path}/{'/'.join(chain)}",
                    parts[-1],
                    tuple(members),
                    len(parts) >= 2 and parts[-2] == "layers",
                    _natural(head),
                )
            )
    return out


def _natural(head: str) -> tuple[int | str, ...]:
    """``batch_normalization_2`` before ``batch_normalization_10``: Keras numbers a layer
    list's groups in creation order, and the file sorts them as text."""
    out: list[int | str] = []
    for part in re.split(r"(\d+)", head):
        if part:
            out.append(int(part) if part.isdigit() else part)
    return tuple(out)


def _in_layer_list(head: str) -> bool:
    parts = head.split("/")
    return len(parts) >= 2 and parts[-2] == "layers"


@dataclass(frozen=True)
class Rebuilt:
    """The layers Keras rebuilt below code-built containers, as ``inspect`` rows."""

    records: tuple[LayerRecord, ...]
    has_weights: dict[str, bool]
    #: Each record's variables, named ``<path>/<index>`` in ``layer.weights`` order, and their
    #: values: what the untrained-statistics check reads for a row found in a file.
    datasets: dict[str, tuple[str, ...]]
    values: dict[str, Any]
    keras_version: str
    #: Each layer's group in ``model.weights.h5`` (``layers/block/bn``): what Keras saves and
    #: loads it by, and what bnfreeze records its flag under (``bnfreeze.json``).
    saved: dict[str, str] = field(default_factory=dict)
