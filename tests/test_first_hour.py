"""What a new user meets in the first hour (issue 21): each test here failed before the fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import bnfreeze
from bnfreeze.cli import cli
from bnfreeze.errors import RuntimeUnavailableError
from bnfreeze.model.records import Runtime, WarningCode

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
ENV = {"COLUMNS": "80", "NO_COLOR": "1", "FORCE_COLOR": None}


def run(*args: str):
    return CliRunner().invoke(cli, list(args), env=ENV, catch_exceptions=False)


def test_the_first_command_warns_about_nothing():
    result = run("inspect", str(SAMPLES / "guide_pattern.keras"))
    assert result.exit_code == 0
    assert result.stderr == ""
    assert "compiled, 6 saved optimizer variables" in result.stdout  # the fact, in the summary


def test_untrained_statistics_warn_only_where_they_do_harm():
    """bn_2 is frozen with untrained statistics: an identity, warned about, and not told to
    freeze. bn_1 trains, which fills its statistics: nothing goes wrong, no warning."""
    result = run("inspect", str(SAMPLES / "sequential.keras"))
    warnings = " ".join(result.stderr.split())
    assert "bn_1 has untrained statistics" not in warnings
    bn_2 = warnings[warnings.index("bn_2 has untrained statistics") :]
    assert "Freezing it (--bn-inference)" not in bn_2
    assert "runs in inference mode in fit(), so it is an identity" in bn_2


def test_verify_help_says_the_branch_is_recorded():
    text = " ".join(run("verify", "--help").stdout.split())
    assert "exactly when its moving statistics moved" not in text
    assert "momentum=1.0" in text


def test_top_level_help_example_needs_no_checkout():
    text = run("--help").stdout
    assert "sample_models/" not in text
    assert re.search(r"Example:\s+bnfreeze inspect model\.keras", text)


def test_without_keras_the_message_does_not_claim_a_model(monkeypatch):
    from bnfreeze.runtime import environment

    monkeypatch.setattr(environment, "_installed", lambda name: False)
    with pytest.raises(RuntimeUnavailableError) as caught:
        environment.require_runtime(Runtime.KERAS3)
    assert "runs the model" not in str(caught.value)
    assert "needs Keras" in str(caught.value)


def test_guarantees_page_claims_no_count_a_run_did_not_print():
    page = (ROOT / "docs" / "guarantees.md").read_text(encoding="utf-8")
    assert "in our runs all" not in page


def test_finding_codes_compare_equal_to_their_json_strings():
    for code in WarningCode:
        assert code == code.value and str(code) == code.value
    report = bnfreeze.inspect(SAMPLES / "sequential.keras")
    assert "untrained-bn-statistics" in [f.code for f in report.warnings]


def test_report_and_edit_result_are_importable_from_bnfreeze():
    from bnfreeze import EditResult, Finding, Report

    assert isinstance(bnfreeze.inspect(SAMPLES / "seed_bn.keras"), Report)
    result = bnfreeze.freeze(SAMPLES / "seed_bn.keras", bn_inference=True, dry_run=True)
    assert isinstance(result, EditResult)
    assert all(isinstance(f, Finding) for f in result.warnings)


def test_dir_lists_only_the_public_api():
    names = dir(bnfreeze)
    assert names == sorted(bnfreeze.__all__)
    for private in ("Any", "TYPE_CHECKING", "annotations"):
        assert private not in names
    for public in ("inspect", "freeze", "unfreeze", "Report", "EditResult", "BatchNormGuard"):
        assert public in names
