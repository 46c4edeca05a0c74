"""The Keras engine route: load a saved model with Keras, set ``trainable`` on the live layers,
save it (:mod:`bnfreeze.runtime.saving`).

The config route (:mod:`bnfreeze.ops.config_route`) edits saved files without TensorFlow. This
route does what only a live model can:

* **subclassed models** whose config does not list their layers: the layers are found on the
  live object (:mod:`bnfreeze.runtime.live`);
* **custom BatchNormalization subclasses**: recognised with
  ``isinstance(layer, keras.layers.BatchNormalization)``, which a config cannot show
  (docs/semantics.md, rule 7);
* **formats the readers do not rewrite**.

Loading goes through :func:`bnfreeze.runtime.loading.load_model`: ``safe_mode=True``, custom
objects only from an explicit ``--custom-objects`` module or file, a ``Lambda`` refused unless
``--unsafe``; flags bnfreeze recorded in the file are set again. Flags are applied the way
Keras's own setter would leave them (:func:`edit_live`): a container's flag first
(``container.trainable = X`` reaches every layer below it), then every leaf's own flag,
because on Keras 3 the last assignment that reaches a layer wins (docs/semantics.md, rule 3).
:func:`edit_live` also serves the in-memory route (:mod:`bnfreeze.runtime.memory_route`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnfreeze.errors import BnfreezeError, ModelFormatError, SelectionError
from bnfreeze.model.assignments import Assignment, Change, Flags, assign, changes, current_flags
from bnfreeze.model.records import (
    Finding,
    LayerKind,
    LayerRecord,
    ModelFile,
    ModelFormat,
    Runtime,
    WarningCode,
)
from bnfreeze.ops.edit_warnings import edit_warnings
from bnfreeze.ops.optimizer_state import OptimizerState, optimizer_decision
from bnfreeze.ops.request import EditRequest, EditResult, Engine
from bnfreeze.runtime import environment, loading
from bnfreeze.runtime.live import LiveModel, live_model, live_report
from bnfreeze.runtime.saving import recorded_flags_findings, save, save_format


@dataclass(frozen=True)
class LiveEdit:
    """What :func:`edit_live` did (or would do) to a live model."""

    selected: tuple[str, ...]
    changes: tuple[Change, ...]
    flags: Flags  # every layer's flag after the edit
    trainable_set_changed: bool  # Keras's own model.trainable_variables changed
    gained_trainable: bool = False  # some variable became trainable (an optimizer built


def trainable_ids(model: Any) -> frozenset[int]:
    """The variables ``fit()`` would hand to a new optimizer: ``model.trainable_variables``."""
    return frozenset(id(v) for v in model.trainable_variables)


def edit_live(
    live: LiveModel,
    assignment: Assignment,
    select_fn: Callable[[Sequence[LayerRecord]], Sequence[LayerRecord]],
    *,
    dry_run: bool = False,
) -> LiveEdit:
    """Apply ``assignment`` to the layers ``select_fn`` picks, on the live model.

    ``select_fn`` is a selection (:meth:`bnfreeze.ops.request.LayerSelection.apply`). Records with
    no live layer (operations a Functional records as layers, ``keras.ops.add``, say) carry no
    flag and are skipped. With ``dry_run`` nothing is changed.
    """
    records = live.records
    selected = tuple(r for r in select_fn(records) if r.path in live.layers)
    if not selected:
        raise SelectionError(
            "the selection matches no layer whose flag can be set (only operations or inputs)."
        )
    without_flag = [
        r.path for r in records if r.path not in live.layers or r.kind is LayerKind.INPUT
    ]
    before = current_flags(records)
    after = assign(records, before, selected, assignment, without_flag=without_flag)
    changed = changes(records, before, after)
    old_ids = new_ids = trainable_ids(live.model)
    if changed and not dry_run:
        apply_flags(live, after)
        new_ids = trainable_ids(live.model)
    elif changed:
        new_ids = _trainable_ids_with(live, after)
    return LiveEdit(
        selected=tuple(r.path for r in selected),
        changes=changed,
        flags=after,
        trainable_set_changed=new_ids != old_ids,
        gained_trainable=bool(new_ids - old_ids),
    )


def apply_flags(live: LiveModel, flags: Flags) -> None:
    """Set ``flags`` on the live layers: changed containers first, outermost first (their
    setter reaches every layer below), then every leaf's own flag."""
    containers = [
        r
        for r in live.records
        if r.kind in (LayerKind.CONTAINER, LayerKind.WRAPPER) and r.path in live.layers
    ]
    for record in sorted(containers, key=lambda r: r.depth):
        value = flags.get(record.path)
        if value is not None and bool(live.layers[record.path].trainable) is not value:
            live.layers[record.path].trainable = value
    for record in live.records:
        if record.kind in (LayerKind.CONTAINER, LayerKind.WRAPPER, LayerKind.INPUT):
            continue
        value = flags.get(record.path)
        layer = live.layers.get(record.path)
        if value is not None and layer is not None:
            layer.trainable = value


def _trainable_ids_with(live: LiveModel, flags: Flags) -> frozenset[int]:
    """For a dry run: ``model.trainable_variables`` as it would be with ``flags``. Applies
    them, then puts every flag back the same way (containers, then leaves)."""
    before: Flags = {path: bool(layer.trainable) for path, layer in live.layers.items()}
    try:
        apply_flags(live, flags)
        return trainable_ids(live.model)
    finally:
        apply_flags(live, before)


@dataclass(frozen=True)
class KerasRoute:
    """The ``--engine keras`` route for a saved model. ``progress`` defaults to a spinner or
    progress lines on stderr (:func:`environment.progress_on_stderr`); nothing goes to stdout."""

    progress: environment.ProgressFn | None = None

    def edit(self, request: EditRequest) -> EditResult:
        """Load the model with Keras, apply the request's assignment to the selected live
        layers, and save it (:func:`bnfreeze.runtime.saving.save`)."""
        if self.progress is None:
            with environment.progress_on_stderr() as shown:
                return KerasRoute(shown).edit(request)
        saved = _read_saved(request)
        with environment.quiet():
            loaded = _load(request, saved, self.progress)
            return _edit_loaded(request, saved, loaded, self.progress)


@dataclass(frozen=True)
class _Loaded:
    """A model Keras loaded, and how to load the saved result back."""

    model: Any
    reload: Callable[[Path], Any]
    uncompiled: str | None  # why it was loaded with compile=False, if it was


def _read_saved(request: EditRequest) -> ModelFile:
    """The saved model as bnfreeze reads it: bad files get the readers' errors, and unsafe
    content is refused, before TensorFlow is imported."""
    from bnfreeze.formats.readers import read_model

    source = request.path
    if request.output.path is not None:
        save_format(request.output.path)  # a name Keras cannot save under fails first
    saved = read_model(source)
    loading.refuse_unsafe(saved.config, source, unsafe=request.loading.unsafe)
    if saved.format is ModelFormat.KERAS_DIR and str(source).rstrip("/").endswith(".keras"):
        # Keras 3 opens any path ending in .keras as a zip file: IsADirectoryError.
        raise ModelFormatError(
            f"{source}: Keras 3 cannot load a folder whose name ends in .keras (it opens the "
            "path as a zip file).",
            hint="Use --engine config (the default), which edits the folder without Keras and "
            "writes a .keras file, or rename the folder.",
        )
    environment.require_runtime(Runtime.KERAS3)  # one line naming the extra, before any progress
    return saved


def _load(request: EditRequest, saved: ModelFile, progress: environment.ProgressFn) -> _Loaded:
    """Load the model compiled (with compile=False when Keras cannot rebuild its compile
    config) and set again the flags bnfreeze recorded in it."""
    from bnfreeze.formats import recorded_flags
    from bnfreeze.runtime.saving import apply_recorded

    source = request.path
    progress(environment.loading_message(Runtime.KERAS3))
    environment.keras_module(
        Runtime.KERAS3
    )  # first: a --custom-objects module importing keras stays quiet
    objects = None
    custom = request.loading.custom_objects
    if isinstance(custom, str) and custom:
        objects = loading.load_custom_objects(custom)
    load = functools.partial(
        loading.load_model, unsafe=request.loading.unsafe, custom_objects=objects
    )
    progress(f"loading {source}")
    uncompiled: str | None = None
    try:
        model = load(source, compile=True)
    except BnfreezeError as exc:
        if not saved.compiled:
            raise
        # A compile config Keras 3 cannot rebuild (a Keras 2 training_config with "lr",
        # a loss it cannot deserialize) must not stop a flag edit: the model itself loads.
        model = load(source, compile=False)
        uncompiled = exc.message
        progress("Keras could not rebuild the saved compile config; loaded with compile=False")
    recorded = recorded_flags.read(source)
    if recorded is not None:
        apply_recorded(model, recorded, source)
    return _Loaded(model, functools.partial(load, compile=False), uncompiled)


def _edit_loaded(
    request: EditRequest, saved: ModelFile, loaded: _Loaded, progress: environment.ProgressFn
) -> EditResult:
    output, dry_run = request.output.path, request.output.dry_run
    live = live_model(loaded.model)
    done = edit_live(live, request.assignment, request.selection.apply, dry_run=dry_run)
    optimizer = optimizer_decision(
        saved.optimizer_variables, done.trainable_set_changed, request.loading.optimizer_state
    )
    keep = optimizer in (OptimizerState.UNCHANGED, OptimizerState.KEPT)
    write = (
        not dry_run and output is not None and not (request.output.in_place and not done.changes)
    )
    written = None
    if write:
        assert output is not None
        written = save(
            loaded.model,
            output,
            keep_optimizer=keep,
            reload=loaded.reload,
            live=live,
            progress=progress,
        )
    recorded = written.recorded if written is not None else None
    out_fmt = save_format(output) if output is not None else None
    report = live_report(
        loaded.model,
        path=output if write else request.path,
        fmt=out_fmt if write and out_fmt is not None else saved.format,
        optimizer_variables=saved.optimizer_variables if keep else None,
        live=live_model(loaded.model),
    )
    dropped = (saved.optimizer_variables or 0) if optimizer is OptimizerState.DROPPED else 0
    warnings = edit_warnings(
        done.changes,
        optimizer,
        saved.optimizer_variables,
        output=output,
        dry_run=dry_run,
        loader="bnfreeze.load_model" if recorded is not None else "keras.models.load_model",
    )
    return EditResult(
        source=request.path,
        output=output if write else None,
        dry_run=dry_run,
        engine=Engine.KERAS,
        selected=done.selected,
        changes=done.changes,
        report=report,
        warnings=warnings
        + recorded_flags_findings(recorded, output)
        + _uncompiled_warning(loaded.uncompiled, output if write else None),
        optimizer_state=optimizer,
        optimizer_variables=saved.optimizer_variables,
        optimizer_variables_dropped=dropped,
        input_bytes=_size(request.path),
        output_bytes=written.size if written is not None else None,
        assignment=request.assignment,
    )


def _uncompiled_warning(reason: str | None, output: str | None) -> tuple[Finding, ...]:
    """Say that the model was loaded with ``compile=False``, and what that means for OUT."""
    if reason is None:
        return ()
    saved = f"{output} is saved without a compile config" if output else "nothing is written"
    return (
        Finding(
            WarningCode.RECOMPILE_REQUIRED,
            None,
            f"Keras 3 cannot rebuild the saved compile config ({reason}), so the model was "
            f"loaded with compile=False and {saved}: call compile() with your optimizer and "
            "loss before fit().",
        ),
    )


def _size(path: str) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size
