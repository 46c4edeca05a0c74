"""The ``check`` gate: every kind of expectation passes on one model and fails on another,
with exact exit codes (0 holds, 1 fails, 2 bad input) and the failures listed."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from paths import ROOT

import bnfreeze
from bnfreeze.cli import cli
from bnfreeze.model.expectations import (
    Expectation,
    ExpectKind,
    GlobScope,
    Observed,
    evaluate,
    parse_expectation,
)
from bnfreeze.model.records import Normalization
from bnfreeze.ops.check import check_file
from bnfreeze.ops.plans import load_plan

CONFIGS = ROOT / "bnfreeze" / "recipes"


def run(*args: str):
    result = CliRunner(env={"COLUMNS": "100", "NO_COLOR": "1"}).invoke(
        cli, ["check", *map(str, args)], catch_exceptions=False
    )
    return result


@pytest.fixture(scope="module")
def guide(samples):
    return samples / "guide_pattern.keras"


@pytest.fixture(scope="module")
def under_frozen(samples):
    return samples / "bn_under_frozen.keras"


@pytest.fixture(scope="module")
def frozen_stats(samples, tmp_path_factory):
    """sequential.keras with both BN layers made FrozenStatsBatchNormalization: bn_1 keeps
    trainable=True (gamma/beta train), bn_2 trainable=False (gamma/beta frozen)."""
    from bnfreeze.ops.frozen_stats import BnClass, convert_file

    out = tmp_path_factory.mktemp("check") / "frozen_stats.keras"
    convert_file(str(samples / "sequential.keras"), str(out), BnClass.FROZEN_STATS)
    return out


@pytest.fixture(scope="module")
def phase2(guide, tmp_path_factory):
    """The guide's phase 2, done the naive way: every layer unfrozen, BN included, while the
    backbone is still called with training=False."""

    out = tmp_path_factory.mktemp("check") / "phase2.keras"
    bnfreeze.unfreeze(guide, output=out)
    return out


# ------------------------------------------------------------- each kind: pass and fail


PASSES = [
    ("guide", "bn-inference"),
    ("guide", "bn-inference=mobilenetv2_0.35_32"),
    ("under_frozen", "bn-train"),
    ("under_frozen", "bn-train=head_bn"),
    ("frozen_stats", "bn-frozen-stats=bn_1"),
    ("guide", "trains=head"),
    ("under_frozen", "trains=head*"),
    ("guide", "frozen=mobilenetv2*"),
    ("under_frozen", "frozen=backbone/inner_dense"),
    ("guide", "min-training=1"),
    ("guide", "max-training=1"),
]


@pytest.mark.parametrize(("model", "spec"), PASSES, ids=[p[1] for p in PASSES])
def test_expectation_holds_exit_0_and_quiet(request, model, spec):
    result = run(request.getfixturevalue(model), "--expect", spec)
    assert result.exit_code == 0
    assert result.stdout == ""
    assert result.stderr == ""


FAILS = [
    (
        "under_frozen",
        "bn-inference",
        [
            ("bn-inference", "backbone/inner_bn", "inference", "training"),
            ("bn-inference", "head_bn", "inference", "training"),
        ],
    ),
    (
        "guide",
        "bn-train=*block_16_*",
        [
            (
                "bn-train=*block_16_*",
                f"mobilenetv2_0.35_32/block_16_{k}_BN",
                "training",
                "inference",
            )
            for k in ("expand", "depthwise", "project")
        ],
    ),
    (
        "guide",
        "trains=*block_16_*",
        [
            ("trains=*block_16_*", f"mobilenetv2_0.35_32/block_16_{k}", "trains", "frozen")
            for k in ("expand", "expand_BN", "depthwise", "depthwise_BN", "project", "project_BN")
        ],
    ),
    ("guide", "frozen=head", [("frozen=head", "head", "frozen", "trains")]),
    (
        "frozen_stats",
        "bn-frozen-stats",
        [
            (
                "bn-frozen-stats",
                "bn_2",
                "inference, gamma/beta train",
                "inference, gamma/beta frozen",
            )
        ],
    ),
    ("guide", "min-training=2", [("min-training=2", None, "at least 2 layers train", "1 train")]),
    (
        "under_frozen",
        "max-training=2",
        [("max-training=2", None, "at most 2 layers train", "3 train")],
    ),
]


@pytest.mark.parametrize(("model", "spec", "failures"), FAILS, ids=[f[1] for f in FAILS])
def test_expectation_fails_exit_1_listing_each_failure(request, model, spec, failures):
    path = request.getfixturevalue(model)
    result = run(path, "--expect", spec, "--json")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert [
        (f["check"], f["path"], f["expected"], f["actual"]) for f in document["failures"]
    ] == failures
    table = run(path, "--expect", spec)
    assert table.exit_code == 1
    assert table.stdout.startswith("FAIL  ")
    for _, layer, expected, actual in failures:
        assert (layer or "(model)") in table.stdout
        assert expected.split()[0] in table.stdout and actual.split()[0] in table.stdout


def test_every_expect_kind_is_covered_by_the_tests_above():
    passing = {parse_expectation(spec).kind for _, spec in PASSES}
    failing = {parse_expectation(spec).kind for _, spec, _ in FAILS}
    assert passing == failing == set(ExpectKind)


def test_failure_table_is_exact(under_frozen):
    result = run(under_frozen, "--expect", "bn-inference", "--expect", "max-training=3")
    assert result.exit_code == 1
    assert result.stdout == (
        f"FAIL  {under_frozen}: 1 of 2 checks fail, 2 failures.\n"
        "\n"
        "bn-inference\n"
        "layer              expected   actual\n"
        "──────────────────────────────────────\n"
        "backbone/inner_bn  inference  training\n"
        "head_bn            inference  training\n"
    )


@pytest.mark.parametrize("columns", [80, 100])
def test_strict_failure_keeps_the_check_name_and_the_path_whole(under_frozen, columns):
    """The check name and the layer path each stay on one line, at 80 and at 100 columns."""
    result = CliRunner().invoke(
        cli,
        ["check", str(under_frozen), "--strict"],
        env={"COLUMNS": str(columns), "NO_COLOR": "1"},
        catch_exceptions=False,
    )
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert "strict: trainable-bn-under-frozen-container" in lines
    assert any(line.startswith("backbone/inner_bn  ") for line in lines)


def test_verbose_prints_every_check_on_success(guide):
    result = run(guide, "--expect", "bn-inference", "--expect", "trains=head", "-v")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == f"PASS  {guide}: all 2 checks hold."
    assert any(line.startswith("bn-inference") and "holds" in line for line in lines)
    assert any(line.startswith("trains=head") and "holds" in line for line in lines)


# ------------------------------------------------------------------------------- plans


def test_plan_passes_on_a_model_it_describes(guide):
    result = run(guide, "--plan", CONFIGS / "freeze-backbone.toml")
    assert (result.exit_code, result.stdout) == (0, "")


def test_plan_flags_fail_on_a_model_the_plan_would_change(guide):
    result = run(guide, "--plan", CONFIGS / "freeze-up-to.toml", "--json")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    failed = [c for c in document["checks"] if not c["passed"]]
    assert [c["check"] for c in failed] == ["plan flags"]
    first = document["failures"][0]
    assert first == {
        "check": "plan flags",
        "path": "mobilenetv2_0.35_32/block_13_expand",
        "expected": "trainable=True",
        "actual": "trainable=False",
    }
    assert len(document["failures"]) == 23  # blocks 13-16: leaves after block_12_add


def test_plan_set_changes_what_is_checked(guide):
    default = json.loads(run(guide, "--plan", CONFIGS / "freeze-up-to.toml", "--json").stdout)
    result = run(
        guide, "--plan", CONFIGS / "freeze-up-to.toml", "--set", "block=block_16_project", "--json"
    )
    # Frozen up to the backbone's last layer, head training: exactly the guide sample.
    assert result.exit_code == 0
    assert json.loads(result.stdout)["failures"] == []
    assert len(default["failures"]) == 23


def test_plan_expectations_fail_with_their_file_and_line(guide, tmp_path):
    plan = tmp_path / "p.toml"
    plan.write_text(
        '[[expect]]\nname = "BN must train"\nbn = "train"\n\n'
        "[[expect]]\nmax_depth = 0\ntrains = false\n"
    )
    result = run(guide, "--plan", plan, "--json")
    assert result.exit_code == 1
    checks = json.loads(result.stdout)["checks"]
    assert [
        (c["check"], c["source"], c["description"], c["passed"], c["failures"]) for c in checks
    ] == [
        ("bn-train", f"{plan}:1: expect 1", "BN must train", False, 51),
        ("frozen [max_depth=0]", f"{plan}:5: expect 2", None, False, 1),
    ]


# ------------------------------------------------------------------------------ strict


def test_strict_passes_on_a_model_without_traps(guide):
    assert (run(guide, "--strict").exit_code, run(guide, "--strict").stdout) == (0, "")


def test_strict_fails_on_a_trainable_bn_under_a_frozen_container(under_frozen):
    result = run(under_frozen, "--strict", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["failures"] == [
        {
            "check": "strict: trainable-bn-under-frozen-container",
            "path": "backbone/inner_bn",
            "expected": "frozen, like backbone",
            "actual": "trains in fit()",
        }
    ]


def test_strict_fails_when_call_site_training_false_is_relied_on(phase2):
    result = run(phase2, "--strict", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["failures"] == [
        {
            "check": "strict: call-site-training-ignored",
            "path": "mobilenetv2_0.35_32",
            "expected": "BN in inference by trainable=False",
            "actual": "training=False, ignored in fit()",
        }
    ]
    # Without --strict the same model passes an unrelated expectation: the trap is opt-in.
    assert run(phase2, "--expect", "min-training=1").exit_code == 0


def test_json_document_is_exact(under_frozen):
    result = run(under_frozen, "--expect", "bn-train", "--strict", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {
        "schema_version": 2,
        "command": "check",
        "model": {
            "path": str(under_frozen),
            "format": "keras",
            "keras_version": "3.15.1",
            "compiled": False,
            "optimizer_variables": None,
            "keras_hub": None,
        },
        "runtime": {
            "name": "keras3",
            "measured": False,
            "keras_version": None,
            "backend": None,
            "tensorflow_version": None,
        },
        "plan": None,
        "strict": True,
        "passed": False,
        "checks": [
            {
                "check": "bn-train",
                "source": "--expect",
                "description": None,
                "passed": True,
                "failures": 0,
            },
            {
                "check": "strict: call-site-training-ignored",
                "source": "--strict",
                "description": "no BN layer relies on a call-site training=False (Keras 3 "
                "overrides it in fit())",
                "passed": True,
                "failures": 0,
            },
            {
                "check": "strict: trainable-bn-under-frozen-container",
                "source": "--strict",
                "description": "no trainable BN layer sits under a frozen container (it trains "
                "anyway on Keras 3)",
                "passed": False,
                "failures": 1,
            },
        ],
        "failures": [
            {
                "check": "strict: trainable-bn-under-frozen-container",
                "path": "backbone/inner_bn",
                "expected": "frozen, like backbone",
                "actual": "trains in fit()",
            },
        ],
    }


def test_json_on_success_too(guide):
    result = run(guide, "--expect", "bn-inference", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["passed"] is True


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.keras", "--expect", "bn-inference"], "error: missing.keras: no such file."),
        (
            ["{guide}", "--expect", "bn-infernce"],
            "error: --expect 'bn-infernce': unknown expectation 'bn-infernce'.",
        ),
        (
            ["{guide}", "--expect", "min-training=x"],
            "error: --expect 'min-training=x': "
            "min-training needs a whole number, e.g. min-training=1.",
        ),
        (
            ["{guide}", "--expect", "trains=nothing*"],
            "error: --expect: 'nothing*' matches no layer path or name.",
        ),
        (
            ["{guide}", "--expect", "trains=pool"],
            "error: --expect trains=pool: the layers it "
            "names have no weights, so they neither train nor stay frozen.",
        ),
        (
            ["{guide}", "--expect", "bn-train=head"],
            "error: --expect bn-train=head: the layers "
            "it names include no BatchNormalization layer.",
        ),
        (["{guide}"], "error: give --plan PLAN, --expect NAME or --strict (or several)."),
        (
            ["{guide}", "--expect", "bn-inference", "--set", "a=b"],
            "error: --set sets parameters of a --plan. Try 'bnfreeze check --help'.",
        ),
        (["{guide}", "--plan", "missing.toml"], "error: missing.toml: no such plan file."),
        (
            ["{sequential}", "--plan", "{configs}/freeze-backbone.toml"],
            "error: {configs}/freeze-backbone.toml:23: rule 2: min_depth=1 matches no layer whose "
            "flag can be set.",
        ),
        (
            ["{guide}", "--plan", "{configs}/freeze-up-to.toml", "--set", "blok=x"],
            "error: --set blok=...: {configs}/freeze-up-to.toml has no parameter 'blok'",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(samples, guide, args, message):
    fmt = {"guide": guide, "sequential": samples / "sequential.keras", "configs": CONFIGS}
    result = run(*[a.format(**fmt) for a in args])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert message.format(**fmt) in result.stderr
    assert "Traceback" not in result.stderr


def test_malformed_plan_exits_2_naming_the_problem(guide, tmp_path):
    plan = tmp_path / "bad.toml"
    plan.write_text('[[rule]]\ntrainable = true\nbn = "inferense"\n')
    result = run(guide, "--plan", plan)
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {plan}:3: rule 1, key 'bn': 'inferense' is not one of \"inference\", "
        '"train", "follow", "frozen-stats".\n'
    )


# ----------------------------------------------------------------- library, vocabulary


def test_check_file_library_call(under_frozen):
    result = check_file(under_frozen, expectations=[parse_expectation("bn-train")], strict=True)
    assert not result.passed
    assert [o.name for o in result.outcomes if not o.passed] == [
        "strict: trainable-bn-under-frozen-container"
    ]
    plan = load_plan(CONFIGS / "freeze-backbone.toml")
    assert check_file(under_frozen, plan=plan).failures[0].path == "backbone/inner_bn"


def test_evaluate_on_measured_observations():
    """verify builds Observed values from measurement; the same evaluate() judges them."""
    from bnfreeze.model.records import LayerKind, LayerRecord

    records = (
        LayerRecord("bn", "bn", "BatchNormalization", LayerKind.BATCHNORM, 0, None, True),
        LayerRecord("d", "d", "Dense", LayerKind.LAYER, 0, None, True),
    )
    observed = {
        "bn": Observed("bn", True, trains_weights=True, normalizes_with=Normalization.BATCH),
        "d": Observed("d", False, trains_weights=False, normalizes_with=None),
    }
    assert evaluate(Expectation(ExpectKind.BN_TRAIN), records, observed) == ()
    assert [f.path for f in evaluate(Expectation(ExpectKind.BN_INFERENCE), records, observed)] == [
        "bn"
    ]
    assert [
        f.path for f in evaluate(Expectation(ExpectKind.TRAINS, GlobScope("d")), records, observed)
    ] == ["d"]
    assert evaluate(Expectation(ExpectKind.MIN_TRAINING, count=1), records, observed) == ()


def test_readme_check_example_is_current(monkeypatch):
    readme = (ROOT / "docs" / "commands" / "check.md").read_text(encoding="utf-8")
    start = readme.index("The third command above prints")
    block = readme[readme.index("```text\n", start) + len("```text\n") :]
    shown = block[: block.index("```")]
    monkeypatch.chdir(ROOT)
    result = run(
        "sample_models/bn_under_frozen.keras",
        "--expect",
        "bn-inference",
        "--expect",
        "min-training=1",
    )
    assert result.exit_code == 1
    assert shown == result.stdout
