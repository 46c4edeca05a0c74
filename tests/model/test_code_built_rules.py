"""What counts as a BN layer in the weights of a code-built model, and what is predicted for
it, on files crafted with h5py (no Keras). ``tests/model/test_code_built.py`` checks the same
against real keras-hub models and one measured ``fit()`` step."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from code_built_files import bn, write_code_built_keras

from bnfreeze.cli import cli


def inspect_json(path) -> dict:
    result = CliRunner().invoke(
        cli, ["inspect", "--from-file", "--json", str(path)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def rows(doc: dict) -> dict[str, dict]:
    return {layer["path"]: layer for layer in doc["layers"]}


@pytest.fixture
def crafted(tmp_path):
    def make(groups, **kwargs):
        return inspect_json(write_code_built_keras(tmp_path / "m.keras", groups, **kwargs))

    return make


def test_bn_in_a_layer_list_and_as_attributes(crafted):
    doc = crafted(
        {
            "layers/batch_normalization": ("stem_bn", bn()),
            "layers/conv2d": ("stem", [[[[0.1] * 4] * 3] * 3, [0.0] * 4]),
            "layers/res_block": ("block1", []),
            "layers/res_block/bn1": ("block1_bn1", bn(8)),
            "layers/res_block/conv1": ("block1_conv1", [[[[0.1] * 8] * 4]]),
        }
    )
    found = rows(doc)
    assert set(found) == {"stem_bn", "block1/block1_bn1"}
    for row in found.values():
        assert row["source"] == "weights"
        assert row["is_batchnorm"] is True and row["class_name"] == "BatchNormalization"
        assert row["trainable"] is True  # not saved: Keras rebuilds it with the default
    # The saved model flag is False: the gamma/beta are frozen, the statistics still move.
    assert found["stem_bn"]["in_fit"] == {
        "trains_weights": False,
        "normalizes_with": "batch",
        "updates_moving_stats": True,
    }
    assert doc["summary"]["bn_from_weights"] == 2
    codes = [w["code"] for w in doc["warnings"]]
    assert "code-built-reload-trains" in codes and "model-not-trainable" in codes
    trap = next(w for w in doc["warnings"] if w["code"] == "code-built-reload-trains")
    assert " 2 BN layer(s) inside it" in trap["message"]
    assert doc["model"]["keras_hub"] is None


def test_no_trap_warning_when_saved_trainable(crafted):
    doc = crafted({"block/bn1": ("bn1", bn())}, trainable=True)
    assert rows(doc)["block/bn1"]["in_fit"]["trains_weights"] is True
    assert "code-built-reload-trains" not in {w["code"] for w in doc["warnings"]}


@pytest.mark.parametrize(
    ("group", "name", "values"),
    [
        ("layers/layer_normalization", "ln", [[1.0] * 4, [0.0] * 4]),
        ("layers/group_normalization_2", "gn", [[1.0] * 4, [0.0] * 4]),
        ("block/norm", "norm", [[1.0] * 4, [0.0] * 4]),  # two vectors, no hint of BN
        ("block/bn1", "bn1", bn(variance=-1.0)),  # a moving variance is never negative
        ("block/proj", "proj", [[1.0] * 4, [0.0] * 4, [0.0] * 3, [1.0] * 4]),  # lengths differ
        ("block/dense", "dense", [[[0.1] * 4] * 4, [0.0] * 4]),  # a kernel and a bias
    ],
)
def test_never_counted_as_bn(crafted, group, name, values):
    doc = crafted({group: (name, values)})
    assert doc["layers"] == []
    assert doc["summary"]["batchnorm"] == 0


def test_center_and_scale_off_by_class_name_is_bn(crafted):
    doc = crafted({"layers/batch_normalization_3": ("bn3", [[1.0] * 4, [0.5] * 4, [1.0] * 4])})
    row = rows(doc)["bn3"]
    assert row["is_batchnorm"] is True
    assert row["in_fit"]["updates_moving_stats"] is True


def test_two_vectors_named_like_bn_is_undecided(crafted):
    """A BN with center and scale off and a LayerNormalization both hold two vectors: with only
    a name hinting at BN, the file cannot tell, and says so."""
    doc = crafted({"block/bn_plain": ("bn_plain", [[0.0] * 4, [1.0] * 4])})
    row = rows(doc)["block/bn_plain"]
    assert row["is_batchnorm"] is None and row["source"] == "weights"
    assert row["in_fit"]["normalizes_with"] is None
    assert doc["summary"]["batchnorm"] == 0
    warning = next(w for w in doc["warnings"] if w["path"] == "block/bn_plain")
    assert warning["code"] == "unknown-layer" and "cannot tell" in warning["message"]


def test_keras_hub_registered_name_is_named(crafted, tmp_path):
    doc = crafted(
        {"layers/batch_normalization": ("bn", bn())},
        class_name="ResNetBackbone",
        registered_name="keras_hub>ResNetBackbone",
    )
    assert doc["model"]["keras_hub"] == {
        "classes": ["keras_hub>ResNetBackbone"],
        "preset": False,
        "version": None,
        "task": None,
    }
    result = CliRunner(env={"COLUMNS": "100", "NO_COLOR": "1"}).invoke(
        cli, ["inspect", "--from-file", str(tmp_path / "m.keras")], catch_exceptions=False
    )
    assert "keras-hub  ResNetBackbone" in result.stdout
    assert "BatchNormalization*" in result.stdout


def test_lean_reader_and_h5py_index_the_same_sublayers(tmp_path):
    """The pure-Python HDF5 reader and the h5py fallback record the same attribute sublayers
    (and a subclassed model's root-level attribute groups)."""
    import zipfile

    from bnfreeze.formats.readers import read_model
    from bnfreeze.formats.readers._keras_common import index_weights

    path = write_code_built_keras(
        tmp_path / "m.keras",
        {"layers/res_block/bn1": ("b_bn1", bn()), "head/bn": ("head_bn", bn(2))},
    )
    lean = read_model(path).weights
    with zipfile.ZipFile(path) as archive:
        weights = tmp_path / "w.h5"
        weights.write_bytes(archive.read("model.weights.h5"))
    fallback, _ = index_weights(str(weights), str(path))
    assert lean is not None and lean.locations  # the lean reader did it
    assert lean.variables == fallback.variables
    assert lean.names == fallback.names
    assert lean.names == {"/layers/res_block/bn1": "b_bn1", "/head/bn": "head_bn"}
