"""The JSON contract (``schema_version`` 2). Keys are stable; tests compare by equality.

Every document carries ``schema_version``, ``command``, a ``runtime`` object
(:func:`runtime_dict`) and, for each model file it is about, a model object
(:func:`model_dict`): ``model``, or ``a`` and ``b`` for ``diff``. The JSON Schema of each
document ships in ``bnfreeze/schemas/`` (see docs/json.md).

Version 2: a layer's ``trainable`` is the flag Keras will have after loading the file; for a
layer read from the weights (``source: "weights"``: code builds it, the config does not list
it) that is True, because its flag is not saved. ``is_batchnorm`` may be null (the weights
cannot tell). ``model.keras_hub`` and ``summary.bn_from_weights`` are new.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from bnfreeze.model.hub import keras_hub
from bnfreeze.model.records import (
    Finding,
    FitBehaviour,
    LayerKind,
    LayerState,
    ModelFile,
    Report,
    Runtime,
)

if TYPE_CHECKING:
    from bnfreeze.model.measured import RuntimeInfo

#: 2: ``model`` is an object and ``runtime`` an object in every document, and every document
#: names its ``command`` (see docs/json.md).
SCHEMA_VERSION = 2


def model_dict(model: ModelFile | None, path: str | None = None) -> dict[str, Any]:
    """A model file, the same object in every document; ``None`` (with ``path``): a file whose
    config was not read, every other key ``null``."""
    if model is None:
        return {
            "path": path,
            "format": None,
            "keras_version": None,
            "compiled": None,
            "optimizer_variables": None,
            "keras_hub": None,
        }
    return {
        "path": model.path,
        "format": model.format.json_name,
        "keras_version": model.keras_version,
        "compiled": model.compiled,
        "optimizer_variables": model.optimizer_variables,
        "keras_hub": keras_hub_dict(model),
    }


def runtime_dict(
    runtime: Runtime,
    *,
    measured: bool = False,
    keras_version: str | None = None,
    backend: str | None = None,
    tensorflow_version: str | None = None,
) -> dict[str, Any]:
    """The rules a document follows, the same object in every document. ``measured`` False:
    predicted from the file, nothing loaded, so the versions are ``null``; True: measured on
    the Keras that ran (``verify``, ``explain``)."""
    return {
        "name": runtime.value,
        "measured": measured,
        "keras_version": keras_version,
        "backend": backend,
        "tensorflow_version": tensorflow_version,
    }


def behaviour_dict(b: FitBehaviour) -> dict[str, Any]:
    return {
        "trains_weights": b.trains_weights,
        "normalizes_with": b.normalizes_with.value if b.normalizes_with is not None else None,
        "updates_moving_stats": b.updates_moving_stats,
    }


def layer_dict(state: LayerState) -> dict[str, Any]:
    layer = state.layer
    return {
        "path": layer.path,
        "name": layer.name,
        "class_name": layer.shown_class,
        "depth": layer.depth,
        "trainable": layer.trainable,
        "is_batchnorm": None
        if layer.kind is LayerKind.UNKNOWN and layer.from_weights
        else layer.is_batchnorm,
        "source": layer.source.value,
        "in_fit": behaviour_dict(state.in_fit),
    }


def keras_hub_dict(model: ModelFile) -> dict[str, Any] | None:
    hub = keras_hub(model)
    if hub is None:
        return None
    return {
        "classes": list(hub.classes),
        "preset": hub.preset,
        "version": hub.version,
        "task": hub.task,
    }


def finding_dict(finding: Finding) -> dict[str, Any]:
    return {"code": finding.code.value, "path": finding.path, "message": finding.message}


def measured_runtime_dict(info: RuntimeInfo) -> dict[str, Any]:
    """The Keras a measurement ran on (``verify``, ``explain``)."""
    return runtime_dict(
        info.runtime,
        measured=True,
        keras_version=info.keras_version,
        backend=info.backend,
        tensorflow_version=info.tensorflow_version,
    )


def report_dict(report: Report) -> dict[str, Any]:
    """The ``inspect --json`` document (also the ``report`` of ``freeze --json``)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "command": "inspect",
        "model": model_dict(report.model),
        "runtime": runtime_dict(report.runtime),
        "summary": {
            "layers": len(report.layers),
            "batchnorm": len(report.batchnorm),
            "bn_training_in_fit": report.bn_training_in_fit,
            "bn_inference_in_fit": report.bn_inference_in_fit,
            "bn_from_weights": sum(1 for s in report.batchnorm if s.layer.from_weights),
        },
        "layers": [layer_dict(s) for s in report.layers],
        "warnings": [finding_dict(f) for f in report.warnings],
    }


def dumps(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False)


_COMPACT = json.JSONEncoder(ensure_ascii=False)  # json's C encoder: no indent


def dumps_by_line(document: dict[str, Any]) -> str:
    """The document with one top-level key per line and one list item per line.

    ``json.dumps(indent=...)`` runs json's pure-Python encoder, which alone took longer than
    reading a 1,000-layer model; this layout uses the C encoder, and a 1,000-layer report is
    ~1,000 lines that ``grep`` can search, not 14,000. Parsing it gives the same document.
    """
    lines = ["{"]
    last = len(document) - 1
    for i, (key, value) in enumerate(document.items()):
        comma = "," if i < last else ""
        name = _COMPACT.encode(key)
        if isinstance(value, list) and value:
            items = ",\n".join("    " + _COMPACT.encode(item) for item in value)
            lines.append(f"  {name}: [\n{items}\n  ]{comma}")
        else:
            lines.append(f"  {name}: {_COMPACT.encode(value)}{comma}")
    lines.append("}")
    return "\n".join(lines)


def render_report(report: Report) -> str:
    """The ``inspect --json`` document (see docs/json.md)."""
    return dumps_by_line(report_dict(report))
