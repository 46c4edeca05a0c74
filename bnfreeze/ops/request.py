"""An edit of a model as values: the :class:`EditRequest` that goes in, the :class:`Route`
that applies it, the :class:`EditResult` that comes out.

An :class:`EditRequest` is the only carrier of edit options. It is built once, by the CLI
(:mod:`bnfreeze.cli`), the Python API (:mod:`bnfreeze.api`) or the plan runner
(:mod:`bnfreeze.ops.plans`), from small parts:

* :class:`LayerSelection`: which layers (``layers``, ``up_to``, ``from_``);
* :class:`~bnfreeze.model.assignments.Assignment`: the flag BN and other layers get;
* :class:`Output`: where the result goes (``path``, ``in_place``, ``dry_run``);
* :class:`Loading`: how the model is loaded and saved (``engine``, ``custom_objects``,
  ``unsafe``, ``optimizer_state``).

Three routes apply a request (:func:`bnfreeze.runtime.routes.route_for` picks one): the
config rewrite (:mod:`bnfreeze.ops.config_route`, no TensorFlow), the Keras engine
(:mod:`bnfreeze.runtime.keras_route`) and the in-memory model
(:mod:`bnfreeze.runtime.memory_route`).
"""

from __future__ import annotations

import enum
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from bnfreeze.errors import BnfreezeError, OutputError
from bnfreeze.model.assignments import Assignment, Change
from bnfreeze.model.records import Finding, LayerRecord, Normalization, Report, WarningCode
from bnfreeze.model.selection import select
from bnfreeze.ops.optimizer_state import (
    OptimizerPlan,
    OptimizerState,
    OptimizerStateMode,
    parse_mode,
)


class Engine(enum.Enum):
    """How a saved model is edited."""

    AUTO = "auto"  # config, unless config_route_limit() names a reason to load with Keras
    CONFIG = "config"  # rewrite the saved config; no TensorFlow
    KERAS = "keras"  # load with Keras, set flags on the live layers, save


class KerasModel(Protocol):
    """What an edit needs of an in-memory model: a ``keras.Model`` or a ``tf_keras.Model``.

    Keras ships no type information, so a type checker sees a real model as ``Any``, which
    fits; this protocol is what rules out a number or a list where a model belongs."""

    @property
    def name(self) -> str: ...

    @property
    def layers(self) -> Any: ...

    def compile(self, *args: Any, **kwargs: Any) -> Any: ...


def check_model(value: Any) -> None:
    """A Keras 3 ``keras.Model`` or a tf_keras ``tf_keras.Model``; never imports either (an
    object of one exists only if the caller imported it)."""
    for name in ("keras", "tf_keras"):
        module = sys.modules.get(name)
        if module is not None and isinstance(value, module.Model):
            return
    raise TypeError(
        "expected a keras.Model, a tf_keras.Model or a path to a saved model, not "
        f"{type(value).__name__}"
    )


@dataclass(frozen=True)
class LayerSelection:
    """Which layers an edit applies to: the intersection of the given selectors; all leaves
    when none is given (see :func:`bnfreeze.model.selection.select`)."""

    layers: tuple[str, ...] = ()  # globs on layer paths or names (--layers)
    up_to: str | None = None  # a layer path or name, inclusive (--up-to)
    from_: str | None = None  # a layer path or name, inclusive (--from)

    def apply(self, records: Sequence[LayerRecord]) -> tuple[LayerRecord, ...]:
        return select(records, layers=self.layers, up_to=self.up_to, from_=self.from_)


@dataclass(frozen=True)
class Output:
    """Where the result goes: ``path`` (the input itself with ``in_place``), or nowhere on a
    dry run without one."""

    path: str | None = None
    in_place: bool = False
    dry_run: bool = False


@dataclass(frozen=True)
class Loading:
    """How the model is loaded and saved. ``custom_objects`` and ``unsafe`` only matter
    when Keras loads it; ``custom_objects`` names a module or ``.py`` file, or (for an
    in-memory model) maps names to classes."""

    engine: Engine = Engine.AUTO
    custom_objects: str | Mapping[str, object] | None = None
    unsafe: bool = False
    optimizer_state: OptimizerStateMode = OptimizerStateMode.REMAP

    @classmethod
    def of(
        cls,
        engine: str,
        custom_objects: str | Mapping[str, object] | None,
        unsafe: bool,
        optimizer_state: str | None,
    ) -> Loading:
        """The loading options as the CLI and the Python API spell them: ``engine`` a
        name, ``optimizer_state`` a mode's name or None (``remap``)."""
        return cls(Engine(engine), custom_objects, unsafe, parse_mode(optimizer_state))


@dataclass(frozen=True)
class BnConfig:
    """What an edit sets in BN layers' saved config besides their flags (a plan's
    ``bn = "frozen-stats"`` and ``synchronized``; :mod:`bnfreeze.ops.bn_config`). Only the
    config route carries it; the weights are kept as they are."""

    #: (layer path, "frozen-stats" | "batchnorm"): the class each BN layer gets.
    classes: tuple[tuple[str, str], ...] = ()
    #: (layer path, value): the ``synchronized`` each BN layer gets.
    synchronized: tuple[tuple[str, bool], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.classes or self.synchronized)


@dataclass(frozen=True)
class EditRequest:
    """Everything one edit needs, as the user gave it; checked when made.

    ``model`` is a saved model's path or an in-memory model.
    """

    model: str | KerasModel
    assignment: Assignment
    selection: LayerSelection = LayerSelection()
    output: Output = Output()
    loading: Loading = Loading()
    bn_config: BnConfig = BnConfig()

    def __post_init__(self) -> None:
        custom = self.loading.custom_objects
        if self.is_file and custom is not None and not isinstance(custom, str):
            raise BnfreezeError(
                "for a saved model, custom_objects names a module or .py file (as "
                "--custom-objects does)."
            )
        if not self.is_file and self.output.in_place:
            raise BnfreezeError(
                "in_place applies to saved files; an in-memory model is always changed in place."
            )

    @property
    def is_file(self) -> bool:
        return isinstance(self.model, str)

    @property
    def path(self) -> str:
        """The saved model's path (only for a request on a file)."""
        assert isinstance(self.model, str)
        return self.model


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
    #: BN layers whose class or ``synchronized`` the edit changed (a plan's ``bn =
    #: "frozen-stats"`` or ``synchronized``: :class:`BnConfig`), besides ``changes``.
    bn_config_changes: int = 0

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


# -- checks made before any work, on every route that writes a file ----------------------


def check_output(request: EditRequest) -> EditRequest:
    """Validate where the result goes, before any work; return the request with ``output``
    resolved (the input path for ``in_place``).

    Refuses: no output without ``dry_run``/``in_place``; ``in_place`` with a different
    output; an output that is the input without ``in_place``; an output in a folder that is
    missing or not writable, or that is a directory.
    """
    from bnfreeze.formats.atomic import check_destination

    source = Path(request.path)
    output = request.output.path
    if request.output.in_place and source.is_dir():
        raise OutputError(
            f"--in-place cannot rewrite the folder {source}: bnfreeze writes an edited unzipped "
            ".keras folder as a .keras file, the format model.save('x.keras') writes.",
            hint="Give -o OUT.keras instead; keras.models.load_model('OUT.keras') loads it.",
        )
    if request.output.in_place:
        if output is not None and not _same_file(source, Path(output)):
            raise OutputError(
                f"--in-place rewrites {source} itself, but -o names {output}.",
                hint="Give either -o OUT or --in-place.",
            )
        output = request.path
    elif output is None:
        if not request.output.dry_run:
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
    return replace(request, output=replace(request.output, path=output))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


class Route(Protocol):
    """One way to apply an :class:`EditRequest`: the config rewrite, the Keras engine, the
    in-memory model."""

    def edit(self, request: EditRequest) -> EditResult: ...
