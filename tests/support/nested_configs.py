"""Saved configs written by hand in the shapes Keras 3 writes, shared by the selection and
assignment tests: a Functional model with a nested backbone and a nested Sequential."""

from __future__ import annotations

from typing import Any


def layer(class_name: str, name: str, trainable: bool | None = True, **config: Any) -> dict:
    cfg: dict[str, Any] = {"name": name, **config}
    if trainable is not None:
        cfg["trainable"] = trainable
    return {"module": "keras.layers", "class_name": class_name, "config": cfg}


def model(name: str, layers: list[dict], class_name: str = "Functional") -> dict:
    return {
        "module": "keras.src.models.functional",
        "class_name": class_name,
        "config": {"name": name, "trainable": True, "layers": layers},
    }


def nested_config() -> dict:
    """input, conv1, bn1, backbone[conv2, bn2, inner[bn3]], head_bn, head."""
    inner = model("inner", [layer("BatchNormalization", "bn3")], "Sequential")
    backbone = model(
        "backbone",
        [
            layer("InputLayer", "bb_in", None),
            layer("Conv2D", "conv2"),
            layer("BatchNormalization", "bn2"),
            inner,
        ],
    )
    return model(
        "top",
        [
            layer("InputLayer", "image", None),
            layer("Conv2D", "conv1"),
            layer("BatchNormalization", "bn1"),
            backbone,
            layer("BatchNormalization", "head_bn"),
            layer("Dense", "head"),
        ],
    )
