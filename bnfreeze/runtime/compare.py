"""Comparing a measurement with ``inspect``'s prediction, and judging expectations on it.

Pure: no Keras. Only what both sides know is compared.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

from bnfreeze.model.expectations import Expectation, Failure, Observed, evaluate
from bnfreeze.model.measured import (
    Aspect,
    Disagreement,
    LayerMeasurement,
    Movement,
    RuntimeInfo,
    TrainingSetup,
    VerifyReport,
)
from bnfreeze.model.records import LayerState, Normalization, Report


def compare(
    *,
    path: str,
    runtime: RuntimeInfo,
    setup: TrainingSetup,
    measured: Sequence[LayerMeasurement],
    prediction: Report | None,
    expectations: Sequence[Expectation] = (),
    notes: tuple[str, ...] = (),
) -> VerifyReport:
    """Compare a measurement with ``inspect``'s prediction and judge the expectations.

    Pure: no Keras. Only what both sides know is compared: a prediction of None (a custom
    class's moving statistics, say) or a layer without such variables is skipped. A measured
    BN layer that no check compares (inspect did not predict it) is a failed comparison
    (:attr:`VerifyReport.bn_not_compared`), so the report never agrees on it.
    """
    predicted: dict[str, LayerState] = (
        {s.layer.path: s for s in prediction.layers} if prediction is not None else {}
    )
    if prediction is not None:
        # "In the file" means inspect lists it: from the config, or from the weights.
        measured = [replace(m, in_file=m.path in predicted) for m in measured]
    checks, disagreements, bn_not_compared, bn_not_called = _compare_layers(
        measured, predicted, prediction is not None
    )
    measured_paths = {m.path for m in measured}
    not_in_file = tuple(
        m.path for m in measured if prediction is not None and m.path not in predicted
    )
    not_measured = tuple(
        s.layer.path
        for s in (prediction.layers if prediction is not None else ())
        if s.has_weights and not s.layer.is_container and s.layer.path not in measured_paths
    )
    judged = tuple((e, _judge(e, measured, prediction)) for e in expectations)
    return VerifyReport(
        path=path,
        runtime=runtime,
        setup=setup,
        layers=tuple(measured),
        prediction=prediction,
        checks=checks,
        disagreements=tuple(disagreements),
        not_in_file=not_in_file,
        not_measured=not_measured,
        expectations=judged,
        notes=notes,
        bn_not_compared=tuple(bn_not_compared),
        bn_not_called=tuple(bn_not_called),
    )


def _compare_layers(
    measured: Sequence[LayerMeasurement], predicted: dict[str, LayerState], compared: bool
) -> tuple[int, list[Disagreement], list[str], list[str]]:
    """Each measured layer against its prediction: the number of checks, the disagreements,
    the BN layers no check compares and those never called."""
    checks = 0
    disagreements: list[Disagreement] = []
    bn_not_compared: list[str] = []
    bn_not_called: list[str] = []
    for m in measured:
        if m.not_called:
            # Never called in the steps: no branch was taken and nothing can be compared.
            bn_not_called.append(m.path)
            continue
        state = predicted.get(m.path)
        pairs = list(_pairs(m, state)) if state is not None else []
        deliberate = state is not None and state.layer.call_decided_by is not None
        if m.is_batchnorm and compared and not pairs and not deliberate:
            # Measured but not predicted: never counted as agreement. A BN that a custom
            # wrapper calls is listed with its mode left unknown, on purpose: its measured
            # mode is reported, not judged.
            bn_not_compared.append(m.path)
        for aspect, said, did in pairs:
            checks += 1
            if not _agrees(aspect, said, did):
                disagreements.append(Disagreement(m.path, aspect, said, did))
    return checks, disagreements, bn_not_compared, bn_not_called


def _agrees(aspect: Aspect, said: bool, did: Movement | Normalization) -> bool:
    if isinstance(did, Normalization):
        return (did is Normalization.BATCH) is said
    return did.changed is said if aspect is Aspect.MOVING_STATS else did.trained is said


def _pairs(
    m: LayerMeasurement, state: LayerState
) -> Iterable[tuple[Aspect, bool, Movement | Normalization]]:
    fit = state.in_fit
    # A built-in BN whose calls were recorded is compared on the branch it took; its moving
    # statistics are a fact of their own (momentum=1.0 keeps them still in the batch branch).
    if m.builtin and m.branch is not None and fit.normalizes_with is not None:
        yield Aspect.BRANCH, fit.normalizes_with is Normalization.BATCH, m.branch
    elif m.moving_stats is not Movement.NONE and fit.updates_moving_stats is not None:
        yield Aspect.MOVING_STATS, fit.updates_moving_stats, m.moving_stats
    if fit.trains_weights is None:
        return
    if m.gamma_beta is not Movement.NONE:
        yield Aspect.GAMMA_BETA, fit.trains_weights, m.gamma_beta
    if m.other_weights is not Movement.NONE:
        yield Aspect.WEIGHTS, fit.trains_weights, m.other_weights


def observed(measured: Iterable[LayerMeasurement]) -> dict[str, Observed]:
    """The measurement in the expectation vocabulary's terms (shared with ``check``)."""
    return {
        m.path: Observed(
            path=m.path,
            is_batchnorm=m.is_batchnorm,
            trains_weights=m.trains_weights,
            normalizes_with=m.normalizes_with,
        )
        for m in measured
    }


def _judge(
    expectation: Expectation, measured: Sequence[LayerMeasurement], prediction: Report | None
) -> tuple[Failure, ...]:
    from bnfreeze.model.records import LayerKind, LayerRecord

    seen = observed(measured)
    records: list[LayerRecord] = [s.layer for s in prediction.layers] if prediction else []
    known = {r.path for r in records}
    # Layers Keras showed but the file does not list (a BN inside a custom layer) count too.
    for m in measured:
        if m.path not in known:
            records.append(
                LayerRecord(
                    path=m.path,
                    name=m.path.rsplit("/", 1)[-1],
                    class_name=m.class_name,
                    kind=LayerKind.BATCHNORM if m.is_batchnorm else LayerKind.LAYER,
                    depth=m.path.count("/"),
                    parent=m.path.rsplit("/", 1)[0] if "/" in m.path else None,
                    trainable=None,
                )
            )
    return evaluate(expectation, records, seen)


def check_scopes(expectations: Sequence[Expectation], prediction: Report) -> None:
    layers = [s.layer for s in prediction.layers]
    for expectation in expectations:
        if expectation.scope is not None:
            expectation.scope.paths(layers)  # raises when the glob matches nothing
