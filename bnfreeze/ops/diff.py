"""Compare two saved models: which layers' flags or ``fit()`` behaviour differ, whether the
weights are identical (a checksum per dataset), and how the number of layers that train
changed. Both files are read as ``inspect`` reads them; nothing is loaded into Keras.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

from bnfreeze.formats.readers.checksums import checksums
from bnfreeze.model.records import LayerState, Report
from bnfreeze.ops.inspect import inspect_file


class LayerStatus(enum.Enum):
    CHANGED = "changed"  # in both models, with a different flag or fit() behaviour
    ONLY_IN_A = "only-in-a"
    ONLY_IN_B = "only-in-b"


@dataclass(frozen=True)
class LayerDiff:
    path: str
    status: LayerStatus
    a: LayerState | None
    b: LayerState | None

    @property
    def class_name(self) -> str:
        state = self.a or self.b
        assert state is not None
        return state.layer.shown_class

    @property
    def flag_changed(self) -> bool:
        return (
            self.a is not None
            and self.b is not None
            and (self.a.layer.trainable != self.b.layer.trainable)
        )

    @property
    def fit_changed(self) -> bool:
        return self.a is not None and self.b is not None and self.a.in_fit != self.b.in_fit


@dataclass(frozen=True)
class WeightsDiff:
    """Model weights compared dataset by dataset (optimizer state apart)."""

    datasets: int  # datasets in A
    changed: tuple[str, ...]  # in both, different values, dtype or shape
    only_in_a: tuple[str, ...]
    only_in_b: tuple[str, ...]
    changed_layers: tuple[str, ...]  # layer paths owning a changed dataset, where known
    optimizer_a: int  # optimizer state datasets in A
    optimizer_b: int
    optimizer_identical: bool

    @property
    def identical(self) -> bool:
        return not (self.changed or self.only_in_a or self.only_in_b)


@dataclass(frozen=True)
class DiffResult:
    a: Report
    b: Report
    layers: tuple[LayerDiff, ...]
    weights: WeightsDiff

    @property
    def training_layers_a(self) -> int:
        return training_layers(self.a)

    @property
    def training_layers_b(self) -> int:
        return training_layers(self.b)

    @property
    def identical(self) -> bool:
        """No layer differs and the weights are identical."""
        return not self.layers and self.weights.identical


def training_layers(report: Report) -> int:
    """Layers whose weights train in ``fit()``."""
    return sum(1 for s in report.layers if s.in_fit.trains_weights)


def diff_files(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> DiffResult:
    return diff_reports(inspect_file(a), inspect_file(b))


def diff_reports(a: Report, b: Report) -> DiffResult:
    in_b = {s.layer.path: s for s in b.layers}
    in_a = {s.layer.path: s for s in a.layers}
    layers: list[LayerDiff] = []
    for state in a.layers:
        other = in_b.get(state.layer.path)
        if other is None:
            layers.append(LayerDiff(state.layer.path, LayerStatus.ONLY_IN_A, state, None))
        elif (
            state.layer.trainable != other.layer.trainable
            or state.in_fit != other.in_fit
            or state.layer.shown_class != other.layer.shown_class
        ):
            layers.append(LayerDiff(state.layer.path, LayerStatus.CHANGED, state, other))
    for state in b.layers:
        if state.layer.path not in in_a:
            layers.append(LayerDiff(state.layer.path, LayerStatus.ONLY_IN_B, None, state))
    return DiffResult(a=a, b=b, layers=tuple(layers), weights=_weights(a, b))


def _weights(a: Report, b: Report) -> WeightsDiff:
    sums_a = checksums(a.model)
    sums_b = checksums(b.model)
    wa, wb = sums_a.weights, sums_b.weights
    changed = tuple(name for name in wa if name in wb and wa[name] != wb[name])
    owner: dict[str, str] = {}
    for report in (a, b):
        if report.model.weights is not None:
            for layer, datasets in report.model.weights.variables.items():
                for dataset in datasets:
                    owner.setdefault(dataset, layer)
    changed_layers = tuple(dict.fromkeys(owner[n] for n in changed if n in owner))
    return WeightsDiff(
        datasets=len(wa),
        changed=changed,
        only_in_a=tuple(n for n in wa if n not in wb),
        only_in_b=tuple(n for n in wb if n not in wa),
        changed_layers=changed_layers,
        optimizer_a=len(sums_a.optimizer),
        optimizer_b=len(sums_b.optimizer),
        optimizer_identical=sums_a.optimizer == sums_b.optimizer,
    )
