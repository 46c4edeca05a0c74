"""Code-built models (issue 10): keras-hub backbones and tasks, custom blocks that hold BN as
attributes, subclassed models. Their configs list no layers; ``inspect`` finds the BN layers
in the weights file, and its prediction must match one measured ``fit()`` step after a real
save/load round trip, both in the guide pattern (``backbone.trainable = False``) and with
per-BN flags set before saving. ``verify`` must compare every BN layer it measures.

The truth comes from Keras (``tests/support/keras_truth.py``): every layer Keras tracks, attributes
included (``every_layer_paths``), one real ``fit()`` step, what moved. Models are keras-hub
classes with random weights and 32x32 images, built once per session; no preset downloads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from keras_truth import Moved, every_layer_paths, measure_fit_step

from bnfreeze.cli import cli

pytestmark = pytest.mark.keras

IMAGE = (32, 32, 3)


# --------------------------------------------------------------------------- the models


def _resnet(hub: Any) -> Any:
    return hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        image_shape=IMAGE,
    )


def _efficientnet(hub: Any) -> Any:
    # One fused block (BN held as attributes bn1/bn2) and one MBConv stage (BN in the list).
    return hub.models.EfficientNetBackbone(
        stackwise_width_coefficients=[1.0, 1.0],
        stackwise_depth_coefficients=[1.0, 1.0],
        stackwise_kernel_sizes=[3, 3],
        stackwise_num_repeats=[1, 1],
        stackwise_input_filters=[8, 8],
        stackwise_output_filters=[8, 8],
        stackwise_expansion_ratios=[1, 2],
        stackwise_squeeze_and_excite_ratios=[0, 0.25],
        stackwise_strides=[1, 2],
        stackwise_block_types=["fused", "v1"],
        stackwise_force_input_filters=[0, 0],
        stackwise_nores_option=[False, False],
        input_shape=IMAGE,
        min_depth=4,
        depth_divisor=4,
    )


def _mobilenet(hub: Any) -> Any:
    return hub.models.MobileNetBackbone(
        stackwise_expansion=[[2, 2]],
        stackwise_num_blocks=[2],
        stackwise_num_filters=[[8, 8]],
        stackwise_kernel_size=[[3, 3]],
        stackwise_num_strides=[[2, 1]],
        stackwise_se_ratio=[[None, 0.25]],
        stackwise_activation=[["relu", "hard_swish"]],
        stackwise_padding=[[1, 1]],
        output_num_filters=16,
        depthwise_filters=8,
        depthwise_stride=2,
        depthwise_residual=False,
        last_layer_filter=16,
        input_num_filters=8,
        image_shape=IMAGE,
        squeeze_and_excite=0.5,
    )


def _densenet(hub: Any) -> Any:
    return hub.models.DenseNetBackbone(
        stackwise_num_repeats=[1, 1], image_shape=IMAGE, growth_rate=4
    )


_CLASSES: dict[str, Any] = {}


def _custom_classes() -> dict[str, Any]:
    """A residual block holding BN as attributes, and a subclassed model holding BN and such a
    block, registered once per process."""
    if _CLASSES:
        return _CLASSES
    import keras

    @keras.saving.register_keras_serializable(package="bnfreeze_hub_test")
    class ResBlock(keras.layers.Layer):
        def __init__(self, filters=8, **kwargs):
            super().__init__(**kwargs)
            self.filters = filters
            self.conv1 = keras.layers.Conv2D(filters, 3, padding="same", name="conv1")
            self.bn1 = keras.layers.BatchNormalization(name="bn1")
            self.conv2 = keras.layers.Conv2D(filters, 3, padding="same", name="conv2")
            self.bn2 = keras.layers.BatchNormalization(name="bn2")
            self.norm = keras.layers.LayerNormalization(name="norm")  # never counted as BN

        def call(self, x, training=None):
            h = keras.ops.relu(self.bn1(self.conv1(x), training=training))
            h = self.bn2(self.conv2(h), training=training)
            return self.norm(keras.ops.relu(h + x))

        def get_config(self):
            return {**super().get_config(), "filters": self.filters}

    @keras.saving.register_keras_serializable(package="bnfreeze_hub_test")
    class SmallNet(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.stem = keras.layers.Conv2D(8, 3, padding="same", name="stem")
            self.stem_bn = keras.layers.BatchNormalization(name="stem_bn")
            self.block = ResBlock(8, name="block")
            self.pool = keras.layers.GlobalAveragePooling2D(name="pool")
            self.head = keras.layers.Dense(3, name="head")

        def call(self, x, training=None):
            h = self.stem_bn(self.stem(x), training=training)
            return self.head(self.pool(self.block(h, training=training)))

    _CLASSES.update(ResBlock=ResBlock, SmallNet=SmallNet)
    return _CLASSES


def _custom_block_model(keras: Any) -> Any:
    block = _custom_classes()["ResBlock"]
    inputs = keras.Input(IMAGE, name="image")
    h = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    h = block(8, name="block_a")(h)
    h = block(8, name="block_b")(h)
    outputs = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling2D()(h))
    return keras.Model(inputs, outputs, name="custom_blocks")


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    load: str  # how a user loads it: "keras", "preset", "h5"
    frozen: str | None  # the container the guide pattern froze (None: per-BN flags)


def _freeze_guide(model: Any, family: str) -> str:
    """``backbone.trainable = False`` (the Keras guide's pattern); returns what was frozen."""
    if family == "task":
        model.backbone.trainable = False
        return model.backbone.name
    if family == "blocks":
        for name in ("block_a", "block_b"):
            model.get_layer(name).trainable = False
        return "block_a"
    if family == "subclassed":
        model.block.trainable = False
        return "block"
    model.trainable = False
    return ""


def _freeze_each_bn(model: Any) -> None:
    import keras

    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


FAMILIES = {
    # name: (builder, how it is saved)
    "resnet": (_resnet, "keras"),
    "task": (_efficientnet, "keras"),  # an EfficientNet backbone inside an ImageClassifier
    "mobilenet": (_mobilenet, "preset"),
    "densenet": (_densenet, "h5"),
    "blocks": (None, "keras"),
    "subclassed": (None, "keras"),
}
PATTERNS = ("guide", "per-bn")
CASES = [f"{family}-{pattern}" for family in FAMILIES for pattern in PATTERNS]


@pytest.fixture(scope="session")
def code_built_files(tmp_path_factory) -> dict[str, Case]:
    """Every case, built with random weights and saved once per session."""
    import keras
    import numpy as np

    keras_hub = pytest.importorskip("keras_hub")

    root = tmp_path_factory.mktemp("code_built")
    out: dict[str, Case] = {}
    for family, (build, saved_as) in FAMILIES.items():
        for pattern in PATTERNS:
            keras.utils.set_random_seed(7)
            if family == "task":
                model = keras_hub.models.ImageClassifier(backbone=build(keras_hub), num_classes=3)
            elif family == "blocks":
                model = _custom_block_model(keras)
            elif family == "subclassed":
                model = _custom_classes()["SmallNet"](name="small_net")
                model(np.zeros((1, *IMAGE), "float32"))
            else:
                model = build(keras_hub)
            frozen: str | None = None
            if pattern == "guide":
                frozen = _freeze_guide(model, family)
            else:
                _freeze_each_bn(model)
            name = f"{family}-{pattern}"
            if saved_as == "preset":
                path = root / name
                model.save_to_preset(str(path))
            else:
                path = root / f"{name}.{saved_as}"
                model.save(path)
            out[name] = Case(name, path, saved_as, frozen)
    return out


def _load(case: Case) -> Any:
    """Load the file as a user of that format does, in this process."""
    import keras
    import keras_hub

    if case.load == "preset":
        return keras_hub.models.Backbone.from_preset(str(case.path))
    if case.load == "h5":
        objects = {"DenseNetBackbone": keras_hub.models.DenseNetBackbone}
        return keras.models.load_model(case.path, custom_objects=objects, compile=False)
    _custom_classes()
    return keras.models.load_model(case.path, compile=False)


def _truth(case: Case) -> dict[str, Moved]:
    """One real fit() step on the reloaded model; what moved, for every tracked layer."""
    import numpy as np

    model = _load(case)
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 2.0, (4, *IMAGE)).astype("float32")
    y = np.zeros(tuple(model.predict(x, verbose=0).shape), "float32")  # predict moves nothing
    return measure_fit_step(model, layers=every_layer_paths(model), data=(x, y))


def _inspect(path: Path) -> dict[str, Any]:
    # The rule route (the rows found in the weights); tests/test_hub_truth.py asks Keras.
    result = CliRunner().invoke(
        cli, ["inspect", "--from-file", "--json", str(path)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --------------------------------------------------------------------------- the acceptance


@pytest.mark.parametrize("name", CASES)
def test_every_bn_listed_and_predicted_as_measured(code_built_files, name):
    case = code_built_files[name]
    truth = _truth(case)
    doc = _inspect(case.path)
    rows = {layer["path"]: layer for layer in doc["layers"]}
    bn_truth = {p: m for p, m in truth.items() if m.is_batchnorm}
    assert bn_truth, "the model has BN layers"
    problems = []
    for path, moved in bn_truth.items():
        row = rows.get(path)
        if row is None:
            problems.append(f"{path}: Keras has this BN, inspect does not list it")
            continue
        fit = row["in_fit"]
        if row["is_batchnorm"] is not True:
            problems.append(f"{path}: listed with is_batchnorm={row['is_batchnorm']}")
        if fit["updates_moving_stats"] is not moved.moving_stats:
            problems.append(f"{path}: stats predicted {fit['updates_moving_stats']}, moved {moved}")
        if fit["trains_weights"] is not moved.gamma_beta:
            problems.append(f"{path}: gamma/beta predicted {fit['trains_weights']}, {moved}")
    listed_bn = {p for p, row in rows.items() if row["is_batchnorm"]}
    problems += [f"{p}: listed as BN, Keras has no such BN" for p in listed_bn - set(bn_truth)]
    assert not problems, "\n".join(problems)
    # Read from the weights, marked so, and counted in the summary.
    from_weights = [rows[p] for p in bn_truth if rows[p]["source"] == "weights"]
    assert doc["summary"]["bn_from_weights"] == len(from_weights) > 0
    # LayerNormalization held next to the BN layers is not counted.
    assert not any(p.endswith("/norm") for p in listed_bn)


@pytest.mark.parametrize("name", [c for c in CASES if c.endswith("-guide")])
def test_reload_trap_is_warned_with_the_count(code_built_files, name):
    case = code_built_files[name]
    doc = _inspect(case.path)
    traps = [w for w in doc["warnings"] if w["code"] == "code-built-reload-trains"]
    if name.startswith("subclassed"):
        # A subclassed model saves no flag for its block at all: nothing says False.
        assert traps == []
        return
    assert traps, doc["warnings"]
    training = sum(
        1
        for layer in doc["layers"]
        if layer["source"] == "weights"
        and layer["in_fit"]["updates_moving_stats"]
        and (case.frozen == "" or layer["path"].startswith(case.frozen + "/"))
    )
    assert any(f" {training} BN layer(s) inside it" in w["message"] for w in traps)
    assert all("keras-hub and code-built models" in w["message"] for w in traps)


def test_keras_hub_files_are_named(code_built_files):
    preset = _inspect(code_built_files["mobilenet-guide"].path)["model"]["keras_hub"]
    assert preset["preset"] is True and preset["version"]
    assert preset["classes"] == ["keras_hub>MobileNetBackbone"]
    task = _inspect(code_built_files["task-guide"].path)["model"]["keras_hub"]
    assert task["classes"] == ["keras_hub>ImageClassifier", "keras_hub>EfficientNetBackbone"]
    assert _inspect(code_built_files["blocks-guide"].path)["model"]["keras_hub"] is None
    result = CliRunner(env={"COLUMNS": "100", "NO_COLOR": "1"}).invoke(
        cli,
        ["inspect", "--from-file", str(code_built_files["task-guide"].path)],
        catch_exceptions=False,
    )
    assert "keras-hub  ImageClassifier, EfficientNetBackbone" in result.stdout
    assert "BatchNormalization*" in result.stdout
    assert "read from the weights" in result.stdout


def _verify(path: Path) -> tuple[int, dict[str, Any]]:
    _custom_classes()
    result = CliRunner().invoke(cli, ["verify", "--json", str(path)], catch_exceptions=False)
    return result.exit_code, json.loads(result.stdout)


@pytest.mark.parametrize("name", CASES)
def test_verify_compares_every_measured_bn(code_built_files, name):
    code, doc = _verify(code_built_files[name].path)
    bns = [layer for layer in doc["layers"] if layer["is_batchnorm"]]
    assert bns
    assert all(layer["in_file"] and layer["predicted"] is not None for layer in bns)
    assert doc["bn_not_compared"] == []
    assert doc["summary"]["layers_measured"] == len(doc["layers"])
    assert doc["summary"]["layers_compared"] >= len(bns)
    assert code == 0 and doc["summary"]["agree"], doc["disagreements"]


def test_verify_fails_on_a_wrong_prediction(code_built_files, monkeypatch):
    """A prediction that says the backbone's BN layers stay frozen (what the saved flag
    suggests) fails with exit 1; so does one that does not predict them at all."""
    from dataclasses import replace

    from bnfreeze.model.records import FitBehaviour, Normalization
    from bnfreeze.ops import inspect as inspect_module

    real = inspect_module.inspect_file
    path = code_built_files["task-guide"].path

    def frozen_prediction(p, runtime, **kwargs):
        report = real(p, runtime, **kwargs)
        frozen = FitBehaviour(False, Normalization.MOVING, False)
        layers = tuple(
            replace(s, in_fit=frozen) if s.layer.code_built else s for s in report.layers
        )
        return replace(report, layers=layers)

    monkeypatch.setattr(inspect_module, "inspect_file", frozen_prediction)
    code, doc = _verify(path)
    assert code == 1 and doc["summary"]["disagreements"] > 0

    def blind_prediction(p, runtime, **kwargs):
        report = real(p, runtime, **kwargs)
        return replace(report, layers=tuple(s for s in report.layers if not s.layer.code_built))

    monkeypatch.setattr(inspect_module, "inspect_file", blind_prediction)
    code, doc = _verify(path)
    assert code == 1 and not doc["summary"]["agree"]
    assert len(doc["bn_not_compared"]) == doc["summary"]["batchnorm"] > 0
    assert all(layer["in_file"] is False for layer in doc["layers"] if layer["is_batchnorm"])
    result = CliRunner(env={"COLUMNS": "100", "NO_COLOR": "1"}).invoke(
        cli, ["verify", str(path)], catch_exceptions=False
    )
    assert result.exit_code == 1
    assert "NOT COMPARED" in result.stdout


def test_inspect_imports_no_keras_on_keras_hub_files(code_built_files):
    paths = [str(code_built_files[n].path) for n in ("task-guide", "mobilenet-guide")]
    code = (
        "import sys\n"
        "from bnfreeze.cli import cli\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        cli.main(['inspect', '--from-file', '--json', p], prog_name='bnfreeze')\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code in (0, None), exc.code\n"
        "bad = [m for m in ('tensorflow', 'keras', 'keras_hub', 'jax') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
