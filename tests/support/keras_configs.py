"""Layer dicts in the shapes Keras 3 saves them in config.json, for tests that need a model
config without building one in Keras (fast). tests/model/test_modes_measured.py walks configs that
Keras itself wrote, so these shapes are checked against the real thing there."""

from __future__ import annotations

from typing import Any


def layer(
    class_name: str,
    name: str,
    *,
    module: str = "keras.layers",
    inbound: Any = None,
    registered_name: str | None = None,
    **config: Any,
) -> dict:
    entry: dict[str, Any] = {
        "module": module,
        "class_name": class_name,
        "config": {"name": name, "trainable": True, **config},
        "registered_name": registered_name,
    }
    if inbound is not None:
        entry["inbound_nodes"] = inbound
    return entry


def input_layer(name: str) -> dict:
    return {
        "module": "keras.layers",
        "class_name": "InputLayer",
        "config": {"batch_shape": [None, 4], "dtype": "float32", "name": name},
        "registered_name": None,
        "inbound_nodes": [],
    }


def functional(name: str, layers: list, *, trainable: bool = True, inbound: Any = None) -> dict:
    entry = layer(
        "Functional",
        name,
        module="keras.src.models.functional",
        registered_name="Functional",
        layers=layers,
    )
    entry["config"]["trainable"] = trainable
    if inbound is not None:
        entry["inbound_nodes"] = inbound
    return entry


def sequential(name: str, layers: list, *, trainable: bool = True) -> dict:
    entry = layer(
        "Sequential",
        name,
        module="keras.src.models.sequential",
        registered_name="Sequential",
        layers=layers,
    )
    entry["config"]["trainable"] = trainable
    return entry


def node(**kwargs: Any) -> list[dict]:
    """Keras 3's inbound_nodes: one call with these kwargs."""
    return [{"args": [{"class_name": "__keras_tensor__", "config": {}}], "kwargs": kwargs}]
