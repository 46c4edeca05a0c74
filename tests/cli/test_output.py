"""Output rules shared by every command: tables readable at 80 and 100 columns and when piped
(a layer path breaks before a "/" or is cut from the left, never mid-word; "BN" in a narrow
class column; no trailing spaces), ``-q/--quiet``, the dry-run line said once, and one
``model`` object and one ``runtime`` object in every JSON document, each document valid
against the JSON Schema bnfreeze ships.

Views are compared with golden files in ``tests/golden/output/`` (regenerate with
``BNFREEZE_REGEN_GOLDEN=1 pytest tests/cli/test_output.py``, then review the diff). No test
here imports Keras: ``verify``'s view is rendered from a measurement built in the test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import golden_files
import json_schemas
import pytest
from click.testing import CliRunner
from paths import GOLDEN as GOLDEN_ROOT
from paths import ROOT

from bnfreeze.cli import cli

GOLDEN = GOLDEN_ROOT / "output"
CONFIGS = ROOT / "bnfreeze" / "recipes"  # copied to ./configs: plan paths print as typed
ENV = {
    "COLUMNS": "100",
    "LINES": "50",
    "NO_COLOR": "1",
    "FORCE_COLOR": None,
    "TTY_COMPATIBLE": None,
    "TTY_INTERACTIVE": None,
}
WIDTHS = [80, 100]


@pytest.fixture()
def work(samples, tmp_path, monkeypatch) -> Path:
    """Copies of the samples and the plans in the current folder: paths print as typed."""
    for sample in samples.iterdir():
        if sample.suffix in (".keras", ".h5"):
            shutil.copy(sample, tmp_path / sample.name)
    shutil.copytree(CONFIGS, tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def invoke(*args: str, columns: int = 100) -> Any:
    return CliRunner().invoke(
        cli, list(args), env={**ENV, "COLUMNS": str(columns)}, catch_exceptions=False
    )


def guide_bn_names() -> set[str]:
    from bnfreeze.ops.inspect import inspect_file

    report = inspect_file(ROOT / "sample_models" / "guide_pattern.keras")
    return {s.layer.name for s in report.batchnorm}


def assert_readable(text: str, columns: int) -> None:
    """Within the width, no trailing space, and every BN layer name of the guide sample (the
    long MobileNetV2 ones, "..._BN") whole, or cut from the left with an ellipsis: never a
    fragment folded onto the next line ("e_BN"), so ``grep`` finds each name."""
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= columns
    assert [line for line in lines if line != line.rstrip()] == []
    names = guide_bn_names()
    for token in re.findall(r"[\w./…-]*_BN\b", text):
        last = token.split("/")[-1]
        if last.startswith("…"):
            assert any(n.endswith(last[1:]) for n in names), token
        else:
            assert last in names, token


def freeze_copy(work: Path) -> str:
    out = "phase2.keras"
    result = invoke("unfreeze", "guide_pattern.keras", "--from", "block_16_expand", "-o", out, "-q")
    assert result.exit_code == 0 and result.stderr == ""
    return out


# --------------------------------------------------------------------------- goldens

COMMANDS = {
    "inspect_guide": ("inspect", "guide_pattern.keras"),
    "inspect_guide_strip": ("inspect", "guide_pattern.keras", "--strip"),
    "unfreeze_guide": (
        "unfreeze",
        "guide_pattern.keras",
        "--keep-bn-inference",
        "--from",
        "block_15_expand",
        "--dry-run",
    ),
    "freeze_guide_layers": (
        "freeze",
        "guide_pattern.keras",
        "--layers",
        "mobilenetv2_0.35_32/expanded_conv_*",
        "--dry-run",
    ),
    "apply_guide_up_to": (
        "apply",
        "guide_pattern.keras",
        "--plan",
        "configs/freeze-up-to.toml",
        "--set",
        "block=block_15_add",
        "--dry-run",
    ),
    "check_guide_bn_train": (
        "check",
        "guide_pattern.keras",
        "--expect",
        "bn-train",
        "--expect",
        "frozen=mobilenetv2_0.35_32/expanded_conv_depthwise",
        "-v",
    ),
}


@pytest.mark.parametrize("columns", WIDTHS)
@pytest.mark.parametrize("name", list(COMMANDS))
def test_view_matches_golden(work, name, columns):
    result = invoke(*COMMANDS[name], columns=columns)
    assert result.exit_code in (0, 1), result.stderr
    golden_files.check(GOLDEN, f"{name}_{columns}.stdout.txt", result.stdout)
    assert_readable(result.stdout, columns)


@pytest.mark.parametrize("columns", WIDTHS)
def test_diff_view_matches_golden(work, columns):
    b = freeze_copy(work)
    result = invoke("diff", "guide_pattern.keras", b, columns=columns)
    assert result.exit_code == 0
    golden_files.check(GOLDEN, f"diff_guide_{columns}.stdout.txt", result.stdout)
    assert_readable(result.stdout, columns)


def guide_verify_report(disagree: bool = True) -> Any:
    """A verify report for the guide sample without Keras: every BN layer measured as
    inspect predicts it (unchanged), one convolution trained with a zero update, and, with
    ``disagree``, the longest-named BN layer measured moving."""
    from bnfreeze.model.expectations import parse_expectation
    from bnfreeze.model.measured import (
        CompileSource,
        DataSource,
        LayerMeasurement,
        Movement,
        RuntimeInfo,
        TrainingSetup,
    )
    from bnfreeze.model.records import Runtime
    from bnfreeze.ops.inspect import inspect_file
    from bnfreeze.runtime.compare import compare

    prediction = inspect_file("guide_pattern.keras")
    measured = []
    for state in prediction.layers:
        layer = state.layer
        if layer.is_batchnorm:
            moved = disagree and layer.name == "expanded_conv_depthwise_BN"
            stats = Movement.MOVED if moved else Movement.UNCHANGED
            measured.append(
                LayerMeasurement(
                    layer.path, layer.class_name, True, True, True, stats, Movement.UNCHANGED,
                    Movement.NONE,
                )
            )  # fmt: skip
        elif state.in_fit.trains_weights is not None:
            other = Movement.ZERO_UPDATE if state.in_fit.trains_weights else Movement.UNCHANGED
            measured.append(
                LayerMeasurement(
                    layer.path, layer.class_name, False, True, True, Movement.NONE,
                    Movement.NONE, other,
                )
            )  # fmt: skip
    setup = TrainingSetup(
        compile_source=CompileSource.MODEL,
        optimizer="Adam(learning_rate=0.001)",
        loss="mse",
        steps=1,
        batch_size=2,
        data_source=DataSource.SYNTHETIC,
        data_path=None,
        seed=0,
        input_shapes=((2, 32, 32, 3),),
    )
    return compare(
        path="guide_pattern.keras",
        runtime=RuntimeInfo(Runtime.KERAS3, "3.15.1", "tensorflow", "2.21.0"),
        setup=setup,
        measured=measured,
        prediction=prediction,
        expectations=[parse_expectation("bn-inference")],
    )


def render(renderable: Any, columns: int) -> str:
    from rich.console import Console

    with open(os.devnull, "w") as sink:
        console = Console(width=columns, record=True, color_system=None, file=sink)
        console.print(renderable)
    return console.export_text()


@pytest.mark.parametrize("columns", WIDTHS)
@pytest.mark.parametrize("all_layers", [False, True], ids=["bn", "all"])
def test_verify_view_matches_golden(work, columns, all_layers):
    from bnfreeze.render.verify import verify_view

    text = render(verify_view(guide_verify_report(), all_layers=all_layers), columns)
    kind = "all" if all_layers else "bn"
    golden_files.check(GOLDEN, f"verify_guide_{kind}_{columns}.txt", text)
    assert_readable(text, columns)
    assert "DISAGREE" in text


def test_a_path_breaks_before_a_slash_then_is_cut_from_the_left():
    from rich.text import Text

    from bnfreeze.render.columns import break_path

    def lines(path: str, width: int) -> list[str]:
        return [t.plain for t in break_path(Text(path), width)]

    path = "mobilenetv2_0.35_32/expanded_conv_depthwise_BN"
    assert lines(path, 60) == [path]
    assert lines(path, 30) == ["mobilenetv2_0.35_32", "  /expanded_conv_depthwise_BN"]
    assert lines(path, 20) == ["mobilenetv2_0.35_32", "  …conv_depthwise_BN"]
    # An indented name (the inspect table) keeps its indentation.
    assert lines("  expanded_conv_depthwise_BN", 16) == ["  …_depthwise_BN"]
    assert lines("a/b/c/d/e", 5) == ["a/b/c", "/d/e"]  # too narrow to indent


def test_every_table_at_80_columns_when_piped(work):
    """Piped (not a terminal) with no COLUMNS, Rich draws 80 columns: every view fits."""
    b = freeze_copy(work)
    env = {k: v for k, v in ENV.items() if k != "COLUMNS"}
    for args in [*COMMANDS.values(), ("diff", "guide_pattern.keras", b)]:
        result = CliRunner().invoke(cli, list(args), env={**env, "COLUMNS": None})
        assert result.exit_code in (0, 1), args
        assert_readable(result.stdout, 80)


# --------------------------------------------------------------------------- -q, dry run


QUIET = [
    ("inspect", "bn_under_frozen.keras"),
    ("inspect", "bn_under_frozen.keras", "--json"),
    ("freeze", "bn_under_frozen.keras", "-o", "out.keras"),
    ("unfreeze", "guide_pattern.keras", "--keep-bn-inference", "--dry-run"),
    ("apply", "bn_under_frozen.keras", "--plan", "configs/freeze-backbone.toml", "--dry-run"),
    ("check", "bn_under_frozen.keras", "--expect", "bn-inference", "-v"),
    ("diff", "guide_pattern.keras", "bn_under_frozen.keras", "--export", "diff.html"),
    ("inspect", "bn_under_frozen.keras", "--strip", "--export", "strip.svg"),
]


@pytest.mark.parametrize("args", QUIET, ids=[" ".join(a[:3]) for a in QUIET])
def test_quiet_silences_stderr_only(work, args):
    loud = invoke(*args)
    assert loud.stderr  # warnings, the status line or "saved ..."
    exported = args[args.index("--export") + 1] if "--export" in args else None
    for path in ("out.keras", exported):
        if path:
            Path(path).unlink(missing_ok=True)
    quiet = invoke(*args, "-q")
    assert quiet.stderr == ""
    assert quiet.exit_code == loud.exit_code
    assert quiet.stdout == loud.stdout
    if exported:
        assert Path(exported).exists()


def test_quiet_keeps_errors(work):
    result = invoke("inspect", "missing.keras", "-q")
    assert result.exit_code == 2
    assert result.stderr == "error: missing.keras: no such file. Check the path.\n"
    result = invoke("freeze", "guide_pattern.keras", "-q")
    assert result.exit_code == 2 and result.stderr.startswith("error: -o OUT is required")


@pytest.mark.parametrize(
    "command", ["inspect", "freeze", "unfreeze", "apply", "check", "diff", "verify", "explain"]
)
def test_every_command_documents_quiet(command):
    result = invoke(command, "--help")
    assert "-q, --quiet" in result.stdout
    assert "Print nothing on stderr but errors" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("freeze", "seed_bn.keras", "--bn-inference", "--dry-run"),
        ("unfreeze", "guide_pattern.keras", "--dry-run", "-o", "never.keras"),
        ("apply", "bn_under_frozen.keras", "--plan", "configs/freeze-backbone.toml", "--dry-run"),
    ],
)
def test_dry_run_says_so_once(work, args):
    result = invoke(*args)
    assert result.exit_code == 0
    both = (result.stdout + result.stderr).lower()
    assert both.count("nothing was written") == 1
    assert result.stderr.startswith("dry run: nothing was written.\n")
    assert "would change" in result.stdout
    assert not Path("never.keras").exists()


# --------------------------------------------------------------------------- JSON

MODEL_KEYS = {"path", "format", "keras_version", "compiled", "optimizer_variables", "keras_hub"}
RUNTIME_KEYS = {"name", "measured", "keras_version", "backend", "tensorflow_version"}
PREDICTED = {
    "name": "keras3",
    "measured": False,
    "keras_version": None,
    "backend": None,
    "tensorflow_version": None,
}

JSON_COMMANDS = [
    ("inspect", "guide_pattern.keras"),
    ("inspect", "nested_legacy.h5"),
    ("freeze", "seed_bn.keras", "--bn-inference", "-o", "out.keras"),
    ("unfreeze", "guide_pattern.keras", "--keep-bn-inference", "--dry-run"),
    ("apply", "guide_pattern.keras", "--plan", "configs/keras-guide-finetune.toml", "--dry-run"),
    ("check", "bn_under_frozen.keras", "--strict", "--plan", "configs/freeze-backbone.toml"),
    ("check", "guide_pattern.keras", "--expect", "bn-inference"),
    ("diff", "guide_pattern.keras", "bn_under_frozen.keras"),
]


@pytest.mark.parametrize("args", JSON_COMMANDS, ids=[" ".join(a[:3]) for a in JSON_COMMANDS])
def test_json_is_valid_against_its_schema(work, args):
    result = invoke(*args, "--json")
    assert result.exit_code in (0, 1), result.stderr
    document = json.loads(result.stdout)
    json_schemas.validate(args[0], document)
    assert document["schema_version"] == 2
    assert document["runtime"] == PREDICTED
    models = [document["a"], document["b"]] if args[0] == "diff" else [document["model"]]
    for model in models:
        assert set(model) == MODEL_KEYS and isinstance(model["path"], str)
    if "report" in document:  # freeze, unfreeze, apply: the result, as inspect shows it
        json_schemas.validate("inspect", document["report"])
        assert document["model"] == document["report"]["model"]


def test_verify_json_is_valid_against_its_schema(work):
    from bnfreeze.render.verify import verify_dict

    document = json.loads(json.dumps(verify_dict(guide_verify_report())))
    json_schemas.validate("verify", document)
    assert document["model"] == {
        "path": "guide_pattern.keras",
        "format": "keras",
        "keras_version": "3.15.1",
        "compiled": True,
        "optimizer_variables": 6,
        "keras_hub": None,
    }
    assert document["runtime"] == {
        "name": "keras3",
        "measured": True,
        "keras_version": "3.15.1",
        "backend": "tensorflow",
        "tensorflow_version": "2.21.0",
    }


def test_a_schema_rejects_a_v1_document(work):
    """The schemas pin what version 2 changed: a string ``model`` or ``runtime`` fails."""
    import jsonschema

    document = json.loads(invoke("check", "guide_pattern.keras", "--strict", "--json").stdout)
    for key, old in (("model", "guide_pattern.keras"), ("runtime", "keras3")):
        with pytest.raises(jsonschema.ValidationError):
            json_schemas.validate("check", {**document, key: old})
    with pytest.raises(jsonschema.ValidationError):
        json_schemas.validate("check", {**document, "schema_version": 1})


def test_every_schema_is_shipped_as_package_data():
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["bnfreeze"]
    assert "schemas/*.schema.json" in patterns
    shipped = {p.name for p in json_schemas.SCHEMAS.glob("*.schema.json")}
    assert shipped == {f"{name}.schema.json" for name in set(json_schemas.SCHEMA_OF.values())}
    for name in json_schemas.SCHEMA_OF.values():
        schema = json_schemas.validator(name).schema
        assert schema["properties"]["schema_version"] == {"const": 2}


def test_schema_enums_match_the_code():
    """Each closed set in the schemas is the Enum's values (a new member needs the schema)."""
    from bnfreeze.model.measured import Movement
    from bnfreeze.model.records import Normalization, Runtime
    from bnfreeze.ops.diff import LayerStatus

    def schema(name: str) -> dict:
        return json_schemas.validator(name).schema

    runtime = schema("inspect")["properties"]["runtime"]["properties"]["name"]["enum"]
    assert runtime == [r.value for r in Runtime]
    layer = schema("inspect")["properties"]["layers"]["items"]["properties"]
    assert layer["in_fit"]["properties"]["normalizes_with"]["enum"] == [
        *(n.value for n in Normalization),
        None,
    ]
    row = schema("diff")["properties"]["layers"]["items"]["properties"]
    assert row["status"]["enum"] == [s.value for s in LayerStatus]
    measured = schema("verify")["properties"]["layers"]["items"]["properties"]
    assert measured["moving_stats"]["enum"] == [m.value for m in Movement]
