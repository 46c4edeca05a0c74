"""Writers: put an edited model config back into a file of the same format, losing nothing.

One interface, one module per format (like the readers):

* :class:`WriteRequest` says what to write: the input as read, the complete new config, every
  layer's flag after the edit, and whether to drop the saved optimizer state.
* A :class:`Writer` (``bnfreeze.formats.writers.<module>.WRITER``) writes it to a temporary path and
  verifies what it wrote. It never touches the input and never renames anything: the
  config route (:mod:`bnfreeze.ops.config_route`) wraps it in
  :func:`bnfreeze.formats.atomic.atomic_file`.
* :func:`bnfreeze.formats.writers.dispatch.writer_for` dispatches by
  :class:`~bnfreeze.model.records.ModelFormat`, importing the format's module on first use.
  A format with no writer returns ``None``; the config route then hands the edit to the
  Keras engine or says the format cannot be rewritten.

``bnfreeze/formats/writers/legacy_h5.py`` honours ``drop_optimizer_state`` (the
``optimizer_weights`` group and the matching ``training_config``) and keeps each group's
``weight_names`` order consistent with the new flags (docs/semantics.md, rule 6).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bnfreeze.errors import OutputError
from bnfreeze.model.records import LayerRecord, ModelFile, ModelFormat


@dataclass(frozen=True)
class WriteRequest:
    """What to write.

    ``model`` is the input as the reader returned it (its ``config`` is the *old* config and
    its ``path`` the input file). ``config`` is the complete new top-level config. ``layers``
    are the input's walked records (``config_path`` locates each layer dict in either
    config), and ``flags`` maps every layer path to its ``trainable`` after the edit.
    ``drop_optimizer_state`` asks the writer to leave out the saved optimizer variables, and
    nothing else. ``optimizer_slots``, when not None, is the new list of saved optimizer
    variables (``.keras`` only): ``/optimizer/vars/<i>`` becomes the i-th slot's ``source``
    dataset, or zeros shaped like its ``like`` dataset; an empty tuple drops them.
    """

    model: ModelFile
    config: dict[str, Any] = field(repr=False)
    layers: tuple[LayerRecord, ...] = field(repr=False)
    flags: dict[str, bool | None] = field(repr=False)
    drop_optimizer_state: bool = False
    optimizer_slots: tuple[OptimizerSlot, ...] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class OptimizerSlot:
    """One saved optimizer variable of an output: the existing dataset ``source`` (a path in
    the weights file), or, with ``source`` None, zeros shaped like the dataset ``like``."""

    source: str | None
    like: str


@dataclass(frozen=True)
class WriteOutcome:
    """What a writer did besides the config: how many saved optimizer variables it dropped
    (0 when it kept them or there were none)."""

    optimizer_variables_dropped: int = 0


class Writer(Protocol):
    """A writer for one format."""

    format: ModelFormat

    def write(self, request: WriteRequest, dest: Path) -> WriteOutcome:
        """Write the complete edited model at ``dest``, an empty temporary file in the output
        folder (truncate or replace it). Stream: memory must not grow with the file size."""
        ...

    def verify(self, request: WriteRequest, written: Path) -> None:
        """Re-read ``written`` and raise :class:`~bnfreeze.errors.OutputError` unless it holds
        exactly what ``request`` asked for. :func:`verify_flags` does the format-independent
        part."""
        ...

    def prepare(self, request: WriteRequest) -> None:
        """Optional early work for ``request`` (checks that need no file), called while
        ``write`` may be running in another thread; ``verify`` must not depend on it."""
        ...


def verify_flags(request: WriteRequest, written: Path) -> None:
    """Re-read ``written`` with bnfreeze's own reader and check that every layer is there,
    in the same order, with exactly the flag the edit asked for."""
    from bnfreeze.formats.readers import read_model

    try:
        reread = read_model(written, weights=False)
    except Exception as exc:
        raise _unreadable(request, exc) from None
    check_flags(request, reread.config, reread.compiled, str(written))


def verify_config_bytes(request: WriteRequest, raw: bytes) -> None:
    """:func:`verify_flags` for a ``config.json`` about to be written: parse ``raw`` the way
    the reader does and check it. Whoever calls it must check that the file holds exactly
    ``raw`` once written."""
    from bnfreeze.formats.readers._keras_common import CONFIG, check_model_config, parse_json

    source = request.model.path
    try:
        config = check_model_config(parse_json(raw, source, CONFIG), source)
    except Exception as exc:
        raise _unreadable(request, exc) from None
    compile_config = config.get("compile_config")
    compiled = isinstance(compile_config, dict) and bool(compile_config)
    check_flags(request, config, compiled, source)


def _unreadable(request: WriteRequest, exc: Exception) -> OutputError:
    return OutputError(
        f"the file written for {request.model.path} does not read back ({exc}); nothing was "
        "replaced. Please report this as a bug."
    )


def check_flags(request: WriteRequest, config: dict[str, Any], compiled: bool, source: str) -> None:
    """Every layer of ``config`` is there, in the same order, with exactly the flag the edit
    asked for, and the compile config is kept."""
    from bnfreeze.model.walk import walk

    try:
        layers = walk(config, source).layers
    except Exception as exc:
        raise _unreadable(request, exc) from None
    expected = [(r.path, request.flags.get(r.path, r.trainable)) for r in request.layers]
    found = [(r.path, r.trainable) for r in layers]
    if found != expected:
        pairs = zip(expected, found, strict=False)
        first = next(
            (f"{e[0]}: wanted {e[1]}, read {f[0]}={f[1]}" for e, f in pairs if e != f),
            f"{len(expected)} layers wanted, {len(found)} read",
        )
        raise OutputError(
            f"the file written for {request.model.path} does not read back with the intended "
            f"flags ({first}); nothing was replaced. Please report this as a bug."
        )
    if compiled != request.model.compiled:
        raise OutputError(
            f"the file written for {request.model.path} lost or gained its compile config; "
            "nothing was replaced. Please report this as a bug."
        )
