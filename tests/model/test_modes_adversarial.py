"""Adversarial but ordinary patterns: what ``bnfreeze inspect`` predicts from the file agrees
with what Keras does in one real ``fit()`` step, on every BN layer, on TensorFlow and JAX.

The models are built, saved, loaded back, trained and measured in one subprocess per backend
(``tests/support/adversarial_cases.py``; a process holds one backend). The measurement records the
normalization each BN call's output matches, not whether its statistics moved: with
``momentum=1.0`` the batch branch runs and the statistics stay bit-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import warm
from click.testing import CliRunner
from legacy_corpus import keras20_functional
from paths import SUPPORT

from bnfreeze.cli import cli

pytestmark = pytest.mark.keras

BACKENDS = ("tensorflow", "jax")


@pytest.fixture(scope="session")
def adversarial(tmp_path_factory) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Per backend: the folder of saved cases and what Keras measured in them. Both
    run in a fresh interpreter (tests/support/warm.py)."""
    root = tmp_path_factory.mktemp("adversarial")
    # A Keras 2.0-era file from the wild (crafted byte-exact with h5py), frozen by bnfreeze's
    # config route without Keras: each backend loads and measures the result too.
    keras20_functional(root / "keras20.h5")
    frozen = root / "keras20_bn_inference.h5"
    result = CliRunner().invoke(
        cli, ["freeze", str(root / "keras20.h5"), "--bn-inference", "-o", str(frozen)]
    )
    assert result.exit_code == 0, result.output
    out = {}
    for backend in BACKENDS:
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        script = SUPPORT / "adversarial_cases.py"
        done = warm.run(
            [sys.executable, str(script), str(root / backend), str(frozen)], env=env, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        measured = json.loads((root / backend / "measured.json").read_text())
        assert measured["backend"] == backend
        shutil.copy(frozen, root / backend / frozen.name)
        out[backend] = (root / backend, measured["files"])
    return out


def inspect_json(path: Path) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["inspect", "--json", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


FILES = [
    "custom_wrapper.keras",
    "custom_wrapper.h5",
    "shared_bn_two_calls.keras",
    "sub_model_reused.keras",
    "duplicate_names.keras",
    "duplicate_names.h5",
    "multi_io.keras",
    "seq_in_func_in_seq.keras",
    "seq_in_func_in_seq.h5",
    "time_distributed.keras",
    "bn_variants.keras",
    "mixed_precision.keras",
    "keras20_bn_inference.h5",
]


def inside_custom(doc: dict[str, Any], path: str) -> str | None:
    """The custom layer ``path`` lies in, if any (inspect lists it, not its insides)."""
    custom = {
        layer["path"]
        for layer in doc["layers"]
        if any(w["code"] == "unknown-layer" and w["path"] == layer["path"] for w in doc["warnings"])
    }
    return next((c for c in custom if path.startswith(c + "/")), None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FILES)
def test_inspect_agrees_with_keras_on_every_bn(adversarial, backend, name):
    folder, measured = adversarial[backend]
    doc = inspect_json(folder / name)
    listed = {layer["path"]: layer for layer in doc["layers"] if layer["is_batchnorm"]}
    problems = []
    for path, truth in measured[name].items():
        branches = truth["branches"]
        assert len(branches) == 1 and branches[0] in ("batch", "moving"), (path, branches)
        if inside_custom(doc, path):
            # A custom class's call() decides; inspect lists the BN but must not claim a mode.
            inner = listed.get(path)
            assert inner is not None, f"{path}: the BN inside a custom layer is not listed"
            assert inner["in_fit"]["normalizes_with"] is None, (
                f"{path}: a mode is claimed inside a custom layer"
            )
            assert inner["in_fit"]["updates_moving_stats"] is None, path
            continue
        layer = listed.get(path)
        if layer is None:
            problems.append(f"{path}: Keras has this BN layer, inspect does not list it")
            continue
        fit = layer["in_fit"]
        want = {"normalizes_with": branches[0], "trains_weights": bool(truth["gamma_beta_moved"])}
        if truth["momentum"] != 1.0:
            # momentum=1.0 keeps the statistics bit-identical in the batch branch.
            want["updates_moving_stats"] = truth["stats_moved"]
        got = {key: fit[key] for key in want}
        if got != want:
            problems.append(f"{path}: inspect {got}, Keras {want}")
    extra = set(listed) - set(measured[name])
    problems += [f"{path}: inspect lists a BN that Keras does not have" for path in extra]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_custom_wrapper_is_unknown_and_its_bn_runs_in_inference(adversarial, backend, suffix):
    """Issue 11 item 1: a registered custom Wrapper whose call() passes training=False. Keras
    runs its BN in inference mode in fit(); inspect must not predict "training", and must
    give the README's unknown-layer warning for the wrapper."""
    folder, measured = adversarial[backend]
    name = f"custom_wrapper{suffix}"
    assert measured[name]["wrap/inner_bn"]["branches"] == ["moving"]
    assert measured[name]["head_bn"]["branches"] == ["batch"]
    doc = inspect_json(folder / name)
    wrap = next(layer for layer in doc["layers"] if layer["path"] == "wrap")
    assert wrap["is_batchnorm"] is False and wrap["in_fit"]["normalizes_with"] is None
    # The wrapper and the BN inside it each say why their mode is unknown.
    assert sorted(w["path"] for w in doc["warnings"] if w["code"] == "unknown-layer") == [
        "wrap",
        "wrap/inner_bn",
    ]
    inner = next(layer for layer in doc["layers"] if layer["path"] == "wrap/inner_bn")
    assert inner["is_batchnorm"] is True and inner["in_fit"]["normalizes_with"] is None
    assert doc["summary"]["bn_training_in_fit"] == 1  # head_bn only


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_one_takes_the_batch_branch_with_still_statistics(adversarial, backend):
    """The measurement itself: the case the statistics cannot tell."""
    _, measured = adversarial[backend]
    truth = measured["bn_variants.keras"]["momentum1"]
    assert truth["branches"] == ["batch"]
    assert truth["stats_moved"] is False and truth["gamma_beta_moved"] is True
    assert measured["bn_variants.keras"]["momentum1_frozen"]["branches"] == ["moving"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_bn_with_a_training_false_call_trains_in_both_calls(adversarial, backend):
    """Keras 3 overrides the recorded training=False of the second call in fit()."""
    _, measured = adversarial[backend]
    assert measured["shared_bn_two_calls.keras"]["shared_bn"]["branches"] == ["batch"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_frozen_keras20_file_runs_its_bn_in_inference(adversarial, backend):
    """Issue 11 item 4 on each backend: the crafted Keras 2.0-era file, frozen by the config
    route, loads and its BN takes the moving branch in fit() with gamma/beta still."""
    _, measured = adversarial[backend]
    truth = measured["keras20_bn_inference.h5"]["batch_normalization_1"]
    assert truth["branches"] == ["moving"]
    assert truth["gamma_beta_moved"] is False and truth["stats_moved"] is False
