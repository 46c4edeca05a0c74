"""keras-hub evidence in a file: the classes it registers, a preset folder, the metadata's
``keras_hub_version``. Read from the config and metadata alone (no Keras)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bnfreeze.model.records import ModelFile, ModelFormat

KERAS_HUB_PREFIX = "keras_hub>"


@dataclass(frozen=True)
class KerasHub:
    """Why a file is a keras-hub model: its registered classes, a preset folder, metadata."""

    classes: tuple[str, ...]  # "keras_hub>ImageClassifier", ... in config order
    preset: bool  # an unzipped folder with keras-hub's metadata: save_to_preset's layout
    version: str | None  # keras_hub_version from the metadata
    #: A task's preset folder (``task.json``): the task's class name, read as
    #: ``Task.from_preset`` loads it. None otherwise.
    task: str | None = None


def _hub_class(node: dict[str, object]) -> str | None:
    """The keras-hub class a config node names, as ``keras_hub>Name``, or None."""
    registered = node.get("registered_name")
    if isinstance(registered, str) and registered.startswith(KERAS_HUB_PREFIX):
        return registered
    module, name = node.get("module"), node.get("class_name")
    if isinstance(module, str) and module.startswith("keras_hub.") and name:
        return f"{KERAS_HUB_PREFIX}{name}"
    return None


def keras_hub(model: ModelFile) -> KerasHub | None:
    """keras-hub evidence in the file, or None: a ``keras_hub>`` registered name or a
    ``keras_hub.`` module anywhere in the config, or ``keras_hub_version`` in the metadata."""
    classes: list[str] = []

    def visit(node: dict[str, object] | list[object], depth: int) -> None:
        if depth > 64:
            return
        values: Iterable[object] = node
        if isinstance(node, dict):
            label = _hub_class(node)
            if label is not None and label not in classes:
                classes.append(label)
            values = node.values()
        for value in values:  # only containers are visited: most values are strings, numbers
            if type(value) is dict or type(value) is list:
                visit(value, depth + 1)

    visit(model.config, 0)
    version = model.keras_hub_version
    if not classes and version is None:
        return None
    preset = model.format is ModelFormat.KERAS_DIR and version is not None
    return KerasHub(tuple(classes), preset, version, model.preset_task)
