"""Inspect a saved model: read it, walk it, resolve modes, find warnings. No Keras needed."""

from __future__ import annotations

import os
from dataclasses import replace

from bnfreeze.formats.readers import read_model, read_shapes, read_values
from bnfreeze.model import code_built, diagnostics, modes
from bnfreeze.model.records import Finding, LayerState, ModelFile, ModelFormat, Report, Runtime
from bnfreeze.model.walk import WalkedModel, walk


def inspect_file(path: str | os.PathLike[str], runtime: Runtime = Runtime.KERAS3) -> Report:
    """Inspect a saved `.keras` / `.h5` model file or unzipped `.keras` folder."""
    return inspect_model_file(read_model(path), runtime)


def inspect_model_file(model: ModelFile, runtime: Runtime = Runtime.KERAS3) -> Report:
    """Inspect a model read by :func:`bnfreeze.formats.readers.read_model`.

    Beneath each container whose layers code builds (a keras-hub class, a custom layer, a
    subclassed model: the config lists no layers for it), the BN layers are found in the
    weights file (:mod:`bnfreeze.model.code_built`) and listed with ``source=WEIGHTS``.
    """
    walked = walk(model.config, model.path)
    has_weights = _has_weights(model, walked)
    built = _code_built(model, walked)
    if built.records:
        walked = replace(walked, layers=_merged(walked.layers, built.records))
        for record in built.records:
            has_weights[record.path] = True
    loaded = model.format is not ModelFormat.MEMORY
    model_trainable = walked.trainable
    if loaded:
        model_trainable = modes.loaded_model_trainable(walked.class_name, walked.trainable, runtime)
    states = modes.resolve(
        walked.layers,
        model_trainable=model_trainable,
        has_weights=has_weights,
        runtime=runtime,
        loaded=loaded,
    )
    if built.rebuilt_weights and runtime is Runtime.KERAS3 and model_trainable:
        states = _rebuilt_sublayers_train(states, built)
    # Diagnostics read BN statistics by layer path: give them the new rows' datasets too.
    diagnosed = model
    if built.datasets and model.weights is not None:
        variables = {**model.weights.variables, **built.datasets}
        diagnosed = replace(model, weights=replace(model.weights, variables=variables))
    findings = diagnostics.find(
        diagnosed,
        states,
        model_trainable=model_trainable,
        read_values=(lambda names: read_values(model, names))
        if model.weights is not None
        else None,
        runtime=runtime,
        owners=built.owners,
    )
    if runtime is Runtime.KERAS3 and (model.keras_version or "").startswith(("2.", "1.")):
        findings += _keras2_hint(model, walked, states, has_weights)
    return Report(
        model=model,
        runtime=runtime,
        model_trainable=model_trainable,
        layers=states,
        warnings=findings,
    )


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
    """The walk's layers with the rows found in the weights placed right after their owner's
    last row (the model's own rows, for the model itself), so the table nests them."""
    if not extra:
        return layers
    by_parent: dict[str | None, list] = {}
    for record in extra:
        by_parent.setdefault(record.parent, []).append(record)
    out: list = []
    for record in layers:
        out.append(record)
        out.extend(by_parent.pop(record.path, []))
    for rest in by_parent.values():
        out.extend(rest)
    return tuple(out)
