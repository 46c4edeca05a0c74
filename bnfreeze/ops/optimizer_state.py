"""The saved optimizer state after an edit: which layers its slots follow, and whether it is
kept as it is, kept on request, or dropped.

Keras saves optimizer variables by position, in the order of the trainable variables, with no
names. When the *set* of trainable variables changes, Keras drops them on load with a warning,
or, when the count happens to match, silently assigns them to the wrong variables.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from bnfreeze.model.records import LayerState


class OptimizerState(enum.Enum):
    """What happened to the saved optimizer variables."""

    NONE = "none"  # the input holds none
    UNCHANGED = "unchanged"  # the set of trainable variables did not change: kept as they were
    KEPT = "kept"  # it changed, and they were kept on request (keep_optimizer_state=True)
    DROPPED = "dropped"  # it changed, so they were dropped (the default)


def trainable_layers(states: Sequence[LayerState]) -> frozenset[str]:
    """The layers whose variables ``fit()`` trains: the set the saved optimizer slots follow."""
    return frozenset(
        s.layer.path for s in states if s.in_fit.trains_weights and s.has_weights is not False
    )


def optimizer_decision(
    optimizer_variables: int | None, trainable_set_changed: bool, keep_optimizer_state: bool
) -> OptimizerState:
    """What to do with the saved optimizer variables: drop them only when they exist and the
    set of trainable variables changed, unless asked to keep them."""
    if not optimizer_variables:
        return OptimizerState.NONE
    if not trainable_set_changed:
        return OptimizerState.UNCHANGED
    return OptimizerState.KEPT if keep_optimizer_state else OptimizerState.DROPPED
