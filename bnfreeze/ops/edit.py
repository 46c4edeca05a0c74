"""Freeze and unfreeze saved models: select layers, set their ``trainable`` flags, write the
result atomically, and say what changed and what the user must do next.

This is the library behind ``bnfreeze freeze`` / ``bnfreeze unfreeze`` (the CLI only adapts)
and behind the Python API for paths. The public entry points:

* :func:`edit_file` — one :class:`~bnfreeze.model.assignments.Assignment` applied to a selection;
* :func:`freeze_file` / :func:`unfreeze_file` — the two recipes, by name;

each returns an :class:`EditResult`: the changes (before → after per layer), the inspect
:class:`~bnfreeze.model.records.Report` of the result, the warnings, what happened to the saved
optimizer state, and the output path and size.

Two routes (:class:`Engine`):

* **config** (the default, no TensorFlow): edit ``trainable`` in the saved config and let the
  format's writer (:mod:`bnfreeze.formats.writers`) rewrite the file, every other byte kept.
* **keras**: load with Keras, set flags on the live layers, save. It handles what a config
  cannot show: subclassed models whose config does not list their layers, custom BN subclasses
  (only ``isinstance`` can tell) and formats no writer rewrites. It lives in the module named
  by :data:`KERAS_ENGINE_MODULE`, whose ``edit(request: EditRequest) ->
  EditResult`` receives the same request; :func:`check_output`, :func:`optimizer_decision`,
  :func:`edit_warnings` and :func:`bnfreeze.formats.atomic.write_atomically` are there for it
  to reuse. ``Engine.AUTO`` picks keras only when :func:`config_route_limit` names a reason.

Semantics (docs/semantics.md, rules 4-6). Containers are never edited alone: every selected leaf is
edited, because a container's flag does not propagate when Keras loads a saved model. After
any change, Keras must compile the model again with a **new** optimizer; the saved optimizer
variables are matched to trainable variables by position, so when the *set* of trainable
variables changes they are remapped by default: rewritten in the order Keras builds for the new
set, each surviving variable's slots kept (:mod:`bnfreeze.ops.optimizer_state`), or dropped
when that cannot be shown right (Keras would drop them on load with a confusing warning, or
silently misassign them when the count happens to match).
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import os
import re
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from bnfreeze.errors import BnfreezeError, OutputError, SelectionError
from bnfreeze.model import modes
from bnfreeze.model.assignments import (
    Assignment,
    Change,
    apply_to_config,
    assign,
    changes,
    current_flags,
    editable,
)
from bnfreeze.model.assignments import with_flags as records_with_flags
from bnfreeze.model.records import (
    Finding,
    LayerKind,
    LayerRecord,
    LayerState,
    ModelFile,
    ModelFormat,
    Normalization,
    Report,
    WarningCode,
)
from bnfreeze.model.selection import select
from bnfreeze.ops.edit_warnings import edit_warnings
from bnfreeze.ops.optimizer_state import (  # optimizer_decision: for the Keras engine
    OptimizerPlan,
    OptimizerState,
    OptimizerStateMode,
    optimizer_decision,  # noqa: F401
    parse_mode,
    plan_optimizer_state,
    trainable_layers,
)

if TYPE_CHECKING:
    from bnfreeze.formats.writers import WriteRequest

#: Output file name endings Keras 3's ``load_model`` accepts, per format.
OUTPUT_SUFFIXES: dict[ModelFormat, tuple[str, ...]] = {
    ModelFormat.KERAS: (".keras",),
    ModelFormat.KERAS_DIR: (".keras",),  # a folder in, a .keras archive out
    ModelFormat.H5: (".h5", ".hdf5"),
}

#: The Keras engine route: a module with ``edit(request) -> EditResult``.
KERAS_ENGINE_MODULE = "bnfreeze.runtime.keras_engine"

#: What the config route's refusal tells the user to do instead (``{model}``: the input).
KERAS_ENGINE_HINT = (
    "Use --engine keras (or auto): it loads the model with Keras, sets the flags on the live "
    "layers and, for layers Keras does not save the flags of, records them in the .keras "
    "output; load that with bnfreeze.load_model(path). For example: bnfreeze freeze {model} "
    "--bn-inference --engine keras -o frozen.keras"
)


class Engine(enum.Enum):
    """How a saved model is edited."""

    AUTO = "auto"  # config, unless config_route_limit() names a reason to load with Keras
    CONFIG = "config"  # rewrite the saved config; no TensorFlow
    KERAS = "keras"  # load with Keras, set flags on the live layers, save


@dataclass(frozen=True)
class LayerSelection:
    """Which layers an edit applies to: the intersection of the given selectors; all leaves
    when none is given (see :func:`bnfreeze.model.selection.select`)."""

    layers: tuple[str, ...] = ()  # globs on layer paths or names (--layers)
    up_to: str | None = None  # a layer path or name, inclusive (--up-to)
    from_layer: str | None = None  # a layer path or name, inclusive (--from)

    def apply(self, records: Sequence[LayerRecord]) -> tuple[LayerRecord, ...]:
        return select(
            records, globs=self.layers, up_to_layer=self.up_to, from_layer_spec=self.from_layer
        )


@dataclass(frozen=True)
class EditRequest:
    """Everything one freeze or unfreeze of a file needs, as the user gave it.

    ``output`` is where to write (the input itself with ``in_place``), or None for a dry run
    without ``-o``. ``custom_objects`` and ``unsafe`` only matter to the Keras engine.
    """

    model: str
    output: str | None
    assignment: Assignment
    selection: LayerSelection = LayerSelection()
    dry_run: bool = False
    in_place: bool = False
    keep_optimizer_state: bool = False
    engine: Engine = Engine.AUTO
    custom_objects: str | None = None
    unsafe: bool = False
    optimizer_state: OptimizerStateMode = OptimizerStateMode.REMAP
    #: Called once with the result while the file is still being written (see edit_file).
    preview: Callable[[EditResult], None] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class EditResult:
    """What an edit did (or, with ``dry_run``, would do).

    ``report`` inspects the result: the written file, or on a dry run the planned edit of the
    input. ``warnings`` are the edit's own findings (call compile() again, optimizer state);
    the result's inspect findings are in ``report.warnings``.
    """

    source: str
    output: str | None  # the file written; None when nothing was written
    dry_run: bool
    engine: Engine  # the route taken: CONFIG or KERAS
    selected: tuple[str, ...] = field(repr=False)  # the leaves the edit sets, in model order
    changes: tuple[Change, ...] = field(repr=False)
    report: Report = field(repr=False)
    warnings: tuple[Finding, ...]
    optimizer_state: OptimizerState
    optimizer_variables: int | None  # saved optimizer variables in the input
    optimizer_variables_dropped: int
    input_bytes: int
    output_bytes: int | None
    #: What the edit gave the selected layers (None when not told): the recipe it applied.
    assignment: Assignment | None = field(default=None, repr=False)
    #: The config route's decision in full (remapped counts, why not remapped), when it made one.
    optimizer_plan: OptimizerPlan | None = field(default=None, repr=False)

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    @property
    def all_warnings(self) -> tuple[Finding, ...]:
        """The edit's warnings, then the result's, without saying one thing twice, and
        without warning against the recipe just applied (:meth:`kept_training_bn`)."""
        own = {f.code for f in self.warnings}
        intended = set(self.kept_training_bn)
        return self.warnings + tuple(
            f
            for f in self.report.warnings
            if not (f.code in own and f.path is None) and not self._against_recipe(f, intended)
        )

    @property
    def kept_training_bn(self) -> tuple[str, ...]:
        """The selected BN layers the edit deliberately leaves trainable under frozen layers:
        ``--train-bn`` (others False, BN True). That they normalize with batch statistics in
        ``fit()`` is the recipe, not a trap."""
        a = self.assignment
        if a is None or a.others is not False or a.batchnorm is not True:
            return ()
        chosen = set(self.selected)
        return tuple(s.layer.path for s in self.report.batchnorm if s.layer.path in chosen)

    def _against_recipe(self, finding: Finding, intended: set[str]) -> bool:
        if not intended or finding.path is None:
            return False
        if finding.code is WarningCode.TRAINABLE_BN_UNDER_FROZEN_CONTAINER:
            return finding.path in intended
        if finding.code is WarningCode.CALL_SITE_TRAINING_IGNORED:
            # Every BN layer the recorded training=False fails to protect is one the recipe
            # keeps training on purpose.
            prefix = finding.path + "/"
            training = [
                s.layer.path
                for s in self.report.batchnorm
                if (s.layer.path == finding.path or s.layer.path.startswith(prefix))
                and s.in_fit.normalizes_with is Normalization.BATCH
            ]
            return bool(training) and set(training) <= intended
        return False


# -- public entry points --------------------------------------------------------------------


def freeze_file(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    bn_inference: bool = False,
    train_bn: bool = False,
    layers: Sequence[str] = (),
    up_to: str | None = None,
    dry_run: bool = False,
    in_place: bool = False,
    keep_optimizer_state: bool = False,
    optimizer_state: OptimizerStateMode | str | None = None,
    engine: Engine | str = Engine.AUTO,
    custom_objects: str | None = None,
    unsafe: bool = False,
    preview: Callable[[EditResult], None] | None = None,
) -> EditResult:
    """Freeze the selected layers of a saved model.

    With no option every selected layer gets ``trainable=False``, BN included.
    ``bn_inference=True`` sets only BN layers to False, which on Keras 3 is what puts them in
    inference mode in ``fit()``; nothing else changes. ``train_bn=True`` freezes everything
    selected except the BN layers, which stay trainable (the fastai "train_bn" recipe).
    """
    if bn_inference and train_bn:
        raise BnfreezeError("bn_inference and train_bn contradict each other; pick one.")
    return edit_file(
        path,
        output,
        Assignment.freeze(bn_inference_only=bn_inference, train_bn=train_bn),
        layers=layers,
        up_to=up_to,
        dry_run=dry_run,
        in_place=in_place,
        keep_optimizer_state=keep_optimizer_state,
        optimizer_state=optimizer_state,
        engine=engine,
        custom_objects=custom_objects,
        unsafe=unsafe,
        preview=preview,
    )


def unfreeze_file(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    keep_bn_inference: bool = False,
    layers: Sequence[str] = (),
    from_layer: str | None = None,
    dry_run: bool = False,
    in_place: bool = False,
    keep_optimizer_state: bool = False,
    optimizer_state: OptimizerStateMode | str | None = None,
    engine: Engine | str = Engine.AUTO,
    custom_objects: str | None = None,
    unsafe: bool = False,
    preview: Callable[[EditResult], None] | None = None,
) -> EditResult:
    """Unfreeze the selected layers of a saved model: ``trainable=True``.

    ``keep_bn_inference=True`` keeps every selected BN layer at ``trainable=False``: the
    fine-tuning step of the Keras transfer-learning guide, done right on Keras 3 (its
    call-site ``training=False`` is overridden in ``fit()``, docs/semantics.md, rule 2).
    """
    return edit_file(
        path,
        output,
        Assignment.unfreeze(keep_bn_inference=keep_bn_inference),
        layers=layers,
        from_layer=from_layer,
        dry_run=dry_run,
        in_place=in_place,
        keep_optimizer_state=keep_optimizer_state,
        optimizer_state=optimizer_state,
        engine=engine,
        custom_objects=custom_objects,
        unsafe=unsafe,
        preview=preview,
    )


def edit_file(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str] | None,
    assignment: Assignment,
    *,
    layers: Sequence[str] = (),
    up_to: str | None = None,
    from_layer: str | None = None,
    dry_run: bool = False,
    in_place: bool = False,
    keep_optimizer_state: bool = False,
    optimizer_state: OptimizerStateMode | str | None = None,
    engine: Engine | str = Engine.AUTO,
    custom_objects: str | None = None,
    unsafe: bool = False,
    preview: Callable[[EditResult], None] | None = None,
) -> EditResult:
    """Apply ``assignment`` to the selected layers of the model at ``path``.

    Writes ``output`` atomically (a temporary file in its folder, verified by re-reading,
    then renamed), or the input itself with ``in_place=True``; with ``dry_run=True`` writes
    nothing. Raises :class:`~bnfreeze.errors.BnfreezeError` subclasses, written for users,
    on bad input: an unreadable model, a selection that matches nothing, an output that
    cannot be written or that is the input without ``in_place``.

    ``preview``, when given, is called at most once, with the result, as soon as it is known:
    for a ``.keras`` file that is while the copy is still running (the CLI renders its tables
    then). The result returned at the end is that one with ``output_bytes`` filled in (the
    same ``report`` object), unless the write turned out otherwise.

    ``optimizer_state`` (``"remap"``, the default, ``"drop"`` or ``"keep"``) says what happens
    to saved optimizer variables when the set of trainable variables changes (README, "Saved
    optimizer state"); ``keep_optimizer_state=True`` is the deprecated spelling of ``"keep"``.
    """
    mode = parse_mode(optimizer_state, keep_optimizer_state)
    request = EditRequest(
        model=os.fspath(path),
        output=os.fspath(output) if output is not None else None,
        assignment=assignment,
        selection=LayerSelection(tuple(layers), up_to, from_layer),
        dry_run=dry_run,
        in_place=in_place,
        keep_optimizer_state=mode is OptimizerStateMode.KEEP,
        optimizer_state=mode,
        engine=Engine(engine),
        custom_objects=custom_objects,
        unsafe=unsafe,
        preview=preview,
    )
    return run(request)


def run(request: EditRequest) -> EditResult:
    """Carry out an :class:`EditRequest` (see :func:`edit_file`)."""
    from bnfreeze.formats.readers import read_model, with_weights
    from bnfreeze.model.walk import walk

    request = check_output(request)
    if request.engine is Engine.KERAS:
        return _keras_engine(request, "requested with --engine keras")
    # A .keras archive's weights are indexed by _config_route, while its copy runs.
    model = read_model(request.model, weights=False)
    if model.format is not ModelFormat.KERAS:
        model = with_weights(model)
    _check_output_suffix(request, model)
    walked = walk(model.config, model.path)
    reason = config_route_limit(model, walked.layers, walked.lists_layers)
    selected: tuple[LayerRecord, ...] = ()
    if reason is None:
        selected = editable(model.config, request.selection.apply(walked.layers))
        if not selected:
            raise SelectionError(
                "the selection matches no layer whose flag can be set (only operations or "
                "inputs, which store no trainable flag)."
            )
        reason = custom_batchnorm_limit(request.assignment, selected) or code_built_limit(
            model, selected
        )
    if reason is not None:
        if request.engine is Engine.CONFIG:
            raise BnfreezeError(
                f"{model.path}: the config route cannot edit this model: {reason}.",
                hint=KERAS_ENGINE_HINT.format(model=model.path),
            )
        return _keras_engine(request, reason)
    targeted = tuple(r for r in selected if request.assignment.value_for(r) is not None)
    if not targeted:
        if request.assignment.others is None and request.assignment.batchnorm is not None:
            raise SelectionError(
                "the selection holds no BatchNormalization layer, and --bn-inference sets "
                "only BN layers."
            )
        raise SelectionError("the edit sets no flag on the selected layers.")
    try:
        return _config_route(request, model, walked.layers, targeted)
    except BnfreezeError as exc:
        # A writer that finds, while planning, that only Keras can write this edit safely
        # (legacy_h5.H5RewriteError) says so; nothing was written yet.
        if request.engine is Engine.AUTO and getattr(exc, "keras_engine_can_help", False):
            return _keras_engine(request, exc.message)
        raise


# -- checks shared by both routes -------------------------------------------------------------


def check_output(request: EditRequest) -> EditRequest:
    """Validate where the result goes, before any work; return the request with ``output``
    resolved (the input path for ``in_place``).

    Refuses: no output without ``dry_run``/``in_place``; ``in_place`` with a different
    output; an output that is the input without ``in_place``; an output in a folder that is
    missing or not writable, or that is a directory.
    """
    from bnfreeze.formats.atomic import check_destination

    source = Path(request.model)
    output = request.output
    if request.in_place and source.is_dir():
        raise OutputError(
            f"--in-place cannot rewrite the folder {source}: bnfreeze writes an edited unzipped "
            ".keras folder as a .keras file, the format model.save('x.keras') writes.",
            hint="Give -o OUT.keras instead; keras.models.load_model('OUT.keras') loads it.",
        )
    if request.in_place:
        if output is not None and not _same_file(source, Path(output)):
            raise OutputError(
                f"--in-place rewrites {source} itself, but -o names {output}.",
                hint="Give either -o OUT or --in-place.",
            )
        output = request.model
    elif output is None:
        if not request.dry_run:
            raise OutputError(
                "no output file.", hint="Give -o OUT, or --in-place to rewrite the input itself."
            )
    elif _same_file(source, Path(output)):
        raise OutputError(
            f"-o {output} is the input file; refusing to overwrite it.",
            hint="Pass --in-place to rewrite the input itself, or pick another -o.",
        )
    if output is not None:
        check_destination(Path(output))
    return replace(request, output=output)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _check_output_suffix(request: EditRequest, model: ModelFile) -> None:
    if request.output is None or request.in_place:
        return
    allowed = OUTPUT_SUFFIXES.get(model.format)
    if allowed is None or request.output.lower().endswith(allowed):
        return
    if model.format is ModelFormat.KERAS_DIR:
        raise OutputError(
            f"-o {request.output}: an edited unzipped .keras folder is written as a .keras "
            "file, so its name must end in .keras (Keras 3 load_model chooses the format by it).",
            hint="Unzip the result if you need a folder again.",
        )
    raise OutputError(
        f"-o {request.output}: a {model.format.json_name} model must be saved under a name "
        f"ending in {' or '.join(allowed)}; Keras 3 load_model chooses the format by it.",
    )


def config_route_limit(
    model: ModelFile, layers: Sequence[LayerRecord], lists_layers: bool
) -> str | None:
    """Why the config route cannot edit ``model`` (None when it can), before selection."""
    from bnfreeze.formats.writers import writer_for

    if writer_for(model.format) is None:
        return f"bnfreeze does not rewrite {model.format.json_name} files without Keras"
    if not lists_layers and str(model.config.get("class_name")) not in ("Functional", "Sequential"):
        return "it is a subclassed model whose config does not list its layers"
    return None


def code_built_limit(model: ModelFile, selected: Sequence[LayerRecord]) -> str | None:
    """Why the config route cannot edit ``selected`` of ``model`` (None when it can): layers
    whose flags the saved config cannot carry.

    * The file records flags bnfreeze set on such layers (``bnfreeze.json``): a config edit
      would leave those records stale; the Keras engine rewrites them.
    * A selected custom layer holds layers it builds in code (``self.bn1 =
      BatchNormalization()``), which its weights show as groups below its own: Keras builds
      them again on load with ``trainable=True``, whatever the custom layer's flag says
      (README, "keras-hub and code-built models").
    """
    from bnfreeze.formats import recorded_flags

    if model.format is ModelFormat.KERAS and recorded_flags.has_member(model.path):
        return (
            f"it records trainable flags Keras does not save ({recorded_flags.MEMBER}), "
            "which only the Keras engine rewrites"
        )
    custom = [r for r in selected if r.custom]
    if not custom:
        return None
    if model.weights is None:  # a .keras archive is read unindexed; index it only for this
        from bnfreeze.formats.readers import with_weights

        model = with_weights(model)
    index = model.weights.variables if model.weights is not None else {}
    holders = [r for r in custom if _holds_layers(r, index.get(r.path, ()))]
    if not holders:
        return None
    names = ", ".join(f"{r.path} ({r.class_name})" for r in holders[:3])
    return (
        f"the custom layer(s) {names} hold layers built in code, whose trainable flags Keras "
        "does not save"
    )


def _snake_case(name: str) -> str:
    """Keras's ``naming.to_snake_case``: the group name it saves a layer of a list under."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _holds_layers(record: LayerRecord, datasets: Sequence[str]) -> bool:
    """Whether a layer's weight datasets sit in groups below its own group: Keras names that
    group for the layer's class (``res_block``, ``res_block_1``), and a sublayer's variables
    go below it (``layers/res_block/bn1/vars/0``). Only that positive evidence counts."""
    own = re.compile(rf"{re.escape(_snake_case(record.class_name))}(_\d+)?")
    for dataset in datasets:
        group = dataset.rsplit("/vars/", 1)[0] if "/vars/" in dataset else dataset
        if any(own.fullmatch(part) for part in group.strip("/").split("/")[:-1]):
            return True
    return False


def custom_batchnorm_limit(assignment: Assignment, selected: Sequence[LayerRecord]) -> str | None:
    """Why the config route cannot apply ``assignment`` to ``selected`` (None when it can).

    When BN layers and other layers get different flags (``--bn-inference``, ``--train-bn``,
    ``--keep-bn-inference``), a selected custom class might subclass BatchNormalization, which
    only a loaded model can tell (``isinstance``, docs/semantics.md, rule 7).
    """
    if assignment.batchnorm == assignment.others:
        return None
    custom = [r for r in selected if r.kind is LayerKind.UNKNOWN]
    if not custom:
        return None
    names = ", ".join(sorted({r.class_name for r in custom})[:3])
    return (
        f"the selection holds custom layer classes ({names}) that may subclass "
        "BatchNormalization, which only a loaded model can tell"
    )


def keras_engine() -> types.ModuleType | None:
    """The ``--engine keras`` route, :mod:`bnfreeze.runtime.keras_engine`, imported only when
    chosen (the one place an edit of a file reaches the Keras runtime), or None when this
    build does not include it."""
    try:
        return importlib.import_module(KERAS_ENGINE_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name == KERAS_ENGINE_MODULE:  # the module itself is missing, not an import
            return None
        raise


def _keras_engine(request: EditRequest, reason: str) -> EditResult:
    engine = keras_engine()
    if engine is None:
        raise BnfreezeError(
            f"{request.model}: this edit needs the Keras engine ({reason}), which this build of "
            f"bnfreeze does not include ({KERAS_ENGINE_MODULE} is missing).",
            hint="Edit the model in Python and save it, or use the config route on a .keras file.",
        )
    return engine.edit(replace(request, engine=Engine.KERAS))


# -- optimizer state and warnings -----------------------------------------------------------


# -- the config route -----------------------------------------------------------------------


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


def _config_route(
    request: EditRequest,
    model: ModelFile,
    layers: tuple[LayerRecord, ...],
    selected: tuple[LayerRecord, ...],
) -> EditResult:
    """Write the edit with the format's writer.

    A ``.keras`` archive comes here unindexed (``read_model(..., weights=False)``): its copy,
    which the kernel does, starts at once in a worker thread, on the guess that the weights
    member is copied raw, while this thread indexes the weights, decides about the optimizer
    state and builds the result's report. When the decision is to drop the optimizer state,
    the file is written again with the weights rewritten before it is verified.
    """
    from bnfreeze.formats.atomic import write_atomically
    from bnfreeze.formats.readers import with_weights
    from bnfreeze.formats.writers import WriteOutcome, WriteRequest, writer_for

    writer = writer_for(model.format)
    assert writer is not None  # config_route_limit() checked
    before = current_flags(layers)
    without_flag = {r.path for r in layers if r.kind is not LayerKind.INPUT} - {
        r.path for r in editable(model.config, layers)
    }
    after = assign(layers, before, selected, request.assignment, without_flag=without_flag)
    changed = changes(layers, before, after)
    new_config = apply_to_config(model.config, layers, after) if changed else model.config
    input_bytes = _size(model.path)
    output = request.output
    skip = request.dry_run or output is None or (request.in_place and not changed)
    raw_copy = WriteRequest(
        model=model, config=new_config, layers=layers, flags=after, drop_optimizer_state=False
    )
    # The report names the file it describes: the output once written.
    report_path = output if not skip and output is not None else None
    plans: list[_Plan] = []

    def result(plan: _Plan, report: Report, dropped: int, size: int | None) -> EditResult:
        return EditResult(
            source=model.path,
            output=None if skip else output,
            dry_run=request.dry_run,
            engine=Engine.CONFIG,
            selected=tuple(r.path for r in selected),
            changes=changed,
            report=report,
            warnings=edit_warnings(
                changed,
                plan.optimizer,
                plan.model.optimizer_variables,
                output=output,
                dry_run=request.dry_run,
                model_format=model.format,
                plan=plan.optimizer_plan,
            ),
            optimizer_state=plan.optimizer,
            optimizer_variables=plan.model.optimizer_variables,
            optimizer_variables_dropped=dropped,
            input_bytes=input_bytes,
            output_bytes=size,
            assignment=request.assignment,
            optimizer_plan=plan.optimizer_plan,
        )

    previewed: list[EditResult] = []

    def plan() -> None:
        plans.append(_plan(request, with_weights(model), layers, after, raw_copy, report_path))
        if not skip:
            writer.prepare(plans[0].write)  # the config's checks, before the copy ends
        if request.preview is not None and plans[0].report is not None:
            previewed.append(result(plans[0], plans[0].report, plans[0].predicted_dropped, None))
            request.preview(previewed[0])

    # Only an archive read without its index can start its copy first (the other formats'
    # writers are Python work, which a thread would not overlap). When the plan then rewrites
    # the optimizer state, the writer patches that copy (KerasZipWriter.upgrade).
    early = model.format is ModelFormat.KERAS and not skip
    if not early:
        plan()
    output_bytes: int | None = None
    written: list[tuple[WriteRequest, WriteOutcome]] = []
    if not skip:
        assert output is not None

        def produce(tmp: Path) -> None:
            # Before the plan exists, guess the raw copy (see the docstring).
            write = plans[0].write if plans else raw_copy
            written[:] = [(write, writer.write(write, tmp))]

        def verify(tmp: Path) -> None:
            if written[0][0] is not plans[0].write:  # the guess was wrong
                # Patch the raw copy into the rewrite the plan asks for when the writer can
                # (the optimizer state of a .keras), else write it again.
                upgrade = getattr(writer, "upgrade", None)
                outcome = upgrade(written[0][0], plans[0].write, tmp) if upgrade else None
                if outcome is None:
                    produce(tmp)
                else:
                    written[:] = [(plans[0].write, outcome)]
            writer.verify(plans[0].write, tmp)

        output_bytes = write_atomically(output, produce, verify, meanwhile=plan if early else None)
    chosen = plans[0]
    dropped = written[0][1].optimizer_variables_dropped if written else chosen.predicted_dropped
    if previewed and dropped == chosen.predicted_dropped:
        return replace(previewed[0], output_bytes=output_bytes)
    report = chosen.report
    if report is None or dropped != chosen.predicted_dropped:
        # Read again from what is now on disk: the output replaced the input in place.
        report = _result_report(
            chosen.model,
            new_config,
            dropped,
            re_find=not skip and request.in_place,
            path=report_path,
            plan=chosen.optimizer_plan,
        )
    return result(chosen, report, dropped, output_bytes)


@dataclass(frozen=True)
class _Plan:
    """What the config route decided once the weights were indexed."""

    model: ModelFile  # the input, indexed
    optimizer: OptimizerState
    write: WriteRequest  # the raw-copy request itself when it stands
    predicted_dropped: int
    report: Report | None  # the result's report, read from the input while it is in place
    optimizer_plan: OptimizerPlan


def _plan(
    request: EditRequest,
    model: ModelFile,
    layers: tuple[LayerRecord, ...],
    after: dict[str, bool | None],
    raw_copy: WriteRequest,
    report_path: str | None,
) -> _Plan:
    model_trainable = _model_trainable(model.config)
    before = _states(model, layers, model_trainable)
    after_states = _states(model, records_with_flags(layers, after), model_trainable)
    set_changed = trainable_layers(before) != trainable_layers(after_states)
    optimizer_plan = plan_optimizer_state(
        model, before, after_states, request.optimizer_state, set_changed=set_changed
    )
    optimizer = optimizer_plan.state
    write = raw_copy
    if optimizer is OptimizerState.DROPPED:
        write = replace(raw_copy, model=model, drop_optimizer_state=True)
    elif optimizer is OptimizerState.REMAPPED:
        write = replace(raw_copy, model=model, optimizer_slots=optimizer_plan.slots)
    predicted = optimizer_plan.dropped
    report = None
    with contextlib.suppress(Exception):
        # The result's weights are the input's (verified: byte-identical, or dataset by
        # dataset when the optimizer state is rewritten), so its report reads BN values from
        # the input, still in place. A failure here must not cost the write: it is retried after.
        report = _result_report(
            model, raw_copy.config, predicted, re_find=False, path=report_path, plan=optimizer_plan
        )
    return _Plan(model, optimizer, write, predicted, report, optimizer_plan)


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
