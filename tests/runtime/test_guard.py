"""``bnfreeze.BatchNormGuard`` in real ``fit()`` runs, on TensorFlow and on JAX.

Each backend trains in its own interpreter (``tests/support/guard_scenarios.py``), once per session;
the tests read what Keras did (variables compared around ``fit()``) and what the guard
reported. The acceptance cases of issue 16:

* flags changed after ``fit()`` without ``compile()``: the guard warns, and ``strict=True``
  stops before the first step;
* the guide's phase 2 with ``expect="bn-inference"``: the overridden call site is reported
  before training, and after batch 1 every BN of the backbone is measured moving;
* a correct ``--bn-inference`` recipe: the guard is silent, and the weights after training are
  bit-identical to a run without the guard.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import warm
from paths import ROOT, SUPPORT

from bnfreeze.runtime.guard import StaleEffect

pytestmark = pytest.mark.keras

SCENARIOS = SUPPORT / "guard_scenarios.py"
BACKENDS = ["tensorflow", "jax"]


@pytest.fixture(scope="module", params=BACKENDS)
def run(request) -> dict:
    backend = request.param
    if backend == "jax":
        pytest.importorskip("jax")
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = warm.run(
        [sys.executable, str(SCENARIOS)], capture_output=True, text=True, env=env, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout)
    assert doc["backend"] == backend
    return doc


def categories(case: dict) -> list[str]:
    return [w["category"] for w in case["warnings"]]


def test_flags_changed_after_fit_warn(run):
    case = run["stale"]
    assert "RecompileWarning" in categories(case)
    stale = case["stale"]
    assert stale["gained"] == ["base/conv1", "base/bn1", "base/conv2", "base/bn2"]
    assert stale["lost"] == []
    warning = next(w["message"] for w in case["warnings"] if w["category"] == "RecompileWarning")
    assert "compile() again" in warning
    if run["backend"] == "jax":
        # Keras raised at the first step, as the guard said it would.
        assert stale["effect"] == "raises"
        assert case["error"].startswith("ValueError")
    else:
        # The traced step was reused: Keras ignored the change (the backbone stayed frozen),
        # as the guard said, and the guard measured it after batch 1.
        assert stale["effect"] == "ignored-then-unknown-variable"
        assert case["error"] is None
        assert case["moved"] == ["head/bias", "head/kernel"]
        assert case["weights_trained"] == ["head"]
        assert any(d.startswith("base/conv1: ") for d in case["disagreements"])
        assert "GuardWarning" in categories(case)


def test_strict_stops_before_the_first_step(run):
    case = run["stale_strict"]
    assert case["error"].startswith("GuardError: BatchNormGuard(strict=True) stopped fit()")
    assert case["moved"] == []  # nothing trained, and on JAX the variables are still readable
    assert case["stopped"] is True
    assert case["measured"] is False


def test_a_new_batch_shape_sees_the_change(run):
    case = run["new_shape"]
    assert case["error"] is not None
    if run["backend"] == "jax":
        assert case["stale"]["effect"] == "raises"
    else:
        assert case["stale"]["effect"] == "ignored-then-unknown-variable"
        # 6 samples in batches of 4 give a dataset of another batch shape (None, not 4):
        # fit() traced its step anew at the first batch, which saw the change and raised.
        assert "Unknown variable" in case["error"]


def test_guide_phase2_reports_the_overridden_call_site_then_measures_it(run):
    case = run["phase2"]
    assert case["error"] is None
    # Before training: the trap, and the expectation predicted to fail.
    assert ["call-site-training-ignored", "mobilenetv2_0.35_32"] in case["traps"]
    assert case["predicted_failures"] == [["bn-inference", 52]]
    before = case["warnings"][0]
    assert before["category"] == "GuardWarning" and "before training" in before["message"]
    # After batch 1: every BN of the backbone took the batch branch and moved its statistics.
    backbone = [p.replace("base/", "mobilenetv2_0.35_32/") for p in case["backbone_bn"]]
    assert len(backbone) == 52
    assert sorted(case["batch_branch"]) == sorted(backbone)
    assert sorted(case["stats_moved"]) == sorted(backbone)
    assert case["inference_branch"] == []
    assert case["measured_failures"] == [["bn-inference", 52]]
    assert case["disagreements"] == []  # the prediction was right: Keras 3 overrides it
    names = {p.split("/", 1)[1] for p in backbone}
    assert {m.split("/")[0] for m in case["moved"] if m.endswith("moving_mean")} == names


def test_correct_recipe_is_silent_and_trains_as_without_the_guard(run):
    plain, guarded = run["recipe_plain"], run["recipe_guarded"]
    assert guarded["warnings"] == [] and guarded["error"] is None
    assert guarded["ok"] is True and guarded["stopped"] is False
    assert guarded["inference_branch"] == ["base/bn1", "base/bn2"]
    assert guarded["stats_moved"] == []
    assert guarded["weights_trained"] == ["base/conv1", "base/conv2", "head"]
    assert guarded["measured_failures"] == [["bn-inference", 0], ["trains=conv*", 0]]
    # Measured by Keras: the convolutions and the head trained, no BN variable moved.
    assert plain["moved"] == guarded["moved"]
    assert not [m for m in plain["moved"] if m.startswith("bn")]
    # Bit-identical weights after 2 epochs of 2 batches, with and without the guard.
    assert guarded["weights"] == plain["weights"]


def test_a_bad_expectation_is_refused_when_the_guard_is_made(run):
    assert "unknown expectation 'no-such-thing'" in run["bad_expect"]


def test_the_class_is_a_keras_callback_made_on_first_access():
    import keras

    import bnfreeze
    from bnfreeze.runtime import guard

    cls = bnfreeze.BatchNormGuard
    assert issubclass(cls, keras.callbacks.Callback)
    assert cls is guard.BatchNormGuard  # made once
    made = cls(expect=["bn-inference", "trains=head"], strict=True)
    assert [e.name for e in made.expect] == ["bn-inference", "trains=head"]
    assert made.report is None
    with pytest.raises(TypeError):
        cls(expect=3)


@pytest.mark.parametrize("effect", list(StaleEffect))
def test_every_stale_effect_is_worded(effect):
    from bnfreeze.runtime.guard import StaleFlags

    stale = StaleFlags("tensorflow", effect, ("base/conv1",), (), 2, 4)
    assert "base/conv1" in stale.message
    assert "compile() again" in stale.message
