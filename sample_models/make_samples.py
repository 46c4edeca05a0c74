"""Build the sample models in this folder, deterministically.

Run from the repository root:  python sample_models/make_samples.py

Each sample is small (under 2 MB) and demonstrates one thing; the README says which.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = Path(__file__).resolve().parent


def _seed() -> None:
    import keras

    keras.utils.set_random_seed(1234)


def seed_bn():
    """The seed question's single BN layer: input (1,2,2,4), beta 1, gamma 2, mean 0, var 1."""
    import keras
    import numpy as np

    inputs = keras.Input((2, 2, 4), name="image")
    bn = keras.layers.BatchNormalization(
        name="batch_normalization",
        beta_initializer=keras.initializers.Constant(1.0),
        gamma_initializer=keras.initializers.Constant(2.0),
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
    )
    model = keras.Model(inputs, bn(inputs), name="seed_bn")
    assert np.allclose(bn.gamma.numpy(), 2.0)
    return model


def guide_pattern():
    """The Keras transfer-learning guide, phase 1: a frozen MobileNetV2 backbone called with
    training=False, a new head, compiled and trained one step."""
    import keras
    import numpy as np

    full = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), include_top=False, weights=None, alpha=0.35
    )
    # Stop before the final 1x1 conv to 1280 channels: it alone would push the file past 2 MB.
    base = keras.Model(full.input, full.get_layer("block_16_project_BN").output, name=full.name)
    # Give the backbone's BN layers real statistics, as pretrained weights would have.
    base.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 2.0, size=(8, 32, 32, 3)).astype("float32")
    base.fit(x, np.zeros((8, 1, 1, 112), "float32"), epochs=1, verbose=0, batch_size=8)
    base.trainable = False
    inputs = keras.Input((32, 32, 3), name="image")
    features = base(inputs, training=False)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    outputs = keras.layers.Dense(2, name="head")(pooled)
    model = keras.Model(inputs, outputs, name="guide_pattern")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    model.fit(x, rng.normal(size=(8, 2)).astype("float32"), epochs=1, verbose=0, batch_size=8)
    return model


def bn_under_frozen():
    """A trainable BN inside a frozen sub-model: sub.trainable=False, then bn.trainable=True.
    On Keras 3 the BN trains anyway."""
    import keras

    inner_in = keras.Input((8,), name="inner_input")
    h = keras.layers.Dense(8, name="inner_dense")(inner_in)
    h = keras.layers.BatchNormalization(name="inner_bn")(h)
    sub = keras.Model(inner_in, h, name="backbone")
    inputs = keras.Input((8,), name="features")
    x = sub(inputs)
    x = keras.layers.BatchNormalization(name="head_bn")(x)
    outputs = keras.layers.Dense(1, name="head")(x)
    model = keras.Model(inputs, outputs, name="bn_under_frozen")
    sub.trainable = False
    sub.get_layer("inner_bn").trainable = True
    return model


def sequential():
    """A plain Sequential with two BN layers, one frozen."""
    import keras

    model = keras.Sequential(
        [
            keras.Input((6,), name="x"),
            keras.layers.Dense(8, name="dense_1"),
            keras.layers.BatchNormalization(name="bn_1"),
            keras.layers.Activation("relu", name="relu_1"),
            keras.layers.Dense(8, name="dense_2"),
            keras.layers.BatchNormalization(name="bn_2"),
            keras.layers.Dense(1, name="out"),
        ],
        name="sequential_bn",
    )
    model.get_layer("bn_2").trainable = False
    return model


def nested_h5():
    """A legacy .h5 of a nested model with BN,BN and BN,Dense sub-models: the layout whose
    weight order depends on the flags (docs/semantics.md, rule 6)."""
    import keras
    import numpy as np

    inputs = keras.Input((4,), name="x")
    s1 = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.BatchNormalization(name="bn1"),
            keras.layers.BatchNormalization(name="bn2"),
        ],
        name="bn_bn",
    )
    s2 = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.BatchNormalization(name="bn3"),
            keras.layers.Dense(4, name="d1"),
        ],
        name="bn_dense",
    )
    outputs = keras.layers.Dense(1, name="head")(s2(s1(inputs)))
    model = keras.Model(inputs, outputs, name="nested")
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(1)
    model.fit(
        rng.normal(3.0, 2.0, (16, 4)).astype("float32"),
        rng.normal(size=(16, 1)),
        epochs=1,
        verbose=0,
        batch_size=8,
    )
    return model


SAMPLES = {
    "seed_bn.keras": seed_bn,
    "guide_pattern.keras": guide_pattern,
    "bn_under_frozen.keras": bn_under_frozen,
    "sequential.keras": sequential,
    "nested_legacy.h5": nested_h5,
}


def sequential_inputs(out: Path) -> None:
    """Inputs for sequential.keras (64 samples of 6 features, mean 5, std 2): the data the
    README's ``bnfreeze recalibrate`` example reads."""
    import numpy as np

    rng = np.random.default_rng(0)
    np.save(out / "sequential_inputs.npy", rng.normal(5.0, 2.0, (64, 6)).astype("float32"))


def main(argv: list[str]) -> None:
    out = Path(argv[1]) if len(argv) > 1 else HERE
    out.mkdir(parents=True, exist_ok=True)
    sequential_inputs(out)
    import warnings

    warnings.filterwarnings("ignore")
    for name, build in SAMPLES.items():
        _seed()
        model = build()
        model.save(out / name)
        print(f"{name}: {(out / name).stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv)
