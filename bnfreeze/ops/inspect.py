"""Inspect a saved model: read it, walk it, resolve modes, find warnings. No Keras needed."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace

from bnfreeze.formats.readers import read_model, read_shapes, read_values
from bnfreeze.model import code_built, diagnostics, modes
from bnfreeze.model.records import Finding, LayerState, ModelFile, ModelFormat, Report, Runtime
from bnfreeze.model.walk import WalkedModel, walk
from bnfreeze.ops import recorded_view

#: Asks Keras which layers it rebuilds for a file (:func:`bnfreeze.runtime.rebuilt.ask`):
#: the rows, or None and why Keras could not be asked.
AskKeras = Callable[[ModelFile, set[str]], tuple[code_built.Rebuilt | None, str | None]]


def inspect_file(
    path: str | os.PathLike[str],
    runtime: Runtime = Runtime.KERAS3,
    *,
    ask_keras: AskKeras | None = None,
) -> Report:
    """Inspect a saved `.keras` / `.h5` model file or unzipped `.keras` folder.

    ``ask_keras``: when the file holds layers that code builds, ask Keras how it loads them
    (:func:`bnfreeze.runtime.rebuilt.ask`: the CLI and ``verify`` pass it) instead of
    predicting them by rule.
    """
    return inspect_model_file(read_model(path), runtime, ask_keras=ask_keras)


def inspect_model_file(
    model: ModelFile, runtime: Runtime = Runtime.KERAS3, *, ask_keras: AskKeras | None = None
) -> Report:
    """Inspect a model read by :func:`bnfreeze.formats.readers.read_model`.

    Beneath each container whose layers code builds (a keras-hub class, a custom layer, a
    subclassed model: the config lists no layers for it), the layers are either asked of
    Keras (``ask_keras``, when it is installed: ``source=KERAS``, the flags and paths
    ``keras.models.load_model`` gives them), or the BN layers are found in the weights file
    (:mod:`bnfreeze.model.code_built`) and listed with ``source=WEIGHTS``, their mode
    predicted by the rule "Keras rebuilds a code-built layer with ``trainable=True``".
    """
    rows = _rows(model, ask_keras)
    loaded = model.format is not ModelFormat.MEMORY
    model_trainable = rows.walked.trainable
    if loaded:
        model_trainable = modes.loaded_model_trainable(
            rows.walked.class_name, rows.walked.trainable, runtime
        )
    states = modes.resolve(
        rows.walked.layers,
        model_trainable=model_trainable,
        has_weights=rows.has_weights,
        runtime=runtime,
        loaded=loaded,
    )
    if rows.built.rebuilt_weights and runtime is Runtime.KERAS3 and model_trainable:
        states = _rebuilt_sublayers_train(states, rows.built)
    return Report(
        model=model,
        runtime=runtime,
        model_trainable=model_trainable,
        layers=states,
        warnings=_findings(model, rows, states, model_trainable, runtime),
    )


@dataclass
class _Rows:
    """The layers a report lists: the config's, and those code builds (asked of Keras, or
    found in the weights file by rule)."""

    walked: WalkedModel
    has_weights: dict[str, bool | None]
    built: code_built.CodeBuilt
    rebuilt: code_built.Rebuilt | None
    keras_note: str | None  # why Keras was not asked, when it was meant to be
    file_datasets: dict[str, tuple[str, ...]]  # the weights file's groups of the rows by rule


def _rows(model: ModelFile, ask_keras: AskKeras | None) -> _Rows:
    walked = walk(model.config, model.path)
    inner = code_built.wrapped(walked, model.config)
    if inner:
        walked = replace(walked, layers=_merged(walked.layers, inner))
    has_weights = _has_weights(model, walked)
    built = _code_built(model, walked)
    file_datasets = dict(built.datasets)
    rebuilt = None
    keras_note: str | None = None
    if ask_keras is not None and built.owners and model.format is not ModelFormat.MEMORY:
        rebuilt, keras_note = ask_keras(model, {r.path for r in walked.layers})
    if rebuilt is not None:
        walked = replace(walked, layers=_merged(walked.layers, rebuilt.records))
        has_weights.update(rebuilt.has_weights)
        built = replace(built, records=(), datasets=dict(rebuilt.datasets))
    elif built.records:
        walked = replace(walked, layers=_merged(walked.layers, built.records))
        for record in built.records:
            has_weights[record.path] = True
    return _Rows(walked, has_weights, built, rebuilt, keras_note, file_datasets)


def _findings(
    model: ModelFile,
    rows: _Rows,
    states: tuple[LayerState, ...],
    model_trainable: bool,
    runtime: Runtime,
) -> tuple[Finding, ...]:
    # Diagnostics read BN statistics by layer path: give them the new rows' datasets too.
    diagnosed = model
    if rows.built.datasets and model.weights is not None:
        variables = {**model.weights.variables, **rows.built.datasets}
        diagnosed = replace(model, weights=replace(model.weights, variables=variables))
    live_values = rows.rebuilt.values if rows.rebuilt is not None else {}

    def values(names: list[str]) -> dict[str, object]:
        found: dict[str, object] = {n: live_values[n] for n in names if n in live_values}
        rest = [n for n in names if n not in live_values]
        if rest:
            found.update(read_values(model, rest))
        return found

    findings = diagnostics.find(
        diagnosed,
        states,
        model_trainable=model_trainable,
        read_values=values if model.weights is not None else None,
        runtime=runtime,
        owners=rows.built.owners,
    )
    if rows.keras_note is not None:
        findings = (diagnostics.keras_not_asked(rows.keras_note), *findings)
    if model.weights is not None:
        saved = recorded_view.groups({**model.weights.variables, **rows.file_datasets})
        if rows.rebuilt is not None:
            saved.update(rows.rebuilt.saved)  # Keras's own paths for the rows it rebuilt
        findings += recorded_view.findings(model, states, saved)
    if runtime is Runtime.KERAS3 and (model.keras_version or "").startswith(("2.", "1.")):
        findings += _keras2_hint(model, rows.walked, states, rows.has_weights)
    return findings


def _has_weights(model: ModelFile, walked: WalkedModel) -> dict[str, bool | None]:
    """Whether each layer holds variables: from the weights index, else from its class."""
    index = model.weights.variables if model.weights is not None else None
    has_weights: dict[str, bool | None] = {}
    for record in walked.layers:
        if index is not None and record.path in index:
            has_weights[record.path] = bool(index[record.path])
        else:
            has_weights[record.path] = modes.has_weights_by_class(record)
    return has_weights


def _code_built(model: ModelFile, walked: WalkedModel) -> code_built.CodeBuilt:
    """The BN layers code builds, found in the weights file (none for a live model)."""
    if model.format is ModelFormat.MEMORY or model.weights is None:
        return code_built.CodeBuilt((), (), {})
    return code_built.find(
        model,
        walked,
        read_shapes=lambda names: read_shapes(model, names),
        read_values=lambda names: read_values(model, names),
    )


def _rebuilt_sublayers_train(
    states: tuple[LayerState, ...], built: code_built.CodeBuilt
) -> tuple[LayerState, ...]:
    """On Keras 3 only a layer's own flag counts, and Keras rebuilds the sublayers of a
    code-built layer trainable: their weights train even if the layer's flag is False."""
    return tuple(
        replace(s, in_fit=replace(s.in_fit, trains_weights=True))
        if s.layer.path in built.rebuilt_weights and s.in_fit.trains_weights is False
        else s
        for s in states
    )


def _keras2_hint(
    model: ModelFile,
    walked: WalkedModel,
    states: tuple[LayerState, ...],
    has_weights: dict[str, bool | None],
) -> tuple[Finding, ...]:
    """A model saved by Keras 2: what changes if it is loaded with tf_keras instead."""
    tf_keras_trainable = modes.loaded_model_trainable(
        walked.class_name, walked.trainable, Runtime.TF_KERAS
    )
    other = modes.resolve(
        walked.layers,
        model_trainable=tf_keras_trainable,
        has_weights=has_weights,
        runtime=Runtime.TF_KERAS,
        loaded=model.format is not ModelFormat.MEMORY,
    )
    return tuple(diagnostics.keras2_hint(model, states, other))


def _merged(layers: tuple, extra: tuple) -> tuple:
    """The walk's layers with the rows found in the weights (or asked of Keras) placed right
    after their parent's row, each followed by its own children, so the table nests them;
    rows whose parent no row holds (the model's own) come last."""
    if not extra:
        return layers
    by_parent: dict[str | None, list] = {}
    for record in extra:
        by_parent.setdefault(record.parent, []).append(record)
    out: list = []

    def emit(record: object) -> None:
        out.append(record)
        for child in by_parent.pop(record.path, []):  # type: ignore[attr-defined]
            emit(child)

    for record in layers:
        emit(record)
    while by_parent:
        parent = next(iter(by_parent))
        for record in by_parent.pop(parent):
            emit(record)
    return tuple(out)
