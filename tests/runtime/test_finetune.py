"""bnfreeze.finetune (bnfreeze/runtime/finetune.py), run on real models.

tests/support/finetune_cases.py runs once per backend, each in its own process; the tests
check what it measured from Keras: the variables each phase's first batch moved, the weights
of a hand-written Keras 3 script, the optimizer's slots by variable path at each boundary,
the gradient from tf.GradientTape / jax.grad.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import warm
from paths import ROOT, SUPPORT

# ------------------------------------------------------------------------------ real runs


def _run(backend: str, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp(f"finetune_{backend}") / "results.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "KERAS_BACKEND": backend,  # the script sets it too; a warm interpreter needs it now
    }
    script = SUPPORT / "finetune_cases.py"
    done = warm.run([sys.executable, str(script), backend, str(out)], env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text(encoding="utf-8"))
    assert results["backend"] == backend
    return results


@pytest.fixture(scope="module", params=["tensorflow", "jax"])
def measured(request, tmp_path_factory) -> dict:
    return _run(request.param, tmp_path_factory)


def _case(measured: dict, name: str) -> dict:
    case = measured[name]
    assert "error" not in case, case.get("error")
    return case


@pytest.mark.keras
def test_guide_schedule_moves_exactly_the_declared_variables_and_no_bn_statistics(measured):
    guide = _case(measured, "guide")
    # Measured by a callback comparing every model variable by path around the first batch.
    assert guide["moved"] == guide["expected"]
    assert guide["stats_moved"] == [[], []]
    assert guide["n_stats"] == 104  # MobileNetV2's 52 BN layers, on every backend
    # The guard saw the same: every BN took the inference branch; nothing disagrees.
    assert guide["guard_batch_branch"] == [0, 0]
    assert guide["problems"] == [[], []]
    assert guide["boundaries"] == [0, 1]
    assert guide["history_len"] == {"loss": 2}
    assert guide["finite"] is True
    assert "RecompileWarning" not in guide["warnings"]
    assert "GuardWarning" not in guide["warnings"]


@pytest.mark.keras
def test_reset_is_bit_identical_to_a_hand_written_keras_script(measured):
    reset = _case(measured, "reset")
    assert reset["paths_equal"] is True
    assert reset["different"] == []
    # ... and both trained what the phases name: the head, then c2 and c3 (not their BN).
    assert reset["changed_from_init"] == [
        "c2/bias",
        "c2/kernel",
        "c3/bias",
        "c3/kernel",
        "head/bias",
        "head/kernel",
    ]


@pytest.mark.keras
def test_carry_keeps_slots_by_path_across_three_gradual_phases(measured):
    carry = _case(measured, "carry")
    first, second = carry["boundaries"]
    # Adam: momentum and velocity per variable. Phase 1 trains head (2 variables), phase 2
    # adds c3 (2), phase 3 adds c2 (2).
    assert first == {
        "iterations_end": 2,
        "iterations_begin": 2,
        "carried": 4,
        "carried_equal": True,
        "carried_nonzero": 4,
        "new": 4,
        "new_zero": True,
    }
    assert second == {
        "iterations_end": 4,
        "iterations_begin": 4,
        "carried": 8,
        "carried_equal": True,
        "carried_nonzero": 8,
        "new": 4,
        "new_zero": True,
    }
    assert carry["reported"] == [None, [4, 4, 2], [8, 4, 4]]
    assert carry["final_iterations"] == 6
    assert carry["finite"] is True


@pytest.mark.keras
def test_discriminative_rates_update_each_group_at_its_rate(measured):
    rates = _case(measured, "rates")
    assert rates["optimizer"] == "MultiOptimizer"
    # |Δw - lr·g| relative to |lr·g|: float32 noise; a wrong rate (10x apart) gives >= 0.9.
    assert set(rates["errors"]) == {
        "low/kernel",
        "low/bias",
        "mid/kernel",
        "mid/bias",
        "head/kernel",
        "head/bias",
    }
    assert max(rates["errors"].values()) < 1e-2, rates["errors"]


@pytest.mark.keras
def test_a_plan_by_path_runs_its_phases_with_params(measured):
    plan = _case(measured, "plan")
    assert plan["labels"] == ["phase 1 (head)", "phase 2"]
    assert plan["boundaries"] == [0, 1]
    assert plan["epochs_run"] == [1, 2]
    assert plan["optimizer"] == ["SGD", "SGD"]
    assert plan["trains"][0] == ["head", "pool"]
    assert plan["trains"][1] == [
        "backbone/c2",
        "backbone/c3",
        "backbone/relu2",
        "backbone/relu3",
        "head",
        "pool",
    ]
    assert plan["carry"] == [None, 2]  # SGD momentum of head/kernel and head/bias
    assert plan["ok"] is True


@pytest.mark.keras
def test_the_guard_reports_per_phase_and_strict_stops(measured):
    strict = _case(measured, "strict")
    # A BN called with training=False in a custom layer's code: Keras runs it in inference
    # mode whatever its flag; phase 2 declares it in training mode.
    assert strict["loose_problems"][0] == []
    assert any("block/bn" in line and "inference" in line for line in strict["loose_problems"][1])
    assert strict["loose_epochs"] == [1, 3]
    stopped = strict["stopped"]
    assert stopped["type"] == "FinetuneStopped"
    assert stopped["message"].startswith("finetune(strict=True) stopped in phase 2: block/bn")
    assert stopped["phases"] == 2
    assert stopped["epochs_run"] == [1, 1]  # stopped after the first batch of phase 2


@pytest.mark.keras
def test_bad_input_is_an_error_before_anything_trains(measured):
    errors = _case(measured, "errors")
    assert errors["uncompiled"].startswith("model 'tiny' is not compiled.")
    assert errors["epochs"] == (
        "finetune sets fit()'s epochs itself (from each phase's epochs); leave it out."
    )
    assert errors["no_match"] == "phase: layers 'nope*' matches no layer."
    assert errors["apply_plan"].startswith("plan 'freeze-up-to' has no [[phase]] tables;")
    assert errors["state"] == "optimizer_state 'keep' is not one of 'carry', 'reset'."
    assert all(errors[k] for k in errors if k.endswith("_untouched"))


@pytest.mark.keras
def test_the_docs_example_runs_and_prints_what_the_page_shows(measured):
    if measured["backend"] != "tensorflow":
        pytest.skip("the page's example runs on TensorFlow only (the guide case measures JAX)")
    docs = _case(measured, "docs")
    assert docs["printed"] == docs["shown"]
    assert "GuardWarning" not in docs["warnings"]
    assert "RecompileWarning" not in docs["warnings"]
