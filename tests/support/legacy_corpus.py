"""Legacy `.h5` files in the exact layouts old Keras wrote, built with h5py (the tests have no
network, so no model zoo file can be downloaded).

``keras20_functional``: a Keras 2.0-era functional model (``keras_version`` 2.0.8). Its
config names the model class ``Model`` and records inbound nodes as lists; its weight names
carry the TensorFlow-uniquified name scope (layer ``batch_normalization_1`` owns
``batch_normalization_1_1/gamma:0``); its ``training_config`` holds ``lr``, an optimizer
argument Keras 3 refuses; and it carries ``optimizer_weights``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _layer(class_name: str, name: str, inbound: list | None, **config: object) -> dict:
    entry: dict = {"class_name": class_name, "name": name, "config": {"name": name, **config}}
    entry["inbound_nodes"] = [] if inbound is None else [[[n, 0, 0, {}] for n in inbound]]
    return entry


def keras20_functional(path: Path) -> dict[str, np.ndarray]:
    """Write the file; return every weight value by ``layer/variable``."""
    rng = np.random.default_rng(20)
    layers = [
        _layer(
            "InputLayer",
            "input_1",
            None,
            batch_input_shape=[None, 4],
            dtype="float32",
            sparse=False,
        ),
        _layer(
            "Dense",
            "dense_1",
            ["input_1"],
            trainable=True,
            units=3,
            activation="relu",
            use_bias=True,
            kernel_initializer={
                "class_name": "VarianceScaling",
                "config": {
                    "scale": 1.0,
                    "mode": "fan_avg",
                    "distribution": "uniform",
                    "seed": None,
                },
            },
            bias_initializer={"class_name": "Zeros", "config": {}},
            kernel_regularizer=None,
            bias_regularizer=None,
            activity_regularizer=None,
            kernel_constraint=None,
            bias_constraint=None,
        ),
        _layer(
            "BatchNormalization",
            "batch_normalization_1",
            ["dense_1"],
            trainable=True,
            axis=-1,
            momentum=0.99,
            epsilon=0.001,
            center=True,
            scale=True,
            beta_initializer={"class_name": "Zeros", "config": {}},
            gamma_initializer={"class_name": "Ones", "config": {}},
            moving_mean_initializer={"class_name": "Zeros", "config": {}},
            moving_variance_initializer={"class_name": "Ones", "config": {}},
            beta_regularizer=None,
            gamma_regularizer=None,
            beta_constraint=None,
            gamma_constraint=None,
        ),
        _layer(
            "Dense",
            "dense_2",
            ["batch_normalization_1"],
            trainable=True,
            units=2,
            activation="linear",
            use_bias=True,
            kernel_initializer={
                "class_name": "VarianceScaling",
                "config": {
                    "scale": 1.0,
                    "mode": "fan_avg",
                    "distribution": "uniform",
                    "seed": None,
                },
            },
            bias_initializer={"class_name": "Zeros", "config": {}},
            kernel_regularizer=None,
            bias_regularizer=None,
            activity_regularizer=None,
            kernel_constraint=None,
            bias_constraint=None,
        ),
    ]
    config = {
        "class_name": "Model",
        "config": {
            "name": "model_1",
            "layers": layers,
            "input_layers": [["input_1", 0, 0]],
            "output_layers": [["dense_2", 0, 0]],
        },
    }
    training = {
        "optimizer_config": {
            "class_name": "Adam",
            "config": {
                "lr": 0.0001,
                "beta_1": 0.9,
                "beta_2": 0.999,
                "epsilon": 1e-08,
                "decay": 0.0,
            },
        },
        "loss": "mean_squared_error",
        "metrics": [],
        "sample_weight_mode": None,
        "loss_weights": None,
    }
    weights = {
        # group -> [(weight name, value)], in trainable + non_trainable order
        "dense_1": [
            ("dense_1_1/kernel:0", rng.normal(size=(4, 3))),
            ("dense_1_1/bias:0", rng.normal(size=(3,))),
        ],
        "batch_normalization_1": [
            ("batch_normalization_1_1/gamma:0", rng.uniform(0.5, 1.5, size=(3,))),
            ("batch_normalization_1_1/beta:0", rng.normal(size=(3,))),
            ("batch_normalization_1_1/moving_mean:0", rng.normal(size=(3,))),
            ("batch_normalization_1_1/moving_variance:0", rng.uniform(0.5, 2.0, size=(3,))),
        ],
        "dense_2": [
            ("dense_2_1/kernel:0", rng.normal(size=(3, 2))),
            ("dense_2_1/bias:0", rng.normal(size=(2,))),
        ],
    }
    import h5py

    values: dict[str, np.ndarray] = {}
    with h5py.File(path, "w") as h5:
        h5.attrs["keras_version"] = b"2.0.8"
        h5.attrs["backend"] = b"tensorflow"
        h5.attrs["model_config"] = json.dumps(config).encode()
        h5.attrs["training_config"] = json.dumps(training).encode()
        root = h5.create_group("model_weights")
        root.attrs["layer_names"] = [n.encode() for n in ("input_1", *weights)]
        root.attrs["backend"] = b"tensorflow"
        root.attrs["keras_version"] = b"2.0.8"
        root.create_group("input_1").attrs["weight_names"] = np.array([], dtype="S1")
        for group, entries in weights.items():
            g = root.create_group(group)
            g.attrs["weight_names"] = [name.encode() for name, _ in entries]
            for name, value in entries:
                g.create_dataset(name, data=value.astype("float32"))
                values[f"{group}/{name.split('/')[-1].split(':')[0]}"] = value.astype("float32")
        opt = h5.create_group("optimizer_weights")
        opt_names = ["Adam/iterations:0"] + [f"training/Adam/Variable_{i}:0" for i in range(12)]
        opt.attrs["weight_names"] = [n.encode() for n in opt_names]
        opt.create_dataset("Adam/iterations:0", data=np.int64(100))
        for i in range(12):
            opt.create_dataset(f"training/Adam/Variable_{i}:0", data=np.zeros(3, "float32"))
    return values
