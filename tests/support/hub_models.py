"""Code-built models for the freeze-route tests: two keras-hub backbones, a keras-hub task, a
Functional model with a custom residual block that holds BN as attributes, and a subclassed
model. Random weights, 16x16 images; no preset downloads.

Importable in a fresh process (the reload check runs there): the custom classes register
themselves with Keras on import, and :func:`measure` trains one real step.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import keras_hub
import numpy as np

SHAPE = (16, 16, 3)


@keras.saving.register_keras_serializable(package="bnfreeze_tests")
class ResBlock(keras.layers.Layer):
    """conv -> BN -> relu -> conv -> BN, plus the input: BN held as attributes."""

    def __init__(self, filters: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv1 = keras.layers.Conv2D(filters, 3, padding="same")
        self.bn1 = keras.layers.BatchNormalization()
        self.conv2 = keras.layers.Conv2D(filters, 3, padding="same")
        self.bn2 = keras.layers.BatchNormalization()

    def build(self, input_shape):
        inner = (*tuple(input_shape)[:-1], self.filters)
        self.conv1.build(tuple(input_shape))
        self.bn1.build(inner)
        self.conv2.build(inner)
        self.bn2.build(inner)

    def call(self, x, training=None):
        y = keras.activations.relu(self.bn1(self.conv1(x), training=training))
        return x + self.bn2(self.conv2(y), training=training)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="bnfreeze_tests")
class SubclassedNet(keras.Model):
    """A keras.Model subclass: stem conv, BN, a ResBlock, a head."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stem = keras.layers.Conv2D(4, 3, padding="same")
        self.bn = keras.layers.BatchNormalization()
        self.block = ResBlock(4)
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.head = keras.layers.Dense(2)

    def call(self, x, training=None):
        x = self.block(self.bn(self.stem(x), training=training), training=training)
        return self.head(self.pool(x))


def resnet_backbone():
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 8],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        image_shape=SHAPE,
    )


def efficientnet_backbone():
    """A fused block (BN as attributes ``bn1``/``bn2``) and an MBConv block."""
    return keras_hub.models.EfficientNetBackbone(
        stackwise_width_coefficients=[1.0, 1.0],
        stackwise_depth_coefficients=[1.0, 1.0],
        stackwise_kernel_sizes=[3, 3],
        stackwise_num_repeats=[1, 1],
        stackwise_input_filters=[8, 8],
        stackwise_output_filters=[8, 8],
        stackwise_expansion_ratios=[1, 2],
        stackwise_squeeze_and_excite_ratios=[0.0, 0.25],
        stackwise_strides=[1, 2],
        stackwise_block_types=["fused", "unfused"],
        input_shape=SHAPE,
    )


def resnet_task():
    return keras_hub.models.ResNetImageClassifier(backbone=resnet_backbone(), num_classes=2)


def custom_block():
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = ResBlock(4, name="res")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x), name="custom_block")


def subclassed():
    model = SubclassedNet(name="net")
    model(np.zeros((1, *SHAPE), "float32"))
    return model


BUILDERS = {
    "resnet": resnet_backbone,
    "efficientnet": efficientnet_backbone,
    "task": resnet_task,
    "custom_block": custom_block,
    "subclassed": subclassed,
}


def batchnorm_layers(model) -> list:
    """Every built BatchNormalization below ``model``, attribute-held ones included."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization) and layer.built
    ]


def measure(model) -> dict[str, int]:
    """One real fit() step (fresh SGD, data with mean 5): how many BN layers moved their
    moving statistics, how many moved gamma/beta, and how many conv kernels moved.

    A backbone, whose output is a feature map, trains under a pooling + Dense head; the
    variables measured are the backbone's."""
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 2.0, (4, *SHAPE)).astype("float32")
    y = rng.normal(size=(4, 2)).astype("float32")
    net = model
    if tuple(model(x[:1], training=False).shape) != (1, 2):
        inputs = keras.Input(SHAPE)
        pooled = keras.layers.GlobalAveragePooling2D()(model(inputs))
        net = keras.Model(inputs, keras.layers.Dense(2)(pooled))
    bns = batchnorm_layers(model)
    convs = [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.Conv2D) and layer.built
    ]

    def snapshot():
        stats = [[np.array(v) for v in (b.moving_mean, b.moving_variance)] for b in bns]
        affine = [[np.array(v) for v in (b.gamma, b.beta) if v is not None] for b in bns]
        return stats, affine, [np.array(c.kernel) for c in convs]

    before = snapshot()
    # Eager: one step of a tiny model, no tracing to pay for; fit() still calls training=True.
    net.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", metrics=[], run_eagerly=True)
    net.fit(x, y, batch_size=4, epochs=1, verbose=0)
    after = snapshot()

    def moved(a, b) -> int:
        return sum(
            any(not np.array_equal(p, q) for p, q in zip(u, v, strict=True))
            for u, v in zip(a, b, strict=True)
        )

    return {
        "bn": len(bns),
        "bn_stats_moved": moved(before[0], after[0]),
        "bn_gamma_beta_moved": moved(before[1], after[1]),
        "conv": len(convs),
        "conv_moved": sum(
            not np.array_equal(p, q) for p, q in zip(before[2], after[2], strict=True)
        ),
    }
