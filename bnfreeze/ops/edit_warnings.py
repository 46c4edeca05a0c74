"""What the user must know after an edit: call ``compile()`` again, and what happened to the
saved optimizer state."""

from __future__ import annotations

from collections.abc import Sequence

from bnfreeze.model.assignments import Change
from bnfreeze.model.records import Finding, ModelFormat, WarningCode
from bnfreeze.ops.optimizer_state import OptimizerState


def edit_warnings(
    changes_made: Sequence[Change],
    optimizer: OptimizerState,
    optimizer_variables: int | None,
    *,
    output: str | None,
    dry_run: bool,
    model_format: ModelFormat = ModelFormat.KERAS,
    loader: str = "keras.models.load_model",
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
            f"{len(changes_made)} trainable flag(s) changed. Load {target} with "
            f"{loader} and call compile() again with a NEW optimizer before "
            "fit(): a model already compiled or trained in memory ignores flag changes until "
            "it is recompiled, and reusing its built optimizer fails with 'Unknown variable' "
            "(bnfreeze explain, rule 4).",
        )
    ]
    expected = ""
    if model_format is ModelFormat.KERAS:
        # Measured on Keras 3.15: one UserWarning on load, then training works.
        expected = (
            "; its message 'Skipping variable loading for optimizer ... the saved optimizer "
            "has 0 variables' is expected"
        )
    if optimizer is OptimizerState.DROPPED:
        findings.append(
            Finding(
                WarningCode.OPTIMIZER_STATE,
                None,
                f"The {optimizer_variables} saved optimizer variables {would} dropped: they are "
                "matched to trainable variables by position, and the set of trainable "
                "variables changed. Keras will compile the loaded model from its saved compile "
                f"config with a fresh optimizer{expected}. Pass --keep-optimizer-state to keep "
                "them.",
            )
        )
    elif optimizer is OptimizerState.KEPT:
        findings.append(
            Finding(
                WarningCode.OPTIMIZER_STATE,
                None,
                f"The {optimizer_variables} saved optimizer variables {would} kept "
                "(--keep-optimizer-state) although the set of trainable variables changed: "
                "they are matched by position, so Keras will drop them on load with a warning "
                "or, when the count happens to match, silently assign them to the wrong "
                "variables. Compile with a new optimizer before fit().",
            )
        )
    return tuple(findings)
