"""Reader for an unzipped `.keras` folder, which Keras 3 itself loads, and for folders that
are not models (a TensorFlow SavedModel, say), which get a specific error.

A keras-hub preset folder has the same members. One written by a task's ``save_to_preset``
also holds the task: ``task.json`` (its config, the backbone's among its arguments) and
``task.weights.h5`` (the weights of the layers the task adds, its head; the backbone's are in
``model.weights.h5``). Such a folder is read as the task, as ``Task.from_preset`` loads it:
the config is ``task.json``'s, and the weights index covers both files, the backbone's layers
under the backbone's name (``hg_net_v2_backbone/embedder``) and the task's own datasets named
below :data:`TASK_GROUP` so that the two files never meet.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from bnfreeze.errors import ModelFormatError
from bnfreeze.formats.readers._keras_common import (
    CONFIG,
    METADATA,
    WEIGHTS,
    Member,
    check_model_config,
    index_member,
    keras_model_file,
    parse_json,
)
from bnfreeze.limits import MAX_CONFIG_BYTES
from bnfreeze.model.records import ModelFile, ModelFormat, WeightIndex


def _read_bounded(path: Path, source: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ModelFormatError(
                f"{source}: {path.name} is larger than the {MAX_CONFIG_BYTES // 2**20} MiB "
                "bnfreeze reads."
            )
        return path.read_bytes()
    except ModelFormatError:
        raise
    except OSError as exc:
        raise ModelFormatError(
            f"{source}: {path.name} cannot be read ({exc.strerror or exc})."
        ) from None


#: A task preset's members: the task's config and the weights of the layers it adds.
TASK_CONFIG = "task.json"
TASK_WEIGHTS = "task.weights.h5"
#: The first component of ``task.weights.h5``'s dataset paths in a task preset's index
#: (``/task.weights.h5/layers/dense/vars/0``): :func:`bnfreeze.formats.readers.read_values`
#: reads those from that file.
TASK_GROUP = "/" + TASK_WEIGHTS


def read(path: Path, *, weights: bool = True) -> ModelFile:
    source = str(path)
    if (path / "saved_model.pb").exists() or (path / "saved_model.pbtxt").exists():
        raise ModelFormatError(
            f"{path}: a TensorFlow SavedModel folder, which Keras 3 cannot load as a model.",
            hint="Keras 3's TFSMLayer can wrap it for inference only (it resets trainable "
            "flags); to fine-tune, re-save the original Keras model with model.save('x.keras').",
        )
    if not (path / CONFIG).is_file():
        raise ModelFormatError(
            f"{path}: a directory, not a model.",
            hint="Pass a .keras or .h5 file, or an unzipped .keras folder with config.json.",
        )
    raw = _read_bounded(path / CONFIG, source)
    config = check_model_config(parse_json(raw, source, CONFIG), source)
    task = None
    if (path / TASK_CONFIG).is_file():
        raw = _read_bounded(path / TASK_CONFIG, source)
        task = check_model_config(parse_json(raw, source, TASK_CONFIG), source, TASK_CONFIG)
    metadata = None
    if (path / METADATA).is_file():
        metadata = parse_json(_read_bounded(path / METADATA, source), source, METADATA)
    found, optimizer_variables = index(path, task) if weights else (None, None)
    model = keras_model_file(
        source, ModelFormat.KERAS_DIR, task or config, metadata, found, optimizer_variables
    )
    return replace(model, preset_task=task["class_name"]) if task is not None else model


def index(path: Path, task: dict[str, Any] | None = None) -> tuple[WeightIndex | None, int | None]:
    """Index the folder's ``model.weights.h5``, if it has one (see
    :func:`bnfreeze.formats.readers.with_weights`); for a task preset (``task``: its
    ``task.json``), ``task.weights.h5`` too. The saved optimizer variables are the task's
    when it saved them."""
    backbone, optimizer_variables = _index_file(path, WEIGHTS)
    if task is None:
        return backbone, optimizer_variables
    head, head_optimizer = _index_file(path, TASK_WEIGHTS)
    if head_optimizer is not None:
        optimizer_variables = head_optimizer
    return task_index(backbone, head, backbone_name(task)), optimizer_variables


def backbone_name(task: dict[str, Any]) -> str:
    """The name of the backbone a task's config holds (``config.backbone.config.name``):
    its layers' paths start with it. Empty when the config does not say."""
    arguments = task.get("config")
    backbone = arguments.get("backbone") if isinstance(arguments, dict) else None
    inner = backbone.get("config") if isinstance(backbone, dict) else None
    name = inner.get("name") if isinstance(inner, dict) else None
    return name if isinstance(name, str) else ""


def task_index(
    backbone: WeightIndex | None, head: WeightIndex | None, name: str
) -> WeightIndex | None:
    """One index for a task preset: the backbone's layer paths below ``name``, and the
    datasets of ``task.weights.h5`` below :data:`TASK_GROUP`."""
    if backbone is None and head is None:
        return None
    variables: dict[str, tuple[str, ...]] = {}
    locations: dict[str, Any] = {}
    names: dict[str, str] = {}
    if backbone is not None:
        for layer, datasets in backbone.variables.items():
            key = "/".join(p for p in (name, layer) if p)
            variables[key] = variables.get(key, ()) + tuple(datasets)
        locations.update(backbone.locations)
        names.update(backbone.names)
    if head is not None:
        for layer, datasets in head.variables.items():
            moved = tuple(TASK_GROUP + _rooted(d) for d in datasets)
            variables[layer] = variables.get(layer, ()) + moved
        locations.update({TASK_GROUP + _rooted(k): v for k, v in head.locations.items()})
        names.update({TASK_GROUP + _rooted(k): v for k, v in head.names.items()})
    return WeightIndex(variables=variables, locations=locations, names=names)


def _rooted(dataset: str) -> str:
    return dataset if dataset.startswith("/") else "/" + dataset


def _index_file(path: Path, member: str) -> tuple[WeightIndex | None, int | None]:
    weights_file = path / member
    if not weights_file.is_file():
        return None, None
    source = str(path)
    try:
        size = weights_file.stat().st_size
    except OSError as exc:
        reason = exc.strerror or exc
        raise ModelFormatError(f"{source}: {member} cannot be read ({reason}).") from None
    return index_member(Member(str(weights_file), 0, size), source)
