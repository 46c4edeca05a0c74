"""What the user must know after an edit: load the output before ``fit()`` (a model compiled
in memory ignores the change), and saved optimizer state that was dropped or kept although it
no longer matches. Remapped state is a fact, not a warning (``render.edit.optimizer_line``)."""

from __future__ import annotations

from collections.abc import Sequence

from bnfreeze.model.assignments import Change
from bnfreeze.model.records import Finding, ModelFormat, WarningCode
from bnfreeze.ops.optimizer_state import OptimizerPlan, OptimizerState


def edit_warnings(
    changes_made: Sequence[Change],
    optimizer: OptimizerState,
    optimizer_variables: int | None,
    *,
    output: str | None,
    dry_run: bool,
    model_format: ModelFormat = ModelFormat.KERAS,
    loader: str = "keras.models.load_model",
    plan: OptimizerPlan | None = None,
) -> tuple[Finding, ...]:
    """What the user must know after an edit: compile() again, and the optimizer state.

    ``loader`` is what the output must be loaded with: ``bnfreeze.load_model`` when the
    output records flags Keras does not save (:mod:`bnfreeze.formats.recorded_flags`)."""
    if not changes_made:
        return ()
    target = output or "the model"
    would = "would be" if dry_run else "were"
    findings = [
        Finding(
            WarningCode.RECOMPILE_REQUIRED,
            None,
            f"{len(changes_made)} trainable flag(s) changed. Load {target} with {loader} "
            "before fit(): the loaded model is compiled for the new flags. A model already "
            "compiled in memory ignores the change until compile() is called again with a new "
            "optimizer (rule 4 of docs/semantics.md, bnfreeze explain).",
        )
    ]
    message = _optimizer_message(optimizer, optimizer_variables, plan, would, model_format)
    if message is not None:
        findings.append(Finding(WarningCode.OPTIMIZER_STATE, None, message))
    return tuple(findings)


def _optimizer_message(
    optimizer: OptimizerState,
    saved: int | None,
    plan: OptimizerPlan | None,
    would: str,
    model_format: ModelFormat,
) -> str | None:
    expected = plan.expected if plan is not None else None
    if optimizer is OptimizerState.REMAPPED:
        return None  # a fact, not a warning: render.edit.optimizer_line says it
    if optimizer is OptimizerState.DROPPED:
        why = ""
        if plan is not None and plan.reason is not None:
            why = f" They could not be remapped: {plan.reason}."
        elif plan is not None:
            why = " (--optimizer-state drop)."
        loaded = ""
        if model_format is ModelFormat.KERAS:
            # Measured on Keras 3.15: one UserWarning on load, then training works.
            loaded = (
                "; its message 'Skipping variable loading for optimizer ... the saved "
                "optimizer has 0 variables' is expected"
            )
        return (
            f"The {saved} saved optimizer variables {would} dropped: Keras matches them to "
            "trainable variables by position, and the set of trainable variables changed."
            f"{why} Keras will compile the loaded model from its saved compile config with a "
            f"fresh optimizer{loaded}. Pass --optimizer-state keep to keep them as they are."
        )
    if optimizer is OptimizerState.KEPT:
        if expected is not None and expected == saved:
            effect = (
                f"the new trainable set needs {expected} variables too, so the count matches "
                "here and Keras WILL load them silently into the wrong variables (moments of "
                "one variable applied to another)"
            )
        elif expected is not None:
            effect = (
                f"Keras builds {expected} for the new trainable set, so it will skip them on "
                "load with a warning"
            )
        else:
            effect = (
                "Keras will drop them on load with a warning or, when the count happens to "
                "match, silently assign them to the wrong variables"
            )
        return (
            f"The {saved} saved optimizer variables {would} kept as they are "
            "(--optimizer-state keep) although the set of trainable variables changed: Keras "
            f"matches them by position, and {effect}. Compile with a new optimizer before "
            "fit(), or use --optimizer-state remap."
        )
    return None
