"""Converting the BatchNormalization layers of a live Keras 3 model to bnfreeze's
``FrozenStatsBatchNormalization`` and back, in place.

``FrozenStatsBatchNormalization`` subclasses ``BatchNormalization`` and adds no state: it only
overrides ``call`` (every call takes the inference branch). So a live layer converts by
assigning its ``__class__``: the same object, the same variables, the same place in the
model's graph, for Functional, Sequential and subclassed models alike, nested or not. What
Keras traced before the change does not see it: a compiled model's next ``fit()`` needs
``compile()`` with a new optimizer first (docs/semantics.md, rule 4); :mod:`bnfreeze.api` warns.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from bnfreeze.errors import BnfreezeError, RecompileWarning, SelectionError
from bnfreeze.model.records import Finding, Runtime, WarningCode
from bnfreeze.ops.frozen_stats import BnClass, ClassChange, ConvertResult


def convert_live(
    model: Any,
    to: BnClass,
    *,
    layers: Sequence[str] = (),
    up_to: str | None = None,
    from_: str | None = None,
    dry_run: bool = False,
) -> tuple[tuple[str, ...], tuple[ClassChange, ...]]:
    """Give the selected BN layers of ``model`` (every BN layer by default) the class ``to``;
    return the selected BN paths and the changes."""
    import keras

    from bnfreeze.model.selection import select
    from bnfreeze.runtime.layers import FrozenStatsBatchNormalization
    from bnfreeze.runtime.live import live_model

    live = live_model(model)
    chosen = select(live.records, layers=tuple(layers), up_to=up_to, from_=from_)
    bn = [
        (r.path, live.layers[r.path])
        for r in chosen
        if isinstance(live.layers.get(r.path), keras.layers.BatchNormalization)
    ]
    if not bn:
        raise SelectionError("the selection holds no BatchNormalization layer.")
    changes = []
    for path, layer in bn:
        current = type(layer)
        if to is BnClass.FROZEN_STATS:
            if current is FrozenStatsBatchNormalization:
                continue
            if current is not keras.layers.BatchNormalization:
                raise SelectionError(
                    f"{path} is a {current.__qualname__}, a subclass of BatchNormalization "
                    "with its own code; bnfreeze converts only Keras's own BatchNormalization."
                )
            if layer.renorm:
                raise SelectionError(
                    f"{path} uses batch renormalization (renorm=True), which exists only in "
                    "the training branch: it cannot have frozen statistics.",
                    hint="Leave it out of the selection with layers=.",
                )
            new: type = FrozenStatsBatchNormalization
            changes.append(ClassChange(path, "BatchNormalization", "FrozenStatsBatchNormalization"))
        else:
            if current is not FrozenStatsBatchNormalization:
                continue
            new = keras.layers.BatchNormalization
            changes.append(ClassChange(path, "FrozenStatsBatchNormalization", "BatchNormalization"))
        if not dry_run:
            layer.__class__ = new
    return tuple(p for p, _ in bn), tuple(changes)


#: The frame the warning points at: the caller of bnfreeze.freeze, above convert_model,
#: bnfreeze.api._frozen_stats and bnfreeze.freeze.
_STACKLEVEL = 4


def convert_model(
    model: Any,
    *,
    layers: tuple[str, ...],
    up_to: str | None,
    dry_run: bool,
    in_place: bool,
    output: Any,
) -> ConvertResult:
    """``bnfreeze.freeze(model, bn_frozen_stats=True)`` on a live Keras 3 model: the selected
    BN layers become ``FrozenStatsBatchNormalization`` in place (:func:`convert_live`), with a
    :class:`~bnfreeze.errors.RecompileWarning` when the model is compiled."""
    from bnfreeze.runtime.live import live_report, runtime_of
    from bnfreeze.runtime.memory_route import TrainingState, training_state

    if runtime_of(model) is Runtime.TF_KERAS:
        raise BnfreezeError("bn_frozen_stats works on Keras 3 models; this is a tf_keras model.")
    if output is not None or in_place:
        raise BnfreezeError(
            "bn_frozen_stats on an in-memory model changes it in place; save it with "
            "model.save() (output= and in_place= apply to saved files)."
        )
    state = training_state(model)
    selected, changes = convert_live(
        model, BnClass.FROZEN_STATS, layers=layers, up_to=up_to, dry_run=dry_run
    )
    findings: list[Finding] = []
    if changes and state is not TrainingState.UNCOMPILED:
        text = (
            f"bnfreeze changed the class of {len(changes)} BatchNormalization layer(s) of model "
            f"{model.name!r}, which is compiled: a training step Keras traced before keeps the "
            "old behaviour. Call bnfreeze.recompile(model) (or compile() with a new optimizer) "
            "before fit()."
        )
        findings.append(Finding(WarningCode.RECOMPILE_REQUIRED, None, text))
        if not dry_run:
            warnings.warn(text, RecompileWarning, stacklevel=_STACKLEVEL)
    report = live_report(model)
    findings.extend(f for f in report.warnings if f.code is WarningCode.NEEDS_BNFREEZE)
    return ConvertResult(
        source=f"<in-memory model {model.name!r}>",
        output=None,
        dry_run=dry_run,
        selected=selected,
        changes=changes,
        report=report,
        warnings=tuple(findings),
        input_bytes=0,
        output_bytes=None,
    )
