"""``bnfreeze inspect``: exact output at a fixed width, the JSON contract, streams, exit codes.

Table and tree views are compared with golden files in ``tests/golden/inspect/`` (stdout and
stderr, rendered at COLUMNS=100 or 80 without colour). After an intended change to the output,
regenerate them and review the diff:

    BNFREEZE_REGEN_GOLDEN=1 pytest tests/cli/test_inspect.py

Without that variable, any difference fails the test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import golden_files
import json_schemas
import pytest
from click.testing import CliRunner
from paths import GOLDEN as GOLDEN_ROOT
from paths import ROOT

from bnfreeze import __version__
from bnfreeze.cli import cli

GOLDEN = GOLDEN_ROOT / "inspect"

#: A fixed terminal: 100 columns, no colour, whatever the developer's environment says.
ENV = {
    "COLUMNS": "100",
    "LINES": "50",
    "NO_COLOR": "1",
    "FORCE_COLOR": None,
    "TTY_COMPATIBLE": None,
    "TTY_INTERACTIVE": None,
    "TERM": "xterm-256color",
}

SAMPLES = [
    "seed_bn.keras",
    "guide_pattern.keras",
    "bn_under_frozen.keras",
    "sequential.keras",
    "nested_legacy.h5",
]


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    """Paths in the output are as typed: run from the repository root, with relative paths."""
    monkeypatch.chdir(ROOT)


def invoke(*args: str, columns: int = 100):
    runner = CliRunner()
    return runner.invoke(
        cli, list(args), env={**ENV, "COLUMNS": str(columns)}, catch_exceptions=False
    )


def check_golden(name: str, text: str) -> None:
    golden_files.check(GOLDEN, name, text)


VIEWS = [
    ("seed_bn.keras", ()),
    ("seed_bn.keras", ("--all",)),
    ("guide_pattern.keras", ()),
    ("guide_pattern.keras", ("--all",)),
    ("guide_pattern.keras", ("--tree",)),
    ("bn_under_frozen.keras", ()),
    ("bn_under_frozen.keras", ("--all",)),
    ("bn_under_frozen.keras", ("--tree",)),
    ("bn_under_frozen.keras", ("--all", "--tree")),
    ("sequential.keras", ()),
    ("sequential.keras", ("--all",)),
    ("nested_legacy.h5", ()),
    ("nested_legacy.h5", ("--tree",)),
]


def _golden_name(sample: str, flags: tuple[str, ...], columns: int) -> str:
    stem = sample.replace(".", "_")
    suffix = "".join(f"_{f.lstrip('-')}" for f in flags)
    return f"{stem}{suffix}_{columns}"


@pytest.mark.parametrize(("sample", "flags"), VIEWS, ids=lambda v: "".join(v) if v else "default")
def test_view_matches_golden(sample, flags):
    result = invoke("inspect", f"sample_models/{sample}", *flags)
    assert result.exit_code == 0
    name = _golden_name(sample, flags, 100)
    check_golden(f"{name}.stdout.txt", result.stdout)
    check_golden(f"{name}.stderr.txt", result.stderr)
    for line in result.stdout.splitlines():
        assert len(line) <= 100 and line == line.rstrip()
    assert "\x1b[" not in result.stdout  # no colour: not a terminal, and NO_COLOR is set


@pytest.mark.parametrize("columns", [80, 60])
def test_narrow_terminal_matches_golden(columns):
    """At 80 columns the guide sample's BN names still fit on one line each, with "BN" in
    the class column; at 60 the class column is hidden and the longest name cut from the
    left, never folded mid-word."""
    result = invoke("inspect", "sample_models/guide_pattern.keras", columns=columns)
    assert result.exit_code == 0
    check_golden(f"guide_pattern_keras_{columns}.stdout.txt", result.stdout)
    assert all(len(line) <= columns for line in result.stdout.splitlines())
    assert all(line == line.rstrip() for line in result.stdout.splitlines())
    if columns == 80:
        assert re.search(r"^  block_16_depthwise_BN +BN +False ", result.stdout, re.M)
        assert "BatchNormaliz" not in result.stdout
    else:
        assert "  …anded_conv_depthwise_BN  " in result.stdout


def test_colour_only_when_forced_on_a_terminal():
    """Rich colours the mode words on a terminal; FORCE_COLOR stands in for one here."""
    runner = CliRunner()
    env = {**ENV, "NO_COLOR": None, "FORCE_COLOR": "1"}
    result = runner.invoke(
        cli, ["inspect", "sample_models/sequential.keras"], env=env, catch_exceptions=False
    )
    assert "\x1b[" in result.stdout and "inference" in result.stdout
    env["NO_COLOR"] = "1"
    result = runner.invoke(
        cli, ["inspect", "sample_models/sequential.keras"], env=env, catch_exceptions=False
    )
    # NO_COLOR removes colour; bold and dim are not colours (https://no-color.org).
    assert "\x1b[3" not in result.stdout and "\x1b[9" not in result.stdout


# -- the JSON contract ------------------------------------------------------------------------

IN_FIT_KEYS = {"trains_weights", "normalizes_with", "updates_moving_stats"}
LAYER_KEYS = {
    "path",
    "name",
    "class_name",
    "depth",
    "trainable",
    "is_batchnorm",
    "source",
    "in_fit",
}


def inspect_json(sample: str) -> dict:
    result = invoke("inspect", "--json", f"sample_models/{sample}")
    assert result.exit_code == 0
    return json.loads(result.stdout)  # stdout is exactly one JSON document


def test_json_seed_sample_whole_document():
    """The seed's single BN layer (gamma 2, beta 1, mean 0, variance 1): every key, pinned."""
    assert inspect_json("seed_bn.keras") == {
        "schema_version": 2,
        "command": "inspect",
        "model": {
            "path": "sample_models/seed_bn.keras",
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
        "summary": {
            "layers": 2,
            "batchnorm": 1,
            "bn_training_in_fit": 1,
            "bn_inference_in_fit": 0,
            "bn_from_weights": 0,
        },
        "layers": [
            {
                "path": "image",
                "name": "image",
                "class_name": "InputLayer",
                "depth": 0,
                "trainable": None,
                "is_batchnorm": False,
                "source": "config",
                "in_fit": {
                    "trains_weights": None,
                    "normalizes_with": None,
                    "updates_moving_stats": None,
                },
            },
            {
                "path": "batch_normalization",
                "name": "batch_normalization",
                "class_name": "BatchNormalization",
                "depth": 0,
                "trainable": True,
                "is_batchnorm": True,
                "source": "config",
                "in_fit": {
                    "trains_weights": True,
                    "normalizes_with": "batch",
                    "updates_moving_stats": True,
                },
            },
        ],
        "warnings": [],
    }


@pytest.mark.parametrize("sample", SAMPLES)
def test_json_keys_are_the_contract(sample):
    doc = inspect_json(sample)
    assert set(doc) == {
        "schema_version",
        "command",
        "model",
        "runtime",
        "summary",
        "layers",
        "warnings",
    }
    assert doc["schema_version"] == 2 and doc["command"] == "inspect"
    assert doc["runtime"] == {
        "name": "keras3",
        "measured": False,
        "keras_version": None,
        "backend": None,
        "tensorflow_version": None,
    }
    json_schemas.validate("inspect", doc)
    assert set(doc["model"]) == {
        "path",
        "format",
        "keras_version",
        "compiled",
        "optimizer_variables",
        "keras_hub",
    }
    assert set(doc["summary"]) == {
        "layers",
        "batchnorm",
        "bn_training_in_fit",
        "bn_inference_in_fit",
        "bn_from_weights",
    }
    for layer in doc["layers"]:
        assert set(layer) == LAYER_KEYS
        assert set(layer["in_fit"]) == IN_FIT_KEYS
        assert layer["in_fit"]["normalizes_with"] in ("batch", "moving", None)
        if not layer["is_batchnorm"]:  # not BN: BN-only fields are null
            assert layer["in_fit"]["normalizes_with"] is None
            assert layer["in_fit"]["updates_moving_stats"] is None
    for warning in doc["warnings"]:
        assert set(warning) == {"code", "path", "message"}
    summary = doc["summary"]
    assert summary["layers"] == len(doc["layers"])
    assert summary["batchnorm"] == sum(layer["is_batchnorm"] for layer in doc["layers"])
    assert summary["bn_training_in_fit"] + summary["bn_inference_in_fit"] == summary["batchnorm"]


def test_json_guide_pattern():
    doc = inspect_json("guide_pattern.keras")
    assert doc["model"] == {
        "path": "sample_models/guide_pattern.keras",
        "format": "keras",
        "keras_version": "3.15.1",
        "compiled": True,
        "optimizer_variables": 6,
        "keras_hub": None,
    }
    assert doc["summary"] == {
        "layers": 155,
        "batchnorm": 51,
        "bn_training_in_fit": 0,
        "bn_inference_in_fit": 51,
        "bn_from_weights": 0,
    }
    by_path = {layer["path"]: layer for layer in doc["layers"]}
    assert by_path["mobilenetv2_0.35_32"] == {
        "path": "mobilenetv2_0.35_32",
        "name": "mobilenetv2_0.35_32",
        "class_name": "Functional",
        "depth": 0,
        "trainable": False,
        "is_batchnorm": False,
        "source": "config",
        "in_fit": {"trains_weights": None, "normalizes_with": None, "updates_moving_stats": None},
    }
    assert by_path["mobilenetv2_0.35_32/block_1_expand_BN"] == {
        "path": "mobilenetv2_0.35_32/block_1_expand_BN",
        "name": "block_1_expand_BN",
        "class_name": "BatchNormalization",
        "depth": 1,
        "trainable": False,
        "is_batchnorm": True,
        "source": "config",
        "in_fit": {
            "trains_weights": False,
            "normalizes_with": "moving",
            "updates_moving_stats": False,
        },
    }
    assert by_path["mobilenetv2_0.35_32/Conv1"]["in_fit"] == {
        "trains_weights": False,
        "normalizes_with": None,
        "updates_moving_stats": None,
    }
    assert by_path["head"]["in_fit"] == {
        "trains_weights": True,
        "normalizes_with": None,
        "updates_moving_stats": None,
    }
    assert by_path["pool"]["in_fit"]["trains_weights"] is None  # no weights: not applicable
    # The saved optimizer variables are a fact of the summary, not a warning.
    assert doc["warnings"] == []
    assert (doc["model"]["compiled"], doc["model"]["optimizer_variables"]) == (True, 6)


def test_json_bn_under_frozen_warnings():
    doc = inspect_json("bn_under_frozen.keras")
    assert doc["summary"] == {
        "layers": 7,
        "batchnorm": 2,
        "bn_training_in_fit": 2,
        "bn_inference_in_fit": 0,
        "bn_from_weights": 0,
    }
    assert [(w["code"], w["path"]) for w in doc["warnings"]] == [
        ("trainable-bn-under-frozen-container", "backbone/inner_bn"),
    ]  # both BN layers train, which fills their untrained statistics: no warning for that


def test_json_legacy_h5_nested():
    doc = inspect_json("nested_legacy.h5")
    assert doc["model"] == {
        "path": "sample_models/nested_legacy.h5",
        "format": "h5",
        "keras_version": "3.15.1",
        "compiled": True,
        "optimizer_variables": 22,
        "keras_hub": None,
    }
    paths = [
        (layer["path"], layer["depth"], layer["in_fit"]["normalizes_with"])
        for layer in doc["layers"]
        if layer["is_batchnorm"]
    ]
    assert paths == [
        ("bn_bn/bn1", 1, "batch"),
        ("bn_bn/bn2", 1, "batch"),
        ("bn_dense/bn3", 1, "batch"),
    ]


def test_json_sequential_flags():
    doc = inspect_json("sequential.keras")
    assert [
        (layer["path"], layer["trainable"], layer["in_fit"]["normalizes_with"])
        for layer in doc["layers"]
    ] == [
        ("x", None, None),
        ("dense_1", True, None),
        ("bn_1", True, "batch"),
        ("relu_1", True, None),
        ("dense_2", True, None),
        ("bn_2", False, "moving"),
        ("out", True, None),
    ]


@pytest.mark.parametrize("sample", SAMPLES)
def test_json_stdout_is_pure_json_and_warnings_go_to_stderr(sample):
    result = invoke("inspect", "--json", f"sample_models/{sample}")
    doc = json.loads(result.stdout)
    assert "warning:" not in result.stdout
    warned = bool(doc["warnings"])
    assert result.stderr.startswith("warning: ") == warned
    assert (result.stderr == "") == (not warned)


def test_table_view_warnings_only_on_stderr():
    result = invoke("inspect", "sample_models/bn_under_frozen.keras")
    assert "warning" not in result.stdout
    assert result.stderr.count("warning: ") == 1
    assert "backbone/inner_bn is trainable inside frozen container backbone" in " ".join(
        result.stderr.split()
    )


# -- exit codes and errors --------------------------------------------------------------------


def test_missing_file_exit_2_one_line_no_traceback():
    result = invoke("inspect", "sample_models/nope.keras")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == "error: sample_models/nope.keras: no such file. Check the path.\n"


def test_not_a_model_exit_2(tmp_path):
    bad = tmp_path / "notes.keras"
    bad.write_text("just text\n")
    result = invoke("inspect", str(bad))
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["inspect"], ["inspect", "--bogus", "x.keras"], ["nope"]])
def test_usage_errors_exit_2(args):
    result = invoke(*args)
    assert result.exit_code == 2
    assert result.stdout == "" and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: ") and "--help'." in result.stderr


def test_success_exit_0_even_with_warnings():
    result = invoke("inspect", "sample_models/bn_under_frozen.keras")
    assert result.exit_code == 0 and result.stderr


def test_help_has_examples():
    result = invoke("inspect", "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.stdout and "bnfreeze inspect model.keras --json" in result.stdout


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout == f"bnfreeze, version {__version__}\n"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR",)}
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**env, "COLUMNS": "100", "NO_COLOR": "1"},
        timeout=120,
    )


def test_python_dash_m_help():
    result = _run("-m", "bnfreeze", "--help")
    assert result.returncode == 0 and "inspect" in result.stdout and result.stderr == ""


def test_python_dash_m_json_pipes_into_json_loads():
    """A real process: stdout is one JSON document even when warnings are printed."""
    result = _run("-m", "bnfreeze", "inspect", "--json", "sample_models/bn_under_frozen.keras")
    assert result.returncode == 0
    assert json.loads(result.stdout)["summary"]["batchnorm"] == 2
    assert result.stderr.startswith("warning: ")


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("inspect", "sample_models/guide_pattern.keras"), 0),
        (("check", "sample_models/guide_pattern.keras", "--expect", "bn-train"), 1),
        (("inspect", "no/such/model.keras"), 2),
        (("inspect", "--no-such-option"), 2),
    ],
)
def test_the_process_exits_with_the_command_s_code_and_all_its_output(args, code):
    """The console script ends the process without the interpreter's teardown
    (cli.entry_point): the exit code and every line written must still come through."""
    result = _run("-m", "bnfreeze", *args)
    assert result.returncode == code, result.stderr
    last = result.stdout.rstrip().splitlines()[-1] if result.stdout.strip() else ""
    if code == 0:
        assert last.endswith("leaves them unchanged")  # the legend, the last line
    elif code == 1:
        assert "block_16_project_BN" in last  # the last failing layer, the last line
    else:
        assert result.stderr.startswith("error:")


def test_inspect_json_imports_stay_lean():
    """inspect --json on a .keras file imports neither numpy, h5py, Rich, Keras nor TF."""
    code = (
        "import sys\n"
        "from bnfreeze.cli import main\n"
        "sys.argv = ['bnfreeze', 'inspect', '--json', 'sample_models/guide_pattern.keras']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('numpy', 'h5py', 'rich', 'keras', 'tensorflow')\n"
        "         if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    result = _run("-c", code)
    assert "HEAVY []" in result.stderr, result.stderr[-500:]


def test_custom_objects_needs_keras_and_is_refused_with_from_file(samples):
    """inspect advises --custom-objects when Keras cannot rebuild a custom class, so it takes
    it; with --from-file, which never loads the model, it is a usage error."""
    model = str(samples / "seed_bn.keras")
    result = CliRunner().invoke(cli, ["inspect", model, "--from-file", "--custom-objects", "x.py"])
    assert result.exit_code == 2
    assert "drop --from-file" in result.stderr


@pytest.mark.keras
def test_custom_objects_let_keras_list_a_subclassed_model(subclassed_keras, custom_layers_file):
    args = ["inspect", str(subclassed_keras), "--json", "--custom-objects", str(custom_layers_file)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    bn = [layer for layer in document["layers"] if layer["is_batchnorm"]]
    assert bn and all(layer["source"] == "keras" for layer in bn), bn
