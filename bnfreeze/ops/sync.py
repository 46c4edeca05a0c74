"""Turn ``synchronized`` on or off for the BatchNormalization layers of a saved model.

``BatchNormalization(synchronized=True)`` normalizes over the global batch under
``tf.distribute`` (docs/semantics.md, rule 8), but Keras accepts it only on TensorFlow: a file
that records it does not load on JAX or torch (keras-team/keras#18667). tf_keras saves its
``SyncBatchNormalization`` under that class name, which Keras 3 does not have.

:func:`set_synchronized_file` rewrites only the config, through the same writers as
``freeze`` (the weights are copied as they are; no flag changes): each selected BN layer gets
``synchronized`` set, and a tf_keras ``SyncBatchNormalization`` becomes a
``BatchNormalization`` with ``synchronized`` set, which Keras 3 loads.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnfreeze.errors import BnfreezeError, SelectionError

#: tf_keras's synchronized BN class; Keras 3 has BatchNormalization(synchronized=True).
SYNC_CLASS = "SyncBatchNormalization"


@dataclass(frozen=True)
class SyncChange:
    """One BN layer whose saved config the rewrite changes."""

    path: str
    class_before: str
    class_after: str
    synchronized_before: bool
    synchronized_after: bool


@dataclass(frozen=True)
class SyncResult:
    """What :func:`set_synchronized_file` did (or, with ``dry_run``, would do)."""

    source: str
    output: str | None  # None when nothing was written
    dry_run: bool
    synchronized: bool
    changes: tuple[SyncChange, ...]
    input_bytes: int
    output_bytes: int | None

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    @property
    def warnings(self) -> tuple[str, ...]:
        if self.synchronized and self.changes:
            return (
                "BatchNormalization(synchronized=True) loads only on TensorFlow: Keras on JAX "
                'or torch refuses the file ("Argument synchronized=True is only supported '
                'with the TensorFlow backend").',
            )
        return ()


def _node(config: dict[str, Any], config_path: Sequence[str | int]) -> Any:
    node: Any = config
    for key in config_path:
        node = node[key]
    return node


def set_synchronized_file(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    synchronized: bool,
    layers: Sequence[str] = (),
    dry_run: bool = False,
    in_place: bool = False,
) -> SyncResult:
    """Set ``synchronized`` on the BN layers of a saved ``.keras`` or legacy ``.h5`` model
    (all of them, or those ``layers`` globs select) and write the result to ``output``.

    Only the config changes; the weights are written as they are read. A tf_keras
    ``SyncBatchNormalization`` becomes ``BatchNormalization`` with ``synchronized`` set."""
    from bnfreeze.formats.atomic import write_atomically
    from bnfreeze.formats.readers import read_model, with_weights
    from bnfreeze.formats.writers import WriteRequest
    from bnfreeze.formats.writers.dispatch import writer_for
    from bnfreeze.model.assignments import Assignment, current_flags
    from bnfreeze.model.records import ModelFormat
    from bnfreeze.model.walk import walk
    from bnfreeze.ops.request import EditRequest, Output, check_output

    if not isinstance(synchronized, bool):
        raise BnfreezeError(f"synchronized takes True or False, not {synchronized!r}.")
    checked = check_output(
        EditRequest(
            model=str(path),
            assignment=Assignment(others=None, batchnorm=None),
            output=Output(
                path=None if output is None else str(output), in_place=in_place, dry_run=dry_run
            ),
        )
    )
    model = read_model(checked.path)
    if model.format is ModelFormat.MEMORY:  # pragma: no cover - read_model reads files
        raise BnfreezeError("set_synchronized_file edits saved files.")
    model = with_weights(model)
    writer = writer_for(model.format)
    if writer is None:
        raise BnfreezeError(f"{model.path}: bnfreeze cannot rewrite a {model.format.value} file.")
    walked = walk(model.config, model.path)
    new_config, changes = _set_synchronized(
        model.config, _batchnorm_layers(walked.layers, layers), synchronized
    )
    input_bytes = _size(model.path)
    out = checked.output.path
    skip = dry_run or out is None or (in_place and not changes)
    if skip:
        return SyncResult(
            model.path, None, dry_run, synchronized, tuple(changes), input_bytes, None
        )
    assert out is not None
    request = WriteRequest(
        model=model, config=new_config, layers=walked.layers, flags=current_flags(walked.layers)
    )

    def produce(tmp: Path) -> None:
        writer.write(request, tmp)

    size = write_atomically(out, produce, lambda tmp: _verify(writer, request, tmp, changes))
    return SyncResult(model.path, out, False, synchronized, tuple(changes), input_bytes, size)


def _batchnorm_layers(walked: Sequence[Any], layers: Sequence[str]) -> list[Any]:
    """The BN layers of the saved config that ``layers`` selects (all of them when empty)."""
    from bnfreeze.model.records import LayerKind
    from bnfreeze.model.selection import select

    chosen = select(walked, layers=tuple(layers)) if layers else walked
    bns = [r for r in chosen if r.kind is LayerKind.BATCHNORM and r.config_path]
    if not bns:
        raise SelectionError(
            "the selection holds no BatchNormalization layer listed in the saved config."
        )
    return bns


def _set_synchronized(
    config: dict[str, Any], bns: Sequence[Any], synchronized: bool
) -> tuple[dict[str, Any], list[SyncChange]]:
    """A copy of ``config`` with ``synchronized`` set on ``bns`` (a tf_keras
    ``SyncBatchNormalization`` becomes ``BatchNormalization``), and what changed."""
    new_config = copy.deepcopy(config)
    changes = []
    for record in bns:
        node = _node(new_config, record.config_path)
        inner = node.setdefault("config", {})
        before = record.class_name == SYNC_CLASS or inner.get("synchronized") is True
        after_class = "BatchNormalization" if record.class_name == SYNC_CLASS else record.class_name
        if before == synchronized and after_class == record.class_name:
            continue
        node["class_name"] = after_class
        inner["synchronized"] = synchronized
        changes.append(
            SyncChange(record.path, record.class_name, after_class, before, synchronized)
        )
    return new_config, changes


def _verify(writer: Any, request: Any, written: Path, changes: Sequence[SyncChange]) -> None:
    """The writer's own checks, then every changed layer reads back as asked."""
    from bnfreeze.errors import OutputError
    from bnfreeze.formats.readers import read_model
    from bnfreeze.model.walk import walk

    writer.verify(request, written)
    reread = {r.path: r for r in walk(read_model(written, weights=False).config, "").layers}
    for c in changes:
        r = reread.get(c.path)
        if r is None or r.class_name != c.class_after or r.synchronized != c.synchronized_after:
            raise OutputError(
                f"the file written for {request.model.path} does not read back with {c.path} "
                f"synchronized={c.synchronized_after}; nothing was replaced. Please report this "
                "as a bug."
            )


def _size(path: str) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size
