"""Inspect a saved model: read it, walk it, resolve modes, find warnings. No Keras needed."""

from __future__ import annotations

import os

from bnfreeze.formats.readers import read_model, read_values
from bnfreeze.model import diagnostics, modes
from bnfreeze.model.records import ModelFile, ModelFormat, Report, Runtime
from bnfreeze.model.walk import walk


def inspect_file(path: str | os.PathLike[str], runtime: Runtime = Runtime.KERAS3) -> Report:
    """Inspect a saved `.keras` / `.h5` model file or unzipped `.keras` folder."""
    return inspect_model_file(read_model(path), runtime)


def inspect_model_file(model: ModelFile, runtime: Runtime = Runtime.KERAS3) -> Report:
    walked = walk(model.config, model.path)
    has_weights: dict[str, bool | None] = {}
    index = model.weights.variables if model.weights is not None else None
    for record in walked.layers:
        if index is not None and record.path in index:
            has_weights[record.path] = bool(index[record.path])
        else:
            has_weights[record.path] = modes.has_weights_by_class(record)
    model_trainable = walked.trainable
    if model.format is not ModelFormat.MEMORY:
        model_trainable = modes.loaded_model_trainable(walked.class_name, walked.trainable, runtime)
    states = modes.resolve(
        walked.layers,
        model_trainable=model_trainable,
        has_weights=has_weights,
        runtime=runtime,
        loaded=model.format is not ModelFormat.MEMORY,
    )
    findings = diagnostics.find(
        model,
        states,
        model_trainable=model_trainable,
        read_values=(lambda names: read_values(model, names)) if index is not None else None,
        runtime=runtime,
    )
    if runtime is Runtime.KERAS3 and (model.keras_version or "").startswith(("2.", "1.")):
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
        findings += tuple(diagnostics.keras2_hint(model, states, other))
    return Report(
        model=model,
        runtime=runtime,
        model_trainable=model_trainable,
        layers=states,
        warnings=findings,
    )
