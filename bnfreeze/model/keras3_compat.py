"""Layer configs that Keras 3's ``load_model`` refuses, as a config shows them.

Every entry was measured: a tf_keras 2.21 model holding the layer, saved as ``.h5``, then
``keras.models.load_model(path, compile=False)`` on Keras 3.15.1. A model with such a layer
cannot be loaded, verified or trained on Keras 3 until it is rebuilt (or loaded with tf_keras,
``--runtime tf-keras``); ``inspect`` says so up front instead of letting ``fit()`` find out.
"""

from __future__ import annotations

from typing import Any

#: Classes Keras 3 does not have: "Unknown layer: 'TFOpLambda'". tf_keras records a TensorFlow
#: function applied to a Keras tensor (``tf.math.reduce_mean(x)``, ``x + 3.0``, ``tf.cast``) as
#: a TFOpLambda layer, and a slice (``x[:, 0]``) as SlicingOpLambda.
MISSING_CLASSES: dict[str, str] = {
    "TFOpLambda": "a TensorFlow function applied to a Keras tensor in tf_keras",
    "SlicingOpLambda": "a tensor slice in tf_keras",
    "TensorFlowOpLayer": "a TensorFlow operation in old tf.keras",
    "LocallyConnected1D": "removed from Keras 3",
    "LocallyConnected2D": "removed from Keras 3",
    "SyncBatchNormalization": "Keras 3 has BatchNormalization(synchronized=True) instead",
}

_RNN = ("time_major",)
_GROUPS = ("groups",)

#: Config keys Keras 3 rejects: "Unrecognized keyword arguments passed to DepthwiseConv2D:
#: {'groups': 1}". tf_keras writes them with their default values.
REFUSED_KEYS: dict[str, tuple[str, ...]] = {
    "DepthwiseConv1D": _GROUPS,
    "DepthwiseConv2D": _GROUPS,
    "Conv1DTranspose": _GROUPS,
    "Conv2DTranspose": _GROUPS,
    "Conv3DTranspose": _GROUPS,
    "SeparableConv1D": ("groups", "kernel_initializer", "kernel_regularizer", "kernel_constraint"),
    "SeparableConv2D": ("groups", "kernel_initializer", "kernel_regularizer", "kernel_constraint"),
    "LSTM": _RNN,
    "GRU": _RNN,
    "SimpleRNN": _RNN,
    "ConvLSTM1D": _RNN,
    "ConvLSTM2D": _RNN,
    "ConvLSTM3D": _RNN,
    "MultiHeadAttention": ("query_shape", "key_shape", "value_shape"),
    "RandomFlip": ("rng_type",),
}


#: Layers that take values other than tensors as positional arguments (Keras 3.15.1: the
#: preprocessing layers, ``_allow_non_tensor_positional_args``); every other layer refuses them.
TAKE_VALUES = frozenset(
    [
        "AugMix",
        "AutoContrast",
        "CategoryEncoding",
        "CenterCrop",
        "ContrastLimitedAdaptiveHistogramEqualization",
        "CutMix",
        "Discretization",
        "Equalization",
        "HashedCrossing",
        "Hashing",
        "IntegerLookup",
        "MaxNumBoundingBoxes",
        "MelSpectrogram",
        "MixUp",
        "Normalization",
        "Pipeline",
        "RandAugment",
        "RandomBrightness",
        "RandomColorDegeneration",
        "RandomColorJitter",
        "RandomContrast",
        "RandomCrop",
        "RandomElasticTransform",
        "RandomErasing",
        "RandomFlip",
        "RandomGaussianBlur",
        "RandomGrayscale",
        "RandomHue",
        "RandomInvert",
        "RandomPerspective",
        "RandomPosterization",
        "RandomRotation",
        "RandomSaturation",
        "RandomSharpness",
        "RandomShear",
        "RandomTranslation",
        "RandomZoom",
        "Rescaling",
        "Resizing",
        "Solarization",
        "StringLookup",
        "TextVectorization",
    ]
)


def incompatibility(layer: dict[str, Any]) -> str | None:
    """Why Keras 3 cannot deserialize this saved layer dict, or None when nothing shows."""
    class_name = layer.get("class_name")
    if not isinstance(class_name, str):
        return None
    value = _value_passed_positionally(layer, class_name)
    if value is not None:
        return (
            f"Keras 3 rebuilds it as the {class_name} layer and calls it with {value!r} as a "
            "positional argument (a Keras 3 operation such as x + 3.0, saved in a legacy .h5, "
            "loses the module that made it an operation): load_model fails with 'Only input "
            "tensors may be passed as positional arguments'"
        )
    if class_name in MISSING_CLASSES:
        return (
            f"Keras 3 has no {class_name} layer ({MISSING_CLASSES[class_name]}): load_model "
            f"fails with \"Unknown layer: '{class_name}'\""
        )
    config = layer.get("config")
    if not isinstance(config, dict):
        return None
    refused = [k for k in REFUSED_KEYS.get(class_name, ()) if k in config]
    if refused:
        keys = ", ".join(repr(k) for k in refused)
        return (
            f"its config holds {keys}, which Keras 3's {class_name} does not accept: load_model "
            "fails with 'Unrecognized keyword arguments'"
        )
    return None


def _value_passed_positionally(layer: dict[str, Any], class_name: str) -> object | None:
    """A number, string or boolean in a Keras 3 node's positional arguments of a layer that
    Keras rebuilds as a layer (measured: MobileNetV3Large saved by Keras 3.15.1 as ``.h5``,
    whose ``x + 3.0`` nodes read ``{"class_name": "Add", "args": [tensor, 3.0]}`` with no
    ``module``; the same model's ``.keras`` says ``"module": "keras.src.ops.numpy"`` and
    loads)."""
    module = layer.get("module")
    if isinstance(module, str) and module.startswith("keras.src.ops"):
        return None  # an operation: Keras calls it with its values as saved
    if class_name in TAKE_VALUES or layer.get("registered_name") not in (None, class_name):
        return None
    nodes = layer.get("inbound_nodes")
    for node in nodes if isinstance(nodes, list) else ():
        if not isinstance(node, dict):
            continue  # a tf_keras node ([name, index, tensor, kwargs]): other rules
        pending: list[Any] = [node.get("args")]
        while pending:
            item = pending.pop()
            if isinstance(item, list):
                pending.extend(item)
            elif isinstance(item, (bool, int, float, str)):
                return item
    return None


def nested_call_mismatches(config: dict[str, Any]) -> dict[str, str]:
    """Nested models that a tf_keras graph calls by a node index Keras 3 does not rebuild.

    tf_keras numbers a nested model's first call in the outer graph node 1 (node 0 is the
    model's own), and records ``[["base", 1, 0, {}]]``; Keras 3 rebuilds one node per call
    from 0, so load_model fails ("Invalid Functional model configuration ... failed to be
    resolved", or an IndexError). Measured on Keras 3.15.1 with tf_keras 2.21 ``.h5`` files.
    Returns {layer name: why}, for every layer list in the config.
    """
    found: dict[str, str] = {}

    def visit(layers: Any) -> None:
        if not isinstance(layers, list):
            return
        calls: dict[str, int] = {}
        models: set[str] = set()
        for layer in layers:
            if not isinstance(layer, dict) or not isinstance(layer.get("config"), dict):
                continue
            name = layer["config"].get("name", layer.get("name"))
            nodes = layer.get("inbound_nodes")
            if isinstance(name, str):
                calls[name] = len(nodes) if isinstance(nodes, list) else 0
                if isinstance(layer["config"].get("layers"), list):
                    models.add(name)
                    visit(layer["config"]["layers"])
        for layer in layers:
            nodes = layer.get("inbound_nodes") if isinstance(layer, dict) else None
            for node in nodes if isinstance(nodes, list) else ():
                for ref in node if isinstance(node, list) else ():
                    if not (isinstance(ref, list) and len(ref) >= 2):
                        continue
                    name, index = ref[0], ref[1]
                    if name in models and isinstance(index, int) and index >= calls[name]:
                        found[name] = (
                            f"the graph uses its call number {index}, which Keras 3 does not "
                            "rebuild (tf_keras counts a nested model's own graph as call 0): "
                            "load_model fails with 'Invalid Functional model configuration'"
                        )

    root = config.get("config")
    if isinstance(root, dict):
        visit(root.get("layers"))
    return found
