"""The JSON contract (``schema_version`` 1). Keys are stable; tests compare by equality."""

from __future__ import annotations

import json
from typing import Any

from bnfreeze.records import FitBehaviour, Finding, LayerState, Report

SCHEMA_VERSION = 1


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
        "class_name": layer.class_name,
        "depth": layer.depth,
        "trainable": layer.trainable,
        "is_batchnorm": layer.is_batchnorm,
        "in_fit": behaviour_dict(state.in_fit),
    }


def finding_dict(finding: Finding) -> dict[str, Any]:
    return {"code": finding.code.value, "path": finding.path, "message": finding.message}


def report_dict(report: Report) -> dict[str, Any]:
    model = report.model
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {
            "path": model.path,
            "format": model.format.json_name,
            "keras_version": model.keras_version,
            "compiled": model.compiled,
            "optimizer_variables": model.optimizer_variables,
        },
        "runtime": report.runtime.value,
        "summary": {
            "layers": len(report.layers),
            "batchnorm": len(report.batchnorm),
            "bn_training_in_fit": report.bn_training_in_fit,
            "bn_inference_in_fit": report.bn_inference_in_fit,
        },
        "layers": [layer_dict(s) for s in report.layers],
        "warnings": [finding_dict(f) for f in report.warnings],
    }


def dumps(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False)


def render_report(report: Report) -> str:
    return dumps(report_dict(report))
