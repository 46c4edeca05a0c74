"""Flag edits: what a freeze, an unfreeze or a plan rule does to each layer's ``trainable``.

An :class:`Assignment` says what selected BN layers and selected other layers get (``None``:
left as they are). Applying it to the current flags gives new flags; comparing flags gives the
:class:`Change` list that every command prints. Containers follow Keras's own rule for
``container.trainable = X``: when an assignment sets the other layers of *every* leaf below a
container, the container's own flag is set too, as Keras would; otherwise it is left alone.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from bnfreeze.errors import ContradictoryOptions
from bnfreeze.model.records import LayerKind, LayerRecord
from bnfreeze.model.selection import is_leaf

Flags = dict[str, bool | None]


@dataclass(frozen=True)
class Assignment:
    """The flag given to selected layers: ``others`` for non-BN layers, ``batchnorm`` for BN."""

    others: bool | None
    batchnorm: bool | None

    @classmethod
    def freeze(cls, *, bn_inference: bool = False, train_bn: bool = False) -> Assignment:
        """``freeze``: everything False; ``--bn-inference``: only BN False; ``--train-bn``:
        everything False but BN True (the fastai "train_bn" recipe). Both at once raise
        :class:`~bnfreeze.errors.ContradictoryOptions`."""
        if bn_inference and train_bn:
            raise ContradictoryOptions("bn_inference", "train_bn")
        if bn_inference:
            return cls(others=None, batchnorm=False)
        return cls(others=False, batchnorm=bool(train_bn))

    @classmethod
    def unfreeze(cls, *, keep_bn_inference: bool = False) -> Assignment:
        """``unfreeze``: everything True; ``--keep-bn-inference``: BN stays False (the Keras
        guide's fine-tuning step, done right on Keras 3)."""
        return cls(others=True, batchnorm=not keep_bn_inference)

    def value_for(self, record: LayerRecord) -> bool | None:
        return self.batchnorm if record.kind is LayerKind.BATCHNORM else self.others


@dataclass(frozen=True)
class Change:
    """One layer's flag, before and after."""

    path: str
    class_name: str
    is_batchnorm: bool
    before: bool | None
    after: bool | None


def current_flags(layers: Iterable[LayerRecord]) -> Flags:
    return {r.path: r.trainable for r in layers}


def assign(
    layers: Sequence[LayerRecord],
    flags: Flags,
    selected: Sequence[LayerRecord],
    assignment: Assignment,
    *,
    without_flag: Collection[str] = (),
) -> Flags:
    """New flags after giving ``selected`` layers the assignment's values.

    ``without_flag`` names layers that store no flag (see :func:`stores_flag`): they are
    never set, and they do not keep their container from being set.
    """
    new = dict(flags)
    skip = set(without_flag)
    chosen = {r.path for r in selected if r.path not in skip}
    for record in selected:
        value = assignment.value_for(record)
        if value is not None and record.path not in skip:
            new[record.path] = value
    if assignment.others is not None:
        for container in layers:
            if container.kind not in (LayerKind.CONTAINER, LayerKind.WRAPPER):
                continue
            if container.path in skip:
                continue
            prefix = container.path + "/"
            below = [
                r for r in layers if r.path.startswith(prefix) and is_leaf(r) and r.path not in skip
            ]
            if below and all(r.path in chosen for r in below):
                new[container.path] = assignment.others
    return new


def changes(layers: Sequence[LayerRecord], before: Flags, after: Flags) -> tuple[Change, ...]:
    """Every layer whose flag differs, in model order."""
    return tuple(
        Change(
            path=r.path,
            class_name=r.class_name,
            is_batchnorm=r.is_batchnorm,
            before=before.get(r.path),
            after=after.get(r.path),
        )
        for r in layers
        if before.get(r.path) != after.get(r.path)
    )


def with_flags(layers: Sequence[LayerRecord], flags: Flags) -> tuple[LayerRecord, ...]:
    """The records as they will read after the edit."""
    return tuple(
        replace(r, trainable=flags[r.path]) if flags.get(r.path) != r.trainable else r
        for r in layers
    )


def layer_dict(config: dict[str, Any], record: LayerRecord) -> dict[str, Any]:
    """The serialized layer ``record`` came from, located by its ``config_path``."""
    node: Any = config
    for key in record.config_path:
        node = node[key]
    return node


def stores_flag(config: dict[str, Any], record: LayerRecord) -> bool:
    """Whether the saved layer dict has a ``trainable`` key.

    Keras 3 writes one for every ``Layer``. Operations recorded as layers
    (``keras.src.ops.numpy.Add`` in MobileNetV3, say) and ``InputLayer`` have none, and
    their constructors reject it: adding one makes the file fail to load ("got an
    unexpected keyword argument 'trainable'", measured). They own no variables.
    """
    inner = layer_dict(config, record).get("config")
    return isinstance(inner, dict) and "trainable" in inner


def editable(config: dict[str, Any], records: Iterable[LayerRecord]) -> tuple[LayerRecord, ...]:
    """The records whose flag can be written into ``config`` (see :func:`stores_flag`)."""
    return tuple(r for r in records if stores_flag(config, r))


def apply_to_config(
    config: dict[str, Any], layers: Sequence[LayerRecord], flags: Flags
) -> dict[str, Any]:
    """A copy of the model config with each changed layer's ``config.trainable`` set.

    Only existing keys are changed; a layer without one (see :func:`stores_flag`) must not be
    given a different flag: that raises ``ValueError``.
    """
    # Copy only the dicts and lists on the way to a changed layer (EfficientNetV2L's config
    # is ~2 MB of JSON; a deep copy of all of it costs more than the rest of an edit).
    new = dict(config)
    copied = {id(new)}
    for record in layers:
        value = flags.get(record.path)
        if value is None or value == record.trainable:
            continue
        node: Any = new
        for key in (*record.config_path, "config"):
            child = node[key]
            if id(child) not in copied:
                child = copy.copy(child)
                copied.add(id(child))
                node[key] = child
            node = child
        inner = node
        if "trainable" not in inner:
            raise ValueError(f"{record.path}: its saved config has no trainable flag to set")
        inner["trainable"] = value
    return new
