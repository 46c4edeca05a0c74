"""Crafted ``.keras`` files of code-built models, written byte-exact with h5py (no Keras).

The layout is what Keras 3.15 writes for a subclassed or keras-hub model: a ``config.json``
with constructor arguments and no layer list, and a ``model.weights.h5`` whose groups are
``layers/<class_and_index>/vars/0..N`` for a layer list and ``<owner>/<attribute>/vars/0..N``
for sublayers held as attributes, each ``vars`` group carrying the layer's name as the
attribute ``name`` (measured on keras-hub 0.32 backbones; see tests/model/test_code_built.py for
the same rules checked against Keras itself).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any


def write_code_built_keras(
    path: Path,
    groups: dict[str, tuple[str, list[list[float]] | list[Any]]],
    *,
    class_name: str = "TinyBackbone",
    registered_name: str = "my_package>TinyBackbone",
    trainable: bool = False,
) -> Path:
    """Write ``path``: ``groups`` maps an HDF5 group path (``layers/batch_normalization``,
    ``block/bn1``) to (the layer name Keras records, the values of its variables in creation
    order; a value may be a nested list for a kernel)."""
    config = {
        "module": "my_package.models",
        "class_name": class_name,
        "config": {"name": "tiny", "trainable": trainable, "filters": 4},
        "registered_name": registered_name,
        "build_config": {"input_shape": [None, 8, 8, 3]},
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        archive.writestr("config.json", json.dumps(config))
        archive.writestr("model.weights.h5", weights_h5(groups, "tiny"))
    return path


def weights_h5(groups: dict[str, tuple[str, list[list[float]] | list[Any]]], root: str) -> bytes:
    """A ``.weights.h5`` file's bytes: ``groups`` as :func:`write_code_built_keras` takes
    them, the root's ``vars`` named ``root``."""
    import h5py
    import numpy as np

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        h5.create_group("vars").attrs["name"] = root
        made: set[str] = set()
        for group, (name, values) in groups.items():
            parts = group.split("/")
            for i in range(1, len(parts)):
                prefix = "/".join(parts[:i])
                explicit = prefix in groups
                listing = prefix == "layers" or prefix.endswith("/layers")
                if prefix not in made and not explicit and not listing:
                    made.add(prefix)
                    h5.require_group(prefix).require_group("vars").attrs["name"] = parts[i - 1]
            variables = h5.require_group(group).require_group("vars")
            variables.attrs["name"] = name
            for i, value in enumerate(values):
                variables.create_dataset(str(i), data=np.asarray(value, dtype="float32"))
    return buffer.getvalue()


def write_task_preset(
    folder: Path,
    backbone: dict[str, tuple[str, list[list[float]] | list[Any]]],
    head: dict[str, tuple[str, list[list[float]] | list[Any]]],
) -> Path:
    """A keras-hub task's preset folder as ``task.save_to_preset`` writes it (measured on
    keras-hub 0.32): the backbone's ``config.json`` and ``model.weights.h5`` (groups from the
    backbone down), the task's ``task.json`` (the backbone's config among its arguments) and
    ``task.weights.h5`` (the task's own layers, from the task down). The backbone,
    ``tiny_backbone``, was saved with ``trainable=False``."""
    backbone_config = {
        "module": "keras_hub.src.models.tiny.tiny_backbone",
        "class_name": "TinyBackbone",
        "config": {"name": "tiny_backbone", "trainable": False, "filters": 4},
        "registered_name": "keras_hub>TinyBackbone",
    }
    task_config = {
        "module": "keras_hub.src.models.tiny.tiny_classifier",
        "class_name": "TinyClassifier",
        "config": {
            "backbone": backbone_config,
            "preprocessor": None,
            "name": "tiny_classifier",
            "num_classes": 2,
        },
        "registered_name": "keras_hub>TinyClassifier",
    }
    metadata = {
        "keras_version": "3.15.1",
        "keras_hub_version": "0.32.0",
        "parameter_count": 0,
        "tasks": ["ImageClassifier"],
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.json").write_text(json.dumps(metadata))
    (folder / "config.json").write_text(json.dumps(backbone_config))
    (folder / "task.json").write_text(json.dumps(task_config))
    (folder / "model.weights.h5").write_bytes(weights_h5(backbone, "tiny_backbone"))
    (folder / "task.weights.h5").write_bytes(weights_h5(head, "tiny_classifier"))
    return folder


def bn(n: int = 4, variance: float = 1.0) -> list[list[float]]:
    """A BN's four variables: gamma, beta, moving mean, moving variance."""
    return [[1.0] * n, [0.0] * n, [0.5] * n, [variance] * n]
