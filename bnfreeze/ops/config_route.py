"""The config route: edit ``trainable`` in the saved config and let the format's writer
(:mod:`bnfreeze.formats.writers`) rewrite the file, every other byte kept. No TensorFlow.

Plan, then commit. :func:`plan_edit` decides everything and returns a :class:`ConfigPlan`:
the flags, the optimizer state (remapped, dropped or kept, :mod:`bnfreeze.ops.optimizer_state`),
what the writer will write and the result it will report (what a dry run shows).
:func:`commit` writes it atomically (:func:`bnfreeze.formats.atomic.atomic_file`), verified
by re-reading, and returns the :class:`~bnfreeze.ops.request.EditResult`.

The route refuses what a config cannot carry (:mod:`bnfreeze.ops.config_limits`:
``config_route_limit``, ``custom_batchnorm_limit``, ``code_built_limit``): with
``--engine auto`` the request then goes to its ``fallback`` route, the Keras engine.

Semantics (docs/semantics.md, rules 4-6). Containers are never edited alone: every selected
leaf is edited, because a container's flag does not propagate when Keras loads a saved model.
After any change, Keras must compile the model again with a **new** optimizer; the saved
optimizer variables are matched to trainable variables by position, so when the *set* of
trainable variables changes they are remapped by default: rewritten in the order Keras builds
for the new set, each surviving variable's slots kept, or dropped when that cannot be shown
right (Keras would drop them on load with a confusing warning, or silently misassign them when
the count happens to match).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from bnfreeze.errors import BnfreezeError, OutputError, SelectionError
from bnfreeze.model import modes
from bnfreeze.model.assignments import (
    Assignment,
    Change,
    Flags,
    apply_to_config,
    assign,
    changes,
    current_flags,
    editable,
)
from bnfreeze.model.assignments import with_flags as records_with_flags
from bnfreeze.model.records import (
    LayerKind,
    LayerRecord,
    LayerState,
    ModelFile,
    ModelFormat,
    Report,
)
from bnfreeze.ops.config_limits import code_built_limit, config_route_limit, custom_batchnorm_limit
from bnfreeze.ops.edit_warnings import edit_warnings
from bnfreeze.ops.optimizer_state import (
    OptimizerPlan,
    OptimizerState,
    plan_optimizer_state,
    trainable_layers,
)
from bnfreeze.ops.request import EditRequest, EditResult, Engine, Route

if TYPE_CHECKING:
    from bnfreeze.formats.writers import Writer, WriteRequest

#: Output file name endings Keras 3's ``load_model`` accepts, per format.
OUTPUT_SUFFIXES: dict[ModelFormat, tuple[str, ...]] = {
    ModelFormat.KERAS: (".keras",),
    ModelFormat.KERAS_DIR: (".keras",),  # a folder in, a .keras archive out
    ModelFormat.H5: (".h5", ".hdf5"),
}

#: What the config route's refusal tells the user to do instead (``{model}``: the input).
KERAS_ENGINE_HINT = (
    "Use --engine keras (or auto): it loads the model with Keras, sets the flags on the live "
    "layers and, for layers Keras does not save the flags of, records them in the .keras "
    "output; load that with bnfreeze.load_model(path). For example: bnfreeze freeze {model} "
    "--bn-inference --engine keras -o frozen.keras"
)


@dataclass(frozen=True)
class ConfigRoute:
    """The config rewrite. ``fallback`` (the Keras engine, for ``--engine auto``) gets the
    requests the config cannot carry; without one they are refused."""

    fallback: Route | None = None

    def edit(self, request: EditRequest) -> EditResult:
        """Apply ``request`` (its output already checked, :func:`check_output`)."""
        from bnfreeze.formats.readers import read_model, with_weights
        from bnfreeze.model.walk import walk

        # A .keras archive's weights are indexed only once the config route takes the edit.
        model = read_model(request.path, weights=False)
        if model.format is not ModelFormat.KERAS:
            model = with_weights(model)
        _check_output_suffix(request, model)
        walked = walk(model.config, model.path)
        reason = config_route_limit(model, walked.layers, walked.lists_layers)
        selected: tuple[LayerRecord, ...] = ()
        if reason is None:
            selected = _editable_selection(request, model, walked.layers)
            reason = custom_batchnorm_limit(request.assignment, selected) or code_built_limit(
                model, selected
            )
        if reason is not None and request.bn_config:
            raise BnfreezeError(
                f"{model.path}: the plan sets BN layers' class or synchronized, which only the "
                f"config route writes, and it cannot edit this model: {reason}."
            )
        if reason is not None:
            return self._refused(request, model.path, reason)
        targeted = _targeted(request.assignment, selected)
        try:
            flags = plan_flags(request, model, walked.layers, targeted)
            if model.format is ModelFormat.KERAS and flags.writes:
                return commit_while_planning(flags)
            return commit(complete(flags))
        except BnfreezeError as exc:
            # A writer that finds, while planning, that only Keras can write this edit safely
            # (legacy_h5.H5RewriteError) says so; nothing was written yet.
            if (
                self.fallback is not None
                and not request.bn_config
                and getattr(exc, "keras_engine_can_help", False)
            ):
                return self.fallback.edit(request)
            raise

    def _refused(self, request: EditRequest, path: str, reason: str) -> EditResult:
        if self.fallback is None:
            raise BnfreezeError(
                f"{path}: the config route cannot edit this model: {reason}.",
                hint=KERAS_ENGINE_HINT.format(model=path),
            )
        return self.fallback.edit(request)


def _editable_selection(
    request: EditRequest, model: ModelFile, layers: tuple[LayerRecord, ...]
) -> tuple[LayerRecord, ...]:
    selected = editable(model.config, request.selection.apply(layers))
    if not selected:
        raise SelectionError(
            "the selection matches no layer whose flag can be set (only operations or "
            "inputs, which store no trainable flag)."
        )
    return selected


def _targeted(assignment: Assignment, selected: tuple[LayerRecord, ...]) -> tuple[LayerRecord, ...]:
    targeted = tuple(r for r in selected if assignment.value_for(r) is not None)
    if not targeted:
        if assignment.others is None and assignment.batchnorm is not None:
            raise SelectionError(
                "the selection holds no BatchNormalization layer, and --bn-inference sets "
                "only BN layers."
            )
        raise SelectionError("the edit sets no flag on the selected layers.")
    return targeted


def _check_output_suffix(request: EditRequest, model: ModelFile) -> None:
    if request.output.path is None or request.output.in_place:
        return
    allowed = OUTPUT_SUFFIXES.get(model.format)
    if allowed is None or request.output.path.lower().endswith(allowed):
        return
    if model.format is ModelFormat.KERAS_DIR:
        raise OutputError(
            f"-o {request.output.path}: an edited unzipped .keras folder is written as a .keras "
            "file, so its name must end in .keras (Keras 3 load_model chooses the format by it).",
            hint="Unzip the result if you need a folder again.",
        )
    raise OutputError(
        f"-o {request.output.path}: a {model.format.json_name} model must be saved under a name "
        f"ending in {' or '.join(allowed)}; Keras 3 load_model chooses the format by it.",
    )


# -- plan, then commit ------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigPlan:
    """Everything the config route decided about one edit, before anything is written."""

    request: EditRequest
    model: ModelFile  # the input, indexed
    writer: Writer
    write: WriteRequest  # what the writer writes
    new_config: dict[str, object]
    selected: tuple[str, ...]
    changes: tuple[Change, ...]
    optimizer_plan: OptimizerPlan
    #: The result's report, read from the input while it is in place (None when that
    #: failed: it is read again after the write).
    report: Report | None
    input_bytes: int
    #: BN layers whose class or ``synchronized`` the request's ``bn_config`` changes.
    bn_config_changes: int = 0

    @property
    def writes(self) -> bool:
        """Whether committing writes a file (:attr:`FlagPlan.writes`)."""
        return _writes(self.request, bool(self.changes or self.bn_config_changes))

    @property
    def report_path(self) -> str | None:
        """The file the result's report names: the output, once written."""
        return self.request.output.path if self.writes else None

    @property
    def predicted_dropped(self) -> int:
        return self.optimizer_plan.dropped


@dataclass(frozen=True)
class FlagPlan:
    """The part of a plan that needs no index of the weights: the new flags and config."""

    request: EditRequest
    model: ModelFile  # the input, maybe not indexed yet
    layers: tuple[LayerRecord, ...]
    selected: tuple[LayerRecord, ...]
    after: Flags
    changes: tuple[Change, ...]
    new_config: dict[str, object]
    bn_config_changes: int

    @property
    def writes(self) -> bool:
        """Whether committing writes a file: not on a dry run, nor without an output, nor
        in place when nothing changes."""
        return _writes(self.request, bool(self.changes or self.bn_config_changes))

    def copy_as_it_is(self) -> WriteRequest:
        """The write with the saved optimizer state copied as it is (the new config)."""
        from bnfreeze.formats.writers import WriteRequest

        return WriteRequest(
            model=self.model, config=self.new_config, layers=self.layers, flags=self.after
        )


def _writes(request: EditRequest, changes: bool) -> bool:
    output = request.output
    return not (output.dry_run or output.path is None or (output.in_place and not changes))


def plan_edit(
    request: EditRequest,
    model: ModelFile,
    layers: tuple[LayerRecord, ...],
    selected: tuple[LayerRecord, ...],
) -> ConfigPlan:
    """Decide the edit of ``selected`` (and the optimizer state), without writing."""
    return complete(plan_flags(request, model, layers, selected))


def plan_flags(
    request: EditRequest,
    model: ModelFile,
    layers: tuple[LayerRecord, ...],
    selected: tuple[LayerRecord, ...],
) -> FlagPlan:
    """The new flags and config of the edit of ``selected`` (no weights index needed)."""
    after, changed = _new_flags(request, model, layers, selected)
    new_config = apply_to_config(model.config, layers, after) if changed else model.config
    bn_config_changes = 0
    if request.bn_config:
        from bnfreeze.ops.bn_config import apply_bn_config

        new_config, bn_config_changes = apply_bn_config(
            new_config, layers, request.bn_config, model.format, model.path
        )
    return FlagPlan(request, model, layers, selected, after, changed, new_config, bn_config_changes)


def complete(flags: FlagPlan) -> ConfigPlan:
    """The rest of the plan: the weights indexed, the optimizer state, the writer's checks,
    the result's report."""
    from bnfreeze.formats.readers import with_weights
    from bnfreeze.formats.writers.dispatch import writer_for

    request, layers, after = flags.request, flags.layers, flags.after
    model = with_weights(flags.model)
    writer = writer_for(model.format)
    assert writer is not None  # config_route_limit() checked
    optimizer_plan = _optimizer_plan(request, model, layers, after)
    write = replace(flags.copy_as_it_is(), model=model)
    if optimizer_plan.state is OptimizerState.DROPPED:
        write = replace(write, drop_optimizer_state=True)
    elif optimizer_plan.state is OptimizerState.REMAPPED:
        write = replace(write, optimizer_slots=optimizer_plan.slots)
    plan = ConfigPlan(
        request=request,
        model=model,
        writer=writer,
        write=write,
        new_config=flags.new_config,
        selected=tuple(r.path for r in flags.selected),
        changes=flags.changes,
        optimizer_plan=optimizer_plan,
        report=None,
        input_bytes=_size(model.path),
        bn_config_changes=flags.bn_config_changes,
    )
    if plan.writes:
        writer.prepare(write)  # the format's own checks, before anything is written
    with contextlib.suppress(Exception):
        # The result's weights are the input's (verified: byte-identical, or dataset by
        # dataset when the optimizer state is rewritten), so its report reads BN values from
        # the input, still in place. A failure here must not cost the write: it is retried after.
        plan = replace(plan, report=_plan_report(plan, plan.predicted_dropped, re_find=False))
    return plan


def _new_flags(
    request: EditRequest,
    model: ModelFile,
    layers: tuple[LayerRecord, ...],
    selected: tuple[LayerRecord, ...],
) -> tuple[Flags, tuple[Change, ...]]:
    """The flags after the edit, and what changed (layers whose config has no ``trainable``
    key to set, such as operations, keep theirs)."""
    before = current_flags(layers)
    without_flag = {r.path for r in layers if r.kind is not LayerKind.INPUT} - {
        r.path for r in editable(model.config, layers)
    }
    after = assign(layers, before, selected, request.assignment, without_flag=without_flag)
    return after, changes(layers, before, after)


def _optimizer_plan(
    request: EditRequest, model: ModelFile, layers: tuple[LayerRecord, ...], after: Flags
) -> OptimizerPlan:
    """What happens to the saved optimizer state, from what trains before and after."""
    model_trainable = _model_trainable(model.config)
    states_before = _states(model, layers, model_trainable)
    states_after = _states(model, records_with_flags(layers, after), model_trainable)
    return plan_optimizer_state(
        model,
        states_before,
        states_after,
        request.loading.optimizer_state,
        set_changed=trainable_layers(states_before) != trainable_layers(states_after),
    )


def commit(plan: ConfigPlan) -> EditResult:
    """Write ``plan`` atomically (a temporary file in the output's folder, verified by
    re-reading, then renamed) and return the result; on a dry run, write nothing."""
    from bnfreeze.formats.atomic import atomic_file

    if not plan.writes:
        return _result(plan, plan.predicted_dropped, None)
    output = plan.request.output.path
    assert output is not None
    with atomic_file(output) as tmp:
        outcome = plan.writer.write(plan.write, tmp)
        plan.writer.verify(plan.write, tmp)
    return _result(plan, outcome.optimizer_variables_dropped, Path(output).stat().st_size)


def commit_while_planning(flags: FlagPlan) -> EditResult:
    """``commit(complete(flags))`` for a ``.keras`` archive, in less time: the kernel copies
    the archive with the new config and the optimizer state as it is, on another thread,
    while this one indexes the weights and plans the rest. When the plan then rewrites the
    optimizer state, the writer patches that copy (``KerasZipWriter.upgrade``) or, where it
    cannot, writes the file again. Verified and renamed as :func:`commit` does."""
    from bnfreeze.formats.atomic import Background, atomic_file
    from bnfreeze.formats.writers.keras_zip import WRITER

    output = flags.request.output.path
    assert output is not None
    first = flags.copy_as_it_is()
    with atomic_file(output) as tmp:
        with Background(WRITER.write, first, tmp) as copying:
            plan = complete(flags)
        outcome = copying.result()
        if plan.write.optimizer_slots is not None or plan.write.drop_optimizer_state:
            upgraded = WRITER.upgrade(first, plan.write, tmp)
            outcome = upgraded if upgraded is not None else WRITER.write(plan.write, tmp)
        WRITER.verify(plan.write, tmp)
    return _result(plan, outcome.optimizer_variables_dropped, Path(output).stat().st_size)


def _result(plan: ConfigPlan, dropped: int, size: int | None) -> EditResult:
    request = plan.request
    report = plan.report
    if report is None or dropped != plan.predicted_dropped:
        # Read again from what is now on disk: the output replaced the input in place.
        report = _plan_report(plan, dropped, re_find=plan.writes and request.output.in_place)
    return EditResult(
        source=plan.model.path,
        output=request.output.path if plan.writes else None,
        dry_run=request.output.dry_run,
        engine=Engine.CONFIG,
        bn_config_changes=plan.bn_config_changes,
        selected=plan.selected,
        changes=plan.changes,
        report=report,
        warnings=edit_warnings(
            plan.changes,
            plan.optimizer_plan.state,
            plan.model.optimizer_variables,
            output=request.output.path,
            dry_run=request.output.dry_run,
            model_format=plan.model.format,
            plan=plan.optimizer_plan,
        ),
        optimizer_state=plan.optimizer_plan.state,
        optimizer_variables=plan.model.optimizer_variables,
        optimizer_variables_dropped=dropped,
        input_bytes=plan.input_bytes,
        output_bytes=size,
        assignment=request.assignment,
        optimizer_plan=plan.optimizer_plan,
    )


def _plan_report(plan: ConfigPlan, dropped: int, *, re_find: bool) -> Report:
    return _result_report(
        plan.model,
        plan.new_config,
        dropped,
        re_find=re_find,
        path=plan.report_path,
        plan=plan.optimizer_plan,
    )


# -- helpers ---------------------------------------------------------------------------------


def _states(
    model: ModelFile, layers: tuple[LayerRecord, ...], model_trainable: bool
) -> tuple[LayerState, ...]:
    index = model.weights.variables if model.weights is not None else None
    has_weights = {
        r.path: bool(index[r.path])
        if index is not None and r.path in index
        else modes.has_weights_by_class(r)
        for r in layers
    }
    return modes.resolve(layers, model_trainable=model_trainable, has_weights=has_weights)


def _model_trainable(config: dict[str, object]) -> bool:
    inner = config.get("config")
    return not (isinstance(inner, dict) and inner.get("trainable") is False)


def _result_report(
    model: ModelFile,
    new_config: dict[str, object],
    dropped: int,
    *,
    re_find: bool,
    path: str | None,
    plan: OptimizerPlan | None = None,
) -> Report:
    from bnfreeze.ops.inspect import inspect_model_file

    kept = None if dropped else model.optimizer_variables
    if plan is not None and plan.state is OptimizerState.REMAPPED and plan.slots is not None:
        kept = len(plan.slots)
    result_model = replace(model, config=new_config, optimizer_variables=kept)
    if re_find and model.weights is not None and getattr(model.weights, "locations", None):
        # Dataset offsets were those of the old file; let the reader find them again.
        result_model = replace(result_model, weights=replace(model.weights, locations={}))
    report = inspect_model_file(result_model)
    if path is not None:
        report = replace(report, model=replace(report.model, path=path))
    return report


def _size(path: str) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size
