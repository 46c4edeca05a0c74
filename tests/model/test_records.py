"""Every member of every Enum in bnfreeze.model.records is reachable and means what it says.

Each test maps every member of one Enum to a way of producing it, and first checks that the
mapping covers the whole Enum, so a new member fails here until it is produced somewhere.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from keras_configs import functional, input_layer, layer, node
from paths import SAMPLES

import bnfreeze
from bnfreeze.errors import EXIT_USAGE, RuntimeUnavailableError
from bnfreeze.formats.readers import read_model
from bnfreeze.model import records
from bnfreeze.model.records import (
    LayerKind,
    ModelFile,
    ModelFormat,
    Normalization,
    Runtime,
    WarningCode,
)
from bnfreeze.model.walk import walk
from bnfreeze.ops.inspect import inspect_file, inspect_model_file


def test_the_enums_tested_here_are_all_of_them():
    enums = {
        name
        for name, value in vars(records).items()
        if isinstance(value, type)
        and issubclass(value, enum.Enum)
        and value.__module__ == records.__name__
    }
    assert enums == {
        "ModelFormat",
        "LayerKind",
        "LayerSource",
        "Normalization",
        "Runtime",
        "WarningCode",
    }


def test_values_are_unique_lowercase_words():
    for cls in (ModelFormat, LayerKind, records.LayerSource, Normalization, Runtime, WarningCode):
        values = [m.value for m in cls]
        assert len(set(values)) == len(values)
        assert all(v == v.lower() and " " not in v for v in values)


# --- ModelFormat ----------------------------------------------------------------------------


def _unzipped(tmp_path: Path) -> Path:
    with zipfile.ZipFile(SAMPLES / "seed_bn.keras") as archive:
        archive.extractall(tmp_path / "seed_bn")
    return tmp_path / "seed_bn"


def _memory(tmp_path: Path) -> ModelFile:
    on_disk = read_model(SAMPLES / "seed_bn.keras")
    return ModelFile(
        path="<memory>",
        format=ModelFormat.MEMORY,
        config=on_disk.config,
        keras_version=None,
        compiled=False,
    )


FORMATS: dict[ModelFormat, tuple[Callable[[Path], ModelFile], str]] = {
    ModelFormat.KERAS: (lambda tmp: read_model(SAMPLES / "seed_bn.keras"), "keras"),
    ModelFormat.KERAS_DIR: (lambda tmp: read_model(_unzipped(tmp)), "keras"),
    ModelFormat.H5: (lambda tmp: read_model(SAMPLES / "nested_legacy.h5"), "h5"),
    ModelFormat.MEMORY: (_memory, "memory"),
}


def test_formats_cover_the_enum():
    assert set(FORMATS) == set(ModelFormat)


@pytest.mark.parametrize("fmt", list(ModelFormat), ids=lambda m: m.name)
def test_every_format_is_produced_and_has_its_json_name(tmp_path, fmt):
    produce, json_name = FORMATS[fmt]
    model = produce(tmp_path)
    assert model.format is fmt
    assert fmt.json_name == json_name
    report = inspect_model_file(model)
    assert report.model.format.json_name == json_name


# --- LayerKind ------------------------------------------------------------------------------


KIND_EXAMPLES: dict[LayerKind, dict] = {
    LayerKind.BATCHNORM: layer("BatchNormalization", "bn"),
    LayerKind.NORMALIZATION: layer("LayerNormalization", "ln"),
    LayerKind.CONTAINER: functional("sub", [input_layer("sub_in")]),
    LayerKind.WRAPPER: layer("TimeDistributed", "td", layer=layer("Dense", "inner", units=2)),
    LayerKind.INPUT: input_layer("x"),
    LayerKind.LAYER: layer("Dense", "dense", units=2),
    LayerKind.UNKNOWN: layer("Mine", "mine", module="pkg.layers", registered_name="pkg>Mine"),
}


def test_layer_kinds_cover_the_enum():
    assert set(KIND_EXAMPLES) == set(LayerKind)


@pytest.mark.parametrize("kind", list(LayerKind), ids=lambda m: m.name)
def test_every_layer_kind_is_produced_by_the_walk(kind):
    entry = KIND_EXAMPLES[kind]
    (record, *_) = walk(functional("m", [entry])).layers
    assert record.kind is kind
    assert record.is_batchnorm is (kind is LayerKind.BATCHNORM)
    assert record.is_container is (kind in (LayerKind.CONTAINER, LayerKind.WRAPPER))


def test_layer_kinds_in_a_real_file():
    report = inspect_file(SAMPLES / "bn_under_frozen.keras")
    kinds = {s.layer.kind for s in report.layers}
    assert {LayerKind.INPUT, LayerKind.CONTAINER, LayerKind.BATCHNORM, LayerKind.LAYER} <= kinds


# --- Normalization ----------------------------------------------------------------------------


def test_every_normalization_is_produced():
    report = inspect_file(SAMPLES / "sequential.keras")
    by_path = {s.layer.path: s.in_fit.normalizes_with for s in report.layers}
    produced = {Normalization.BATCH: by_path["bn_1"], Normalization.MOVING: by_path["bn_2"]}
    assert set(produced) == set(Normalization)
    for member, got in produced.items():
        assert got is member
    assert [m.value for m in Normalization] == ["batch", "moving"]  # the JSON words


def test_in_predict_is_always_moving_statistics():
    report = inspect_file(SAMPLES / "sequential.keras")
    assert {s.in_predict.normalizes_with for s in report.batchnorm} == {Normalization.MOVING}
    assert not any(s.in_predict.updates_moving_stats for s in report.batchnorm)


# --- Runtime --------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", list(Runtime), ids=lambda m: m.name)
def test_every_runtime_has_rules(runtime):
    report = inspect_file(SAMPLES / "seed_bn.keras", runtime)
    assert report.runtime is runtime


def test_a_runtime_without_rules_is_a_clear_error(monkeypatch):
    from bnfreeze.model import modes

    monkeypatch.delitem(modes.RULES, Runtime.TF_KERAS)
    with pytest.raises(RuntimeUnavailableError, match=r"bnfreeze predicts for keras3\.$") as info:
        inspect_file(SAMPLES / "seed_bn.keras", Runtime.TF_KERAS)
    assert info.value.exit_code == EXIT_USAGE


# --- WarningCode ------------------------------------------------------------------------------


def _archive(tmp: Path, layers: list, *, trainable: bool = True) -> Path:
    path = tmp / "m.keras"
    config = {
        "class_name": "Functional",
        "module": "keras.src.models.functional",
        "registered_name": "Functional",
        "config": {"name": "m", "trainable": trainable, "layers": layers},
    }
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps(config))
    return path


def _keras2_archive(tmp: Path) -> Path:
    path = _archive(tmp, [input_layer("x"), layer("DepthwiseConv2D", "dw", groups=1)])
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "2.21.0"}))
    return path


def _frozen_stats(tmp: Path) -> Path:
    from bnfreeze.ops.frozen_stats import BnClass, convert_file

    out = tmp / "frozen_stats.keras"
    convert_file(str(SAMPLES / "sequential.keras"), str(out), BnClass.FROZEN_STATS)
    return out


def _warnings(path: Path) -> set[WarningCode]:
    return {f.code for f in inspect_file(path).warnings}


def _recompile_required(tmp: Path) -> set[WarningCode]:
    result = bnfreeze.freeze(SAMPLES / "sequential.keras", bn_inference=True, dry_run=True)
    return {f.code for f in result.warnings}


def _optimizer_dropped(tmp: Path) -> set[WarningCode]:
    result = bnfreeze.unfreeze(
        SAMPLES / "guide_pattern.keras",
        keep_bn_inference=True,
        optimizer_state="drop",
        dry_run=True,
    )
    return {f.code for f in result.warnings}


def _call_site(tmp: Path) -> set[WarningCode]:
    sub = functional(
        "sub", [input_layer("i"), layer("BatchNormalization", "bn")], inbound=node(training=False)
    )
    return _warnings(_archive(tmp, [input_layer("x"), sub]))


def _unknown(tmp: Path) -> set[WarningCode]:
    return _warnings(_archive(tmp, [KIND_EXAMPLES[LayerKind.UNKNOWN]]))


def _code_built(tmp: Path) -> set[WarningCode]:
    from code_built_files import bn, write_code_built_keras

    path = write_code_built_keras(tmp / "hub.keras", {"layers/batch_normalization": ("bn", bn())})
    return _warnings(path)


def _not_asked(tmp: Path) -> set[WarningCode]:
    """Keras could not be asked (here: a stand-in that says it is not installed)."""
    from code_built_files import bn, write_code_built_keras

    path = write_code_built_keras(tmp / "hub.keras", {"layers/batch_normalization": ("bn", bn())})
    report = inspect_file(path, ask_keras=lambda model, listed: (None, "Keras is not installed"))
    return {f.code for f in report.warnings}


def _not_called(tmp: Path) -> set[WarningCode]:
    """Keras (here: a stand-in) says the loaded model's forward pass never calls the BN."""
    from code_built_files import bn, write_code_built_keras

    from bnfreeze.model.code_built import Rebuilt

    path = write_code_built_keras(tmp / "m.keras", {"block/bn1": ("bn1", bn())})
    asked = records.LayerRecord(
        path="block/bn1",
        name="bn1",
        class_name="BatchNormalization",
        kind=LayerKind.BATCHNORM,
        depth=1,
        parent="block",
        trainable=True,
        source=records.LayerSource.KERAS,
        called_in_fit=False,
    )
    rebuilt = Rebuilt((asked,), {"block/bn1": True}, {}, {}, "3.15.1")
    report = inspect_file(path, ask_keras=lambda model, listed: (rebuilt, None))
    state = report.state("block/bn1")
    assert state.in_fit.normalizes_with is None and state.in_fit.updates_moving_stats is False
    assert (report.bn_training_in_fit, report.bn_inference_in_fit) == (0, 0)
    return {f.code for f in report.warnings}


def _not_trainable(tmp: Path) -> set[WarningCode]:
    return _warnings(_archive(tmp, [layer("Dense", "d", units=2)], trainable=False))


def _recorded_flags(tmp: Path) -> set[WarningCode]:
    from bnfreeze.formats.recorded_flags import RecordedFlags
    from bnfreeze.runtime.saving import recorded_flags_findings

    recorded = RecordedFlags({"layers/batch_normalization": False})
    return {f.code for f in recorded_flags_findings(recorded, str(tmp / "m.keras"))}


WARNINGS: dict[WarningCode, Callable[[Path], set[WarningCode]]] = {
    WarningCode.CALL_SITE_TRAINING_IGNORED: _call_site,
    WarningCode.TRAINABLE_BN_UNDER_FROZEN_CONTAINER: lambda tmp: _warnings(
        SAMPLES / "bn_under_frozen.keras"
    ),
    WarningCode.OPTIMIZER_STATE: _optimizer_dropped,
    WarningCode.UNTRAINED_BN_STATISTICS: lambda tmp: _warnings(SAMPLES / "sequential.keras"),
    WarningCode.UNKNOWN_LAYER: _unknown,
    WarningCode.MODEL_NOT_TRAINABLE: _not_trainable,
    WarningCode.RECOMPILE_REQUIRED: _recompile_required,
    WarningCode.KERAS3_INCOMPATIBLE: lambda tmp: _warnings(_keras2_archive(tmp)),
    WarningCode.SAVED_BY_KERAS2: lambda tmp: _warnings(_keras2_archive(tmp)),
    WarningCode.RECORDED_FLAGS: _recorded_flags,
    WarningCode.CODE_BUILT_RELOAD_TRAINS: _code_built,
    WarningCode.NEEDS_BNFREEZE: lambda tmp: _warnings(_frozen_stats(tmp)),
    WarningCode.SYNCHRONIZED_BN: lambda tmp: _warnings(
        _archive(tmp, [input_layer("x"), layer("BatchNormalization", "bn", synchronized=True)])
    ),
    WarningCode.PREDICTED_BY_RULE: _not_asked,
    WarningCode.BN_NOT_CALLED: _not_called,
}


def test_warning_producers_cover_the_enum():
    assert set(WARNINGS) == set(WarningCode)


@pytest.mark.parametrize("code", list(WarningCode), ids=lambda m: m.value)
def test_every_warning_code_is_produced(tmp_path, code):
    assert code in WARNINGS[code](tmp_path)


# --- LayerSource ----------------------------------------------------------------------------


def test_every_layer_source_is_produced(tmp_path):
    from code_built_files import bn, write_code_built_keras

    from bnfreeze.model.code_built import Rebuilt

    crafted = write_code_built_keras(tmp_path / "m.keras", {"block/bn1": ("bn1", bn())})
    sources = {s.layer.source for s in inspect_file(crafted).layers}
    # The rows Keras gives (bnfreeze.runtime.rebuilt.ask), here from a stand-in: what
    # inspect does with them, not what Keras says (tests/test_hub_truth.py measures that).
    asked = records.LayerRecord(
        path="block/bn1",
        name="bn1",
        class_name="BatchNormalization",
        kind=LayerKind.BATCHNORM,
        depth=1,
        parent="block",
        trainable=False,
        source=records.LayerSource.KERAS,
    )
    rebuilt = Rebuilt((asked,), {"block/bn1": True}, {}, {}, "3.15.1")
    report = inspect_file(crafted, ask_keras=lambda model, listed: (rebuilt, None))
    sources |= {s.layer.source for s in report.layers}
    assert report.state("block/bn1").in_fit.normalizes_with is records.Normalization.MOVING
    sources |= {s.layer.source for s in inspect_file(SAMPLES / "seed_bn.keras").layers}
    assert sources == set(records.LayerSource)


# --- the records themselves ---------------------------------------------------------------


@pytest.mark.parametrize(
    "cls",
    [
        records.ModelFile,
        records.WeightIndex,
        records.LayerRecord,
        records.FitBehaviour,
        records.LayerState,
        records.Finding,
        records.Report,
    ],
    ids=lambda c: c.__name__,
)
def test_records_are_frozen_dataclasses(cls):
    assert dataclasses.is_dataclass(cls)
    assert cls.__dataclass_params__.frozen


def test_report_counts_and_lookup():
    report = inspect_file(SAMPLES / "sequential.keras")
    assert [s.layer.path for s in report.batchnorm] == ["bn_1", "bn_2"]
    assert (report.bn_training_in_fit, report.bn_inference_in_fit) == (1, 1)
    assert report.state("bn_2").layer.trainable is False
    with pytest.raises(KeyError):
        report.state("no/such/layer")
