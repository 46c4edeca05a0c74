"""keras-hub tasks for the "truth from Keras" tests (issue 20): tiny models with random
weights, frozen as users freeze them (``task.backbone.trainable = False``), compiled, saved as a
``.keras`` file and as a preset folder (``save_to_preset``).

Run as a script, in fresh processes:

* ``python tests/support/hub_tasks.py build OUT``: build every task and save it under ``OUT``
  (``NAME.keras``, ``NAME_preset``: ``task.save_to_preset``, and HGNetV2's backbone alone,
  ``hgnetv2_backbone_preset``: ``backbone.save_to_preset``);
* ``python tests/support/hub_tasks.py measure OUT``: for each saved file, ``verify`` (one real
  ``fit()`` step, the branch of each BN recorded) and its prediction, which is ``inspect``
  asking Keras, and print one JSON line per file with what each said; then each
  ``freeze --bn-inference`` output loaded with ``bnfreeze.load_model`` and measured.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SMALL = (32, 32, 3)
DETECTOR = (64, 64, 3)


def _resnet(
    hub: Any, shape: tuple[int, int, int], *, stacks: int = 3, pre_activation: bool = False
) -> Any:
    return hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 8, 8, 8][:stacks],
        stackwise_num_blocks=[1] * stacks,
        stackwise_num_strides=[1, 2, 2, 2][:stacks],
        block_type="basic_block",
        use_pre_activation=pre_activation,
        image_shape=shape,
    )


def hgnetv2(hub: Any) -> Any:
    backbone = hub.models.HGNetV2Backbone(
        depths=[1, 1],
        embedding_size=8,
        hidden_sizes=[16, 16],
        stem_channels=[3, 8, 8],
        hidden_act="relu",
        use_learnable_affine_block=False,
        stackwise_stage_filters=[[8, 8, 16, 1, False, 3], [16, 8, 16, 1, True, 3]],
        apply_downsample=[False, True],
        use_lightweight_conv_block=[False, True],
        image_shape=SMALL,
    )
    return hub.models.HGNetV2ImageClassifier(backbone=backbone, preprocessor=None, num_classes=2)


def deeplabv3(hub: Any) -> Any:
    # A ResNet backbone inside the DeepLabV3 backbone; pre-activation (ResNetV2), so its last
    # BN, ``post_bn``, comes after the pyramid outputs DeepLabV3 calls: held, never called.
    backbone = hub.models.DeepLabV3Backbone(
        image_encoder=_resnet(hub, SMALL, pre_activation=True),
        spatial_pyramid_pooling_key="P3",
        upsampling_size=2,
        dilation_rates=[1, 2],
        low_level_feature_key="P2",
        projection_filters=8,
        image_shape=SMALL,
    )
    return hub.models.DeepLabV3ImageSegmenter(backbone=backbone, num_classes=2)


def retinanet(hub: Any) -> Any:
    # Four ResNet stages (P2-P5) under max_level=4: the P5 stage's three BN are held by the
    # backbone (``image_encoder``) and never called.
    backbone = hub.models.RetinaNetBackbone(
        image_encoder=_resnet(hub, DETECTOR, stacks=4),
        min_level=3,
        max_level=4,
        use_p5=False,
        use_fpn_batch_norm=True,
        image_shape=DETECTOR,
    )
    return hub.models.RetinaNetObjectDetector(
        backbone=backbone,
        num_classes=2,
        use_prediction_head_norm=True,
        pre_logits_num_conv_layers=1,
    )


def densenet(hub: Any) -> Any:
    backbone = hub.models.DenseNetBackbone(
        stackwise_num_repeats=[1, 1], growth_rate=4, image_shape=SMALL
    )
    return hub.models.DenseNetImageClassifier(backbone=backbone, num_classes=2)


def efficientnet(hub: Any) -> Any:
    # A fused block (BN held as attributes bn1/bn2) and an MBConv block with squeeze-excite.
    backbone = hub.models.EfficientNetBackbone(
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
        input_shape=SMALL,
    )
    return hub.models.EfficientNetImageClassifier(backbone=backbone, num_classes=2)


BUILDERS = {
    "hgnetv2": hgnetv2,
    "deeplabv3": deeplabv3,
    "retinanet": retinanet,
    "densenet": densenet,
    "efficientnet": efficientnet,
}


def build(out: Path) -> None:
    import keras
    import keras_hub

    for name, builder in BUILDERS.items():
        keras.utils.set_random_seed(0)
        task = builder(keras_hub)
        task.backbone.trainable = False  # as users freeze a backbone
        task.compile(optimizer=keras.optimizers.Adam(1e-3))
        task.save(out / f"{name}.keras")
        task.save_to_preset(os.fspath(out / f"{name}_preset"))
        if name == "hgnetv2":  # a backbone's preset: its outputs are a dict of feature maps
            task.backbone.save_to_preset(os.fspath(out / f"{name}_backbone_preset"))
    bn_inference(out)
    still_statistics(out)
    custom_blocks(out)
    old_keras(out)


#: The ``freeze --bn-inference`` outputs, by input: through the CLI and through the Python API.
FROZEN = {"deeplabv3.keras": "cli", "retinanet.keras": "api", "hgnetv2_preset": "cli"}


def bn_inference(out: Path) -> None:
    """``freeze --bn-inference`` of the saved tasks whose backbones hold layers outside their
    graph, into ``OUT/frozen/``, once through the CLI and once through ``bnfreeze.freeze``;
    and of a task's preset folder, which bnfreeze edits as the task (head included) and
    writes as a ``.keras`` file."""
    from click.testing import CliRunner

    import bnfreeze
    from bnfreeze.cli import cli

    (out / "frozen").mkdir()
    for name, how in FROZEN.items():
        source = out / name
        output = out / "frozen" / f"{name.removesuffix('.keras')}.keras"
        if how == "cli":
            args = ["freeze", str(source), "--bn-inference", "-q", "-o", str(output)]
            result = CliRunner().invoke(cli, args, catch_exceptions=False)
            assert result.exit_code == 0, result.output
        else:
            bnfreeze.freeze(source, bn_inference=True, output=output)


def still_statistics(out: Path) -> None:
    """A BN with ``momentum=1.0``: the batch branch, statistics that never move."""
    import keras

    inputs = keras.Input((4,))
    x = keras.layers.Dense(4, name="dense")(inputs)
    x = keras.layers.BatchNormalization(momentum=1.0, name="bn")(x)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(x), name="still")
    model.save(out / "momentum_one.keras")


def custom_classes() -> dict[str, Any]:
    """A custom block holding a renorm BN as an attribute, and a custom ``Wrapper`` around a
    BN; registered with Keras when called (in the process that saves and in the one that
    loads)."""
    import keras

    package = "bnfreeze_hub_tasks"

    @keras.saving.register_keras_serializable(package=package)
    class RenormBlock(keras.layers.Layer):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.conv = keras.layers.Dense(4)
            self.bn = keras.layers.BatchNormalization(renorm=True)

        def build(self, input_shape: Any) -> None:
            self.conv.build(input_shape)
            self.bn.build((*tuple(input_shape)[:-1], 4))

        def call(self, x: Any, training: Any = None) -> Any:
            return self.bn(self.conv(x), training=training)

    @keras.saving.register_keras_serializable(package=package)
    class PassThrough(keras.layers.Wrapper):
        def call(self, x: Any, training: Any = None) -> Any:
            return self.layer(x, training=training)

    return {"RenormBlock": RenormBlock, "PassThrough": PassThrough}


def custom_blocks(out: Path) -> None:
    import keras

    classes = custom_classes()
    inputs = keras.Input((4,))
    x = classes["RenormBlock"](name="block")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(x), name="renorm")
    model.save(out / "renorm_block.keras")
    inputs = keras.Input((4,))
    x = keras.layers.Dense(4, name="dense")(inputs)
    x = classes["PassThrough"](keras.layers.BatchNormalization(name="bn"), name="wrap")(x)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(x), name="wrapped")
    model.save(out / "custom_wrapper.keras")


def old_keras(out: Path) -> None:
    """The same model saved by this Keras and as Keras 3.0-3.5 write it: their weights file
    names a layer list's groups only by class and position (``batch_normalization_1``), with
    no ``name`` attribute on ``vars`` (measured with Keras 3.3.3: the same group paths, no
    names), and ``metadata.json`` says so."""
    import shutil
    import zipfile

    import h5py
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="c1")(inputs)
    x = keras.layers.BatchNormalization(name="b1")(x)
    sub_in = keras.Input((6, 6, 4))
    y = keras.layers.BatchNormalization(name="b2")(keras.layers.Conv2D(4, 3, name="c2")(sub_in))
    x = keras.Model(sub_in, y, name="sub")(x)
    x = keras.layers.BatchNormalization(name="b3")(x)
    x = keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling2D(name="gap")(x))
    model = keras.Model(inputs, x, name="old")
    model.get_layer("b1").trainable = False
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    model.save(out / "new_keras.keras")
    work = out / "old_keras_members"
    with zipfile.ZipFile(out / "new_keras.keras") as archive:
        archive.extractall(work)
    with h5py.File(work / "model.weights.h5", "r+") as h5:

        def strip(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Group) and "name" in obj.attrs:
                del obj.attrs["name"]

        h5.visititems(strip)
    metadata = json.loads((work / "metadata.json").read_text())
    metadata["keras_version"] = "3.3.3"
    (work / "metadata.json").write_text(json.dumps(metadata))
    with zipfile.ZipFile(out / "old_keras.keras", "w", zipfile.ZIP_STORED) as archive:
        for member in ("metadata.json", "config.json", "model.weights.h5"):
            archive.write(work / member, member)
    shutil.rmtree(work)


def measure(out: Path) -> None:
    from bnfreeze.ops.inspect import inspect_file
    from bnfreeze.runtime.verify import verify_file

    paths = sorted([*out.glob("*.keras"), *out.glob("*_preset")])
    from bnfreeze.errors import BnfreezeError

    custom_classes()
    for path in paths:
        try:
            report = verify_file(path)
        except BnfreezeError as exc:
            print(json.dumps({"file": path.name, "error": str(exc)}), flush=True)
            continue
        prediction = report.prediction
        assert prediction is not None
        measured = {m.path: m for m in report.batchnorm}
        traps = [w for w in prediction.warnings if w.code.value == "code-built-reload-trains"]
        # verify's prediction is inspect asking Keras (inspect_file with rebuilt.ask, no custom
        # objects here): the CLI's inspect, without loading the model a second time.
        inspected = prediction
        row = {
            "file": path.name,
            "task_class": prediction.model.config.get("class_name"),
            "keras_hub_task": prediction.model.preset_task,
            "exit_code": report.exit_code,
            "agree": report.agree,
            "checks": report.checks,
            "disagreements": [d.message for d in report.disagreements],
            "bn_not_compared": list(report.bn_not_compared),
            "bn_not_called": list(report.bn_not_called),
            "inspect_bn": sorted(s.layer.path for s in inspected.batchnorm),
            "inspect_sources": sorted({s.layer.source.value for s in inspected.batchnorm}),
            "inspect_not_called": sorted(
                s.layer.path for s in inspected.batchnorm if s.layer.called_in_fit is False
            ),
            "inspect_training": inspected.bn_training_in_fit,
            "inspect_inference": inspected.bn_inference_in_fit,
            "measured_bn": sorted(measured),
            "measured_batch": sum(
                1
                for m in measured.values()
                if m.normalizes_with is not None and m.normalizes_with.value == "batch"
            ),
            "measured_moving": sum(
                1
                for m in measured.values()
                if m.normalizes_with is not None and m.normalizes_with.value == "moving"
            ),
            "branch_recorded": sum(1 for m in measured.values() if m.branch is not None),
            "trap_message": traps[0].message if traps else None,
            "trap_count": len(traps),
            "stats_moved": report.bn_stats_moved,
            "from_file": [
                {
                    "path": s.layer.path,
                    "is_batchnorm": s.layer.is_batchnorm,
                    "renorm": s.layer.renorm,
                    "normalizes_with": s.in_fit.normalizes_with.value
                    if s.in_fit.normalizes_with is not None
                    else None,
                }
                for s in inspect_file(path).layers
                if s.layer.is_batchnorm or s.layer.kind.value == "unknown"
            ],
            "warnings": sorted({w.code.value for w in inspected.warnings}),
            "warning_paths": sorted(
                f"{w.code.value} {w.path}" for w in inspected.warnings if w.path
            ),
            "rows": [
                [s.layer.path, s.in_fit.trains_weights, s.in_fit.updates_moving_stats]
                for s in inspected.layers
            ],
            "layers_train": sum(1 for s in inspected.layers if s.in_fit.trains_weights),
            "inspect_updates": sum(1 for s in inspected.batchnorm if s.in_fit.updates_moving_stats),
        }
        print(json.dumps(row), flush=True)
    measure_frozen(out)


def measure_frozen(out: Path) -> None:
    """For each ``freeze --bn-inference`` output: load it with ``bnfreeze.load_model`` and
    measure one training step with the branch of every BN recorded; every BN instance the
    model tracks (``_flatten_layers``, attribute-held ones too) is counted, so one the
    measurement does not reach shows up."""
    import keras

    import bnfreeze
    from bnfreeze.formats.readers import read_model
    from bnfreeze.runtime import environment
    from bnfreeze.runtime.batches import SYNTHETIC_SEED, build_batches
    from bnfreeze.runtime.measure import measure

    for path in sorted((out / "frozen").glob("*.keras")):
        with environment.quiet():
            model = bnfreeze.load_model(path)
            config = read_model(path, weights=False).config
            batches = build_batches(keras, model, None, None, 1, 2, SYNTHETIC_SEED, config)
            measured, _ = measure(keras, model, batches, 1, 2, None)
        every = {
            id(layer): layer
            for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, keras.layers.BatchNormalization)
        }
        bn = [m for m in measured if m.is_batchnorm]
        row = {
            "file": f"frozen/{path.name}",
            "bn_instances": len(every),
            "bn_trainable": sorted(layer.name for layer in every.values() if layer.trainable),
            "measured_bn": sorted(m.path for m in bn),
            "called": sum(1 for m in bn if m.called),
            "batch_branch": sorted(
                m.path for m in bn if m.branch is not None and m.branch.value == "batch"
            ),
            "moved": sorted(
                f"{m.path} {m.gamma_beta.value} {m.moving_stats.value}"
                for m in bn
                if {m.gamma_beta.value, m.moving_stats.value} - {"unchanged", "none"}
            ),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    command, folder = sys.argv[1], Path(sys.argv[2])
    {"build": build, "measure": measure}[command](folder)
