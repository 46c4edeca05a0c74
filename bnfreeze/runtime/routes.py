"""Which route applies an :class:`~bnfreeze.ops.request.EditRequest`, and the one call that
applies it: :func:`edit`.

* an in-memory model: :class:`~bnfreeze.runtime.memory_route.MemoryRoute`;
* a saved model with ``--engine keras``: :class:`~bnfreeze.runtime.keras_route.KerasRoute`;
* otherwise the config rewrite, :class:`~bnfreeze.ops.config_route.ConfigRoute`, which hands
  what a config cannot carry to the Keras engine with ``--engine auto`` and refuses it with
  ``--engine config``.

Nothing here imports Keras: a route imports it only when it loads a model.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from bnfreeze.model.assignments import Assignment
from bnfreeze.ops.config_route import ConfigRoute
from bnfreeze.ops.request import (
    EditRequest,
    EditResult,
    Engine,
    KerasModel,
    LayerSelection,
    Loading,
    Output,
    Route,
    check_model,
    check_output,
)

if TYPE_CHECKING:
    from bnfreeze.ops.plans import PlanApplication, PlannedEdit


def route_for(request: EditRequest) -> Route:
    """The route for ``request``. The Keras routes are imported only when they take the edit:
    a config edit, the common case, never loads their modules."""
    if not request.is_file:
        from bnfreeze.runtime.memory_route import MemoryRoute

        return MemoryRoute()
    engine = request.loading.engine
    if engine is Engine.KERAS:
        if request.bn_config:
            from bnfreeze.errors import BnfreezeError

            raise BnfreezeError(
                "BN class and synchronized edits are written by the config route; "
                "use --engine auto or config."
            )
        from bnfreeze.runtime.keras_route import KerasRoute

        return KerasRoute()
    return ConfigRoute(fallback=LazyKerasRoute() if engine is Engine.AUTO else None)


class LazyKerasRoute:
    """The ``--engine auto`` fallback: :class:`~bnfreeze.runtime.keras_route.KerasRoute`,
    imported only when a config edit hands it the request."""

    def edit(self, request: EditRequest) -> EditResult:
        from bnfreeze.runtime.keras_route import KerasRoute

        return KerasRoute().edit(request)


def edit(request: EditRequest) -> EditResult:
    """Apply ``request``: for a saved model, its output is checked before any work
    (:func:`~bnfreeze.ops.request.check_output`); the chosen route does the rest."""
    if request.is_file:
        request = check_output(request)
    return route_for(request).edit(request)


def apply_plan(planned: PlannedEdit) -> PlanApplication:
    """Apply a plan resolved against a model (:func:`bnfreeze.ops.plans.plan_edit_request`)."""
    from bnfreeze.ops.plans import PlanApplication

    return PlanApplication(plan=planned.plan, matches=planned.matches, result=edit(planned.request))


def edit_model(
    model_or_path: str | os.PathLike[str] | KerasModel,
    assignment: Assignment,
    selection: LayerSelection,
    output: Output,
    loading: Loading,
) -> EditResult:
    """Build the one :class:`~bnfreeze.ops.request.EditRequest` and apply it
    (:func:`edit`) for ``bnfreeze.freeze`` and ``bnfreeze.unfreeze``."""
    model: str | KerasModel
    if isinstance(model_or_path, str | os.PathLike):
        model = os.fspath(model_or_path)
        if assignment.batchnorm is not None and assignment != Assignment.freeze(train_bn=True):
            # Setting a BN flag makes a FrozenStatsBatchNormalization Keras's BN again.
            from bnfreeze.ops.frozen_stats import edit_as_batchnorm

            result: EditResult = edit_as_batchnorm(
                lambda path, out: edit(EditRequest(path, assignment, selection, out, loading)),
                path=model,
                output=output,
                selection=selection,
            )
            return result
    else:
        check_model(model_or_path)
        model = model_or_path
    return edit(EditRequest(model, assignment, selection, output, loading))
