"""Warnings: each code fires exactly when it should, names the layer, and says what to do.

Most models here are configs written by hand (see tests/model/test_walk.py for their shapes) in a
hand-made `.keras` archive, so every case is fast; the samples add real files. That these
situations really behave as the warnings say in Keras is measured in
tests/model/test_modes_measured.py.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import pytest
from keras_configs import functional, input_layer, layer, node, sequential
from paths import SAMPLES

from bnfreeze.formats.readers import read_model
from bnfreeze.model import diagnostics
from bnfreeze.model.records import Finding, ModelFile, ModelFormat, WarningCode
from bnfreeze.ops.inspect import inspect_file, inspect_model_file

UNTRAINED = {"gamma": 1.0, "beta": 0.0, "moving_mean": 0.0, "moving_variance": 1.0}
TRAINED = {"gamma": 1.3, "beta": 0.2, "moving_mean": 0.5, "moving_variance": 2.0}


def keras_archive(
    path: Path,
    config: dict,
    weights: dict[str, list[Any]] | None = None,
    optimizer_variables: int = 0,
    compiled: bool = False,
) -> Path:
    """A `.keras` zip laid out as Keras 3 writes it: ``weights`` maps a layer path to its
    variables' values, stored under layers/<name>/(layers/<name>/)vars/<i>."""
    import h5py
    import numpy as np

    root = {
        "module": "keras.src.models.functional",
        "class_name": "Functional",
        "registered_name": "Functional",
        **config,
        "compile_config": {"optimizer": "adam", "loss": "mse"} if compiled else {},
    }
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        h5.create_group("layers")
        for layer_path, values in (weights or {}).items():
            group = h5["/"]
            for name in layer_path.split("/"):
                group = group.require_group("layers").require_group(name)
                group.require_group("vars").attrs["name"] = name
            for i, value in enumerate(values):
                group["vars"][str(i)] = np.full((3,), value, "float32")
        if optimizer_variables:
            opt = h5.create_group("optimizer").create_group("vars")
            for i in range(optimizer_variables):
                opt[str(i)] = np.zeros((3,), "float32")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        archive.writestr("config.json", json.dumps(root))
        archive.writestr("model.weights.h5", buffer.getvalue())
    return path


def bn_values(stats: dict[str, float], *, scale: bool = True, center: bool = True) -> list:
    return [
        *([stats["gamma"]] if scale else []),
        *([stats["beta"]] if center else []),
        stats["moving_mean"],
        stats["moving_variance"],
    ]


def warnings_of(path: Path) -> list[Finding]:
    return list(inspect_file(path).warnings)


def codes(findings: list[Finding]) -> list[tuple[str, str | None]]:
    return [(f.code.value, f.path) for f in findings]


def only(findings: list[Finding], code: WarningCode) -> list[Finding]:
    return [f for f in findings if f.code is code]


def model(layers: list, *, trainable: bool = True) -> dict:
    return {"config": {"name": "m", "trainable": trainable, "layers": layers}}


def bn(name: str, *, trainable: bool = True, **kw: Any) -> dict:
    entry = layer("BatchNormalization", name, **kw)
    entry["config"]["trainable"] = trainable
    return entry


def backbone(*, trainable: bool, bns: tuple[bool, ...], inbound: Any = None) -> dict:
    """A nested Functional with one BN per entry of ``bns`` (its own flag)."""
    inner = [input_layer("in")] + [bn(f"bn{i}", trainable=t) for i, t in enumerate(bns)]
    return functional("base", inner, trainable=trainable, inbound=inbound)


# --- call-site training=False ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bns", "expected"),
    [((True, True, True), 3), ((True, False, True), 2), ((False, False, False), None)],
)
def test_call_site_training_false_counts_the_bn_it_fails_to_protect(tmp_path, bns, expected):
    config = model(
        [
            input_layer("x"),
            backbone(trainable=True, bns=bns, inbound=node(training=False, mask=None)),
        ]
    )
    found = only(
        warnings_of(keras_archive(tmp_path / "m.keras", config)),
        WarningCode.CALL_SITE_TRAINING_IGNORED,
    )
    if expected is None:
        assert found == []
        return
    (finding,) = found
    assert finding.path == "base"
    assert re.search(rf"\b{expected} BN layer\(s\) it was meant to protect", finding.message)
    assert "keras-team/keras#20285" in finding.message
    assert "--bn-inference --layers 'base/*'" in finding.message


def test_call_site_training_false_on_a_bn_leaf(tmp_path):
    config = model(
        [
            input_layer("x"),
            bn("top", inbound=node(training=False)),
            bn("frozen", trainable=False, inbound=node(training=False)),
        ]
    )
    found = only(
        warnings_of(keras_archive(tmp_path / "m.keras", config)),
        WarningCode.CALL_SITE_TRAINING_IGNORED,
    )
    assert codes(found) == [("call-site-training-ignored", "top")]
    assert "1 BN layer(s)" in found[0].message and "--layers 'top'" in found[0].message


@pytest.mark.parametrize("kwargs", [{"training": True}, {"mask": None}, {}])
def test_no_call_site_warning_without_training_false(tmp_path, kwargs):
    base = backbone(trainable=True, bns=(True,), inbound=node(**kwargs))
    config = model([input_layer("x"), base])
    assert not only(
        warnings_of(keras_archive(tmp_path / "m.keras", config)),
        WarningCode.CALL_SITE_TRAINING_IGNORED,
    )


def test_call_site_training_false_on_a_layer_that_is_not_bn(tmp_path):
    config = model(
        [input_layer("x"), layer("Dropout", "drop", rate=0.5, inbound=node(training=False))]
    )
    assert not warnings_of(keras_archive(tmp_path / "m.keras", config))


def test_guide_pattern_sample_is_protected_by_its_bn_flags():
    """The sample's backbone is frozen leaf by leaf, so its training=False costs nothing."""
    assert not only(
        warnings_of(SAMPLES / "guide_pattern.keras"), WarningCode.CALL_SITE_TRAINING_IGNORED
    )


# --- trainable BN under a frozen container -----------------------------------------------------


def test_trainable_bn_under_frozen_container(tmp_path):
    config = model([input_layer("x"), backbone(trainable=False, bns=(False, True))])
    found = only(
        warnings_of(keras_archive(tmp_path / "m.keras", config)),
        WarningCode.TRAINABLE_BN_UNDER_FROZEN_CONTAINER,
    )
    assert codes(found) == [("trainable-bn-under-frozen-container", "base/bn1")]
    assert "frozen container base" in found[0].message
    assert "--layers 'base/bn1'" in found[0].message


def test_frozen_grandparent_counts(tmp_path):
    inner = sequential("inner", [bn("deep")])
    outer = functional("outer", [input_layer("in"), inner], trainable=False)
    found = only(
        warnings_of(keras_archive(tmp_path / "m.keras", model([outer]))),
        WarningCode.TRAINABLE_BN_UNDER_FROZEN_CONTAINER,
    )
    assert codes(found) == [("trainable-bn-under-frozen-container", "outer/inner/deep")]
    assert "frozen container outer" in found[0].message


def test_frozen_wrapper_with_a_trainable_bn(tmp_path):
    td = layer("TimeDistributed", "td", layer=bn("td_bn"))
    td["config"]["trainable"] = False
    found = only(
        warnings_of(keras_archive(tmp_path / "m.keras", model([td]))),
        WarningCode.TRAINABLE_BN_UNDER_FROZEN_CONTAINER,
    )
    assert codes(found) == [("trainable-bn-under-frozen-container", "td/td_bn")]


@pytest.mark.parametrize(
    "config",
    [
        model([backbone(trainable=True, bns=(True, False))]),
        model([backbone(trainable=False, bns=(False, False))]),
        model(
            [functional("base", [input_layer("in"), layer("Dense", "d", units=2)], trainable=False)]
        ),
    ],
    ids=["container-trainable", "bn-frozen-too", "not-bn"],
)
def test_no_frozen_container_warning(tmp_path, config):
    assert not only(
        warnings_of(keras_archive(tmp_path / "m.keras", config)),
        WarningCode.TRAINABLE_BN_UNDER_FROZEN_CONTAINER,
    )


# --- the same traps on tf_keras (rules measured in tests/model/test_modes_tf_keras.py) ---


def tf_keras_warnings(path: Path) -> list[Finding]:
    from bnfreeze.model.records import Runtime

    return list(inspect_file(path, Runtime.TF_KERAS).warnings)


def test_tf_keras_honours_call_site_training_false_so_no_warning(tmp_path):
    config = model(
        [input_layer("x"), backbone(trainable=True, bns=(True, True), inbound=node(training=False))]
    )
    path = keras_archive(tmp_path / "m.keras", config)
    assert only(warnings_of(path), WarningCode.CALL_SITE_TRAINING_IGNORED)
    assert not only(tf_keras_warnings(path), WarningCode.CALL_SITE_TRAINING_IGNORED)


def test_tf_keras_frozen_container_is_dropped_on_load(tmp_path):
    config = model([input_layer("x"), backbone(trainable=False, bns=(False, True))])
    (finding,) = only(
        tf_keras_warnings(keras_archive(tmp_path / "m.keras", config)),
        WarningCode.TRAINABLE_BN_UNDER_FROZEN_CONTAINER,
    )
    assert finding.path == "base/bn1"
    assert "load_model drops the own trainable flag" in finding.message
    assert "Keras 3" not in finding.message and "--layers 'base/bn1'" in finding.message


def test_tf_keras_frozen_wrapper_keeps_gamma_beta_but_moves_the_statistics(tmp_path):
    td = layer("TimeDistributed", "td", layer=bn("td_bn"))
    td["config"]["trainable"] = False
    (finding,) = only(
        tf_keras_warnings(keras_archive(tmp_path / "m.keras", model([td]))),
        WarningCode.TRAINABLE_BN_UNDER_FROZEN_CONTAINER,
    )
    assert "keeps its gamma/beta fixed" in finding.message
    assert "moves its moving statistics" in finding.message


def test_bn_under_frozen_sample():
    found = only(
        warnings_of(SAMPLES / "bn_under_frozen.keras"),
        WarningCode.TRAINABLE_BN_UNDER_FROZEN_CONTAINER,
    )
    assert codes(found) == [("trainable-bn-under-frozen-container", "backbone/inner_bn")]


# --- optimizer state -----------------------------------------------------------------------


def test_optimizer_state_warning(tmp_path):
    path = keras_archive(
        tmp_path / "m.keras", model([bn("b")]), optimizer_variables=4, compiled=True
    )
    (finding,) = only(warnings_of(path), WarningCode.OPTIMIZER_STATE)
    assert finding.path is None
    assert finding.message.startswith("The file carries 4 saved optimizer variables")
    assert "call compile() again with a new optimizer" in finding.message


@pytest.mark.parametrize("compiled", [True, False])
def test_no_optimizer_state_warning_without_optimizer_variables(tmp_path, compiled):
    path = keras_archive(tmp_path / "m.keras", model([bn("b")]), compiled=compiled)
    assert read_model(path).compiled is compiled
    assert not only(warnings_of(path), WarningCode.OPTIMIZER_STATE)


@pytest.mark.parametrize(
    ("name", "count"),
    [("guide_pattern.keras", 6), ("nested_legacy.h5", 22), ("seed_bn.keras", None)],
)
def test_optimizer_state_on_samples(name, count):
    found = only(warnings_of(SAMPLES / name), WarningCode.OPTIMIZER_STATE)
    if count is None:
        assert found == []
    else:
        (finding,) = found
        assert f"carries {count} saved optimizer variables" in finding.message


# --- untrained BN statistics -------------------------------------------------------------------


def test_untrained_statistics_fire_only_for_initializer_values(tmp_path):
    config = model([input_layer("x"), bn("fresh"), bn("trained"), bn("half")])
    half = dict(UNTRAINED, moving_variance=3.0)
    weights = {
        "fresh": bn_values(UNTRAINED),
        "trained": bn_values(TRAINED),
        "half": bn_values(half),
    }
    found = only(
        warnings_of(keras_archive(tmp_path / "m.keras", config, weights)),
        WarningCode.UNTRAINED_BN_STATISTICS,
    )
    assert codes(found) == [("untrained-bn-statistics", "fresh")]
    assert "disables batch normalization" in found[0].message


@pytest.mark.parametrize(("scale", "center"), [(False, False), (False, True), (True, False)])
def test_untrained_statistics_without_gamma_or_beta(tmp_path, scale, center):
    """The weights file numbers its datasets; scale/center decide which is which."""
    config = model(
        [bn("fresh", scale=scale, center=center), bn("trained", scale=scale, center=center)]
    )
    # A trained layer whose gamma/beta happen to be initial: only the statistics tell.
    trained = dict(TRAINED, gamma=1.0, beta=0.0)
    weights = {
        "fresh": bn_values(UNTRAINED, scale=scale, center=center),
        "trained": bn_values(trained, scale=scale, center=center),
    }
    found = only(
        warnings_of(keras_archive(tmp_path / "m.keras", config, weights)),
        WarningCode.UNTRAINED_BN_STATISTICS,
    )
    assert codes(found) == [("untrained-bn-statistics", "fresh")]


def test_untrained_statistics_beta_one_is_not_untrained(tmp_path):
    """With center only, one dataset precedes the statistics: it is beta, and 1.0 is not
    beta's initial value (a count-based guess would have taken it for gamma)."""
    config = model([bn("b", scale=False)])
    weights = {"b": [1.0, 0.0, 1.0]}
    assert not warnings_of(keras_archive(tmp_path / "m.keras", config, weights))


def test_untrained_statistics_with_renorm(tmp_path):
    config = model([bn("r", renorm=True)])
    weights = {"r": [*bn_values(UNTRAINED), 1.0, 0.0, 1.0]}
    found = warnings_of(keras_archive(tmp_path / "m.keras", config, weights))
    assert codes(found) == [("untrained-bn-statistics", "r")]


def test_untrained_statistics_in_a_nested_model(tmp_path):
    config = model([backbone(trainable=True, bns=(True, True))])
    weights = {"base/bn0": bn_values(UNTRAINED), "base/bn1": bn_values(TRAINED)}
    found = warnings_of(keras_archive(tmp_path / "m.keras", config, weights))
    assert codes(found) == [("untrained-bn-statistics", "base/bn0")]


def test_a_weights_layout_that_does_not_fit_the_config_is_unknown(tmp_path):
    config = model([bn("b")])
    weights = {"b": [0.0, 1.0]}  # two datasets for a BN that should have four
    assert not warnings_of(keras_archive(tmp_path / "m.keras", config, weights))


@pytest.mark.parametrize(
    ("name", "paths"),
    [
        ("sequential.keras", ["bn_1", "bn_2"]),  # built with weights=None, never trained
        ("bn_under_frozen.keras", ["backbone/inner_bn", "head_bn"]),
        ("guide_pattern.keras", []),  # the backbone trained a step before it was frozen
        ("seed_bn.keras", []),  # gamma 2, beta 1
        ("nested_legacy.h5", []),  # trained; named datasets in a legacy .h5
    ],
)
def test_untrained_statistics_on_samples(name, paths):
    found = only(warnings_of(SAMPLES / name), WarningCode.UNTRAINED_BN_STATISTICS)
    assert [f.path for f in found] == paths


def test_untrained_statistics_in_a_legacy_h5(tmp_path):
    """Legacy .h5 names its datasets (gamma, beta, moving_mean, moving_variance)."""
    import h5py
    import numpy as np

    path = tmp_path / "fresh.h5"
    cfg = {
        "class_name": "Functional",
        "config": {"name": "m", "trainable": True, "layers": [bn("b")]},
    }
    with h5py.File(path, "w") as h5:
        h5.attrs["model_config"] = json.dumps(cfg)
        h5.attrs["keras_version"] = "3.15.1"
        weights = h5.create_group("model_weights")
        weights.attrs["layer_names"] = [b"b"]
        group = weights.create_group("b")
        names = ["b/gamma", "b/beta", "b/moving_mean", "b/moving_variance"]
        group.attrs["weight_names"] = [n.encode() for n in names]
        for name in names:
            leaf = name.split("/")[1]
            group[name] = np.full((3,), UNTRAINED[leaf], "float32")
    assert codes(warnings_of(path)) == [("untrained-bn-statistics", "b")]


def test_no_untrained_statistics_check_without_readable_weights(tmp_path):
    config = model([bn("b")])
    path = tmp_path / "no_weights.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps({"class_name": "Functional", **config}))
    assert read_model(path).weights is None
    assert not warnings_of(path)


# --- unknown layers ------------------------------------------------------------------------


def test_unknown_layer(tmp_path):
    custom = layer("MyBN", "mine", module="my_package.layers", registered_name="pkg>MyBN")
    config = model([input_layer("x"), custom, layer("Dense", "d", units=2)])
    found = warnings_of(keras_archive(tmp_path / "m.keras", config))
    assert codes(found) == [("unknown-layer", "mine")]
    assert "custom class (MyBN)" in found[0].message and "bnfreeze verify" in found[0].message


# --- the model's own flag ------------------------------------------------------------------


def test_model_not_trainable(tmp_path):
    config = model(
        [bn("b"), bn("frozen", trainable=False), layer("Dense", "d", units=2)], trainable=False
    )
    found = warnings_of(keras_archive(tmp_path / "m.keras", config))
    (finding,) = only(found, WarningCode.MODEL_NOT_TRAINABLE)
    assert finding.path is None
    assert "fit() trains no weights at all" in finding.message
    assert "Yet 1 BN layer(s) whose own flag is True" in finding.message


def test_model_not_trainable_without_trainable_bn(tmp_path):
    config = model([bn("frozen", trainable=False)], trainable=False)
    (finding,) = only(
        warnings_of(keras_archive(tmp_path / "m.keras", config)), WarningCode.MODEL_NOT_TRAINABLE
    )
    assert "Yet" not in finding.message


def _sequential_root(tmp_path: Path, trainable: bool) -> Path:
    path = tmp_path / "seq.keras"
    keras_archive(path, model([bn("b")], trainable=trainable))
    with zipfile.ZipFile(path) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    config = json.loads(members["config.json"])
    config.update(
        class_name="Sequential", module="keras.src.models.sequential", registered_name="Sequential"
    )
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_a_sequential_file_is_trainable_whatever_its_flag(tmp_path):
    """Measured: Keras 3 drops a Sequential's own flag on load (test_modes_measured)."""
    report = inspect_file(_sequential_root(tmp_path, trainable=False))
    assert report.model_trainable is True
    assert not only(list(report.warnings), WarningCode.MODEL_NOT_TRAINABLE)
    assert report.state("b").in_fit.trains_weights is True


def test_an_in_memory_sequential_keeps_its_flag(tmp_path):
    """In memory the flag is live: model.trainable=False trains nothing."""
    on_disk = read_model(_sequential_root(tmp_path, trainable=False))
    in_memory = ModelFile(
        path="<memory>",
        format=ModelFormat.MEMORY,
        config=on_disk.config,
        keras_version=None,
        compiled=False,
    )
    report = inspect_model_file(in_memory)
    assert report.model_trainable is False
    assert only(list(report.warnings), WarningCode.MODEL_NOT_TRAINABLE)


@pytest.mark.parametrize("name", ["seed_bn.keras", "sequential.keras", "guide_pattern.keras"])
def test_no_model_not_trainable_on_samples(name):
    assert not only(warnings_of(SAMPLES / name), WarningCode.MODEL_NOT_TRAINABLE)


# --- BN without gamma and beta -------------------------------------------------------------


def test_bn_without_gamma_and_beta_trains_no_weights(tmp_path):
    config = model(
        [
            bn("bare", scale=False, center=False),
            bn("beta", scale=False),
            bn("gamma", center=False),
            bn("both"),
        ]
    )
    report = inspect_file(keras_archive(tmp_path / "m.keras", config))
    fit = {s.layer.path: s.in_fit for s in report.layers}
    assert fit["bare"].trains_weights is False
    assert fit["bare"].updates_moving_stats is True  # still a BN in training mode
    assert all(fit[p].trains_weights is True for p in ("beta", "gamma", "both"))


# --- a clean model -------------------------------------------------------------------------


def test_a_clean_model_has_no_warnings(tmp_path):
    config = model([input_layer("x"), bn("b"), layer("Dense", "d", units=2)])
    weights = {"b": bn_values(TRAINED), "d": [0.5, 0.1]}
    assert warnings_of(keras_archive(tmp_path / "m.keras", config, weights)) == []


def test_find_without_a_model_file():
    """The Python API may pass no file: only the config-level warnings can fire."""
    report = inspect_file(SAMPLES / "bn_under_frozen.keras")
    found = diagnostics.find(None, report.layers, model_trainable=True)
    assert codes(list(found)) == [("trainable-bn-under-frozen-container", "backbone/inner_bn")]
