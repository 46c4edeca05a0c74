"""``bnfreeze freeze`` / ``unfreeze`` end to end: exit codes, full output, the JSON contract,
and the issue's acceptance recipes measured with a real Keras training step.

Views are compared with golden files in ``tests/golden/freeze/`` (regenerate with
``BNFREEZE_REGEN_GOLDEN=1 pytest tests/cli/test_freeze.py``, then review the diff).
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import golden_files
import json_schemas
import pytest
import unprivileged
from click.testing import CliRunner
from paths import GOLDEN as GOLDEN_ROOT

from bnfreeze.cli import cli

GOLDEN = GOLDEN_ROOT / "freeze"

ENV = {
    "COLUMNS": "100",
    "LINES": "50",
    "NO_COLOR": "1",
    "FORCE_COLOR": None,
    "TTY_COMPATIBLE": None,
    "TTY_INTERACTIVE": None,
    "TERM": "xterm-256color",
}

RECOMPILE = (
    "{n} trainable flag(s) changed. Load {out} with keras.models.load_model and call compile() "
    "again with a NEW optimizer before fit(): a model already compiled or trained in memory "
    "ignores flag changes until it is recompiled, and reusing its built optimizer fails with "
    "'Unknown variable' (bnfreeze explain, rule 4)."
)


@pytest.fixture()
def work(samples, tmp_path, monkeypatch) -> Path:
    """A folder holding copies of the samples, as the current directory: paths in the output
    are as typed."""
    for sample in samples.iterdir():
        if sample.suffix in (".keras", ".h5"):
            shutil.copy(sample, tmp_path / sample.name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), env=ENV, catch_exceptions=False)


def check_golden(name: str, text: str) -> None:
    golden_files.check(GOLDEN, name, text)


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- help ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["freeze", "unfreeze"])
def test_help_has_examples(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.stdout
    assert f"bnfreeze {command} model.keras" in result.stdout
    for option in (
        "--layers",
        "--dry-run",
        "--in-place",
        "--json",
        "--optimizer-state",
        "--engine",
        "-o, --output",
    ):
        assert option in result.stdout
    assert ("--up-to" if command == "freeze" else "--from") in result.stdout


# --- views ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("seed_bn_bn_inference", ("freeze", "seed_bn.keras", "--bn-inference", "-o", "out.keras")),
        (
            "bn_under_frozen_unfreeze_backbone_dry_run",
            ("unfreeze", "bn_under_frozen.keras", "--layers", "backbone", "--dry-run"),
        ),
        ("sequential_train_bn", ("freeze", "sequential.keras", "--train-bn", "-o", "out.keras")),
        (
            "guide_keep_bn_inference",
            (
                "unfreeze",
                "guide_pattern.keras",
                "--keep-bn-inference",
                "--from",
                "block_16_expand",
                "-o",
                "out.keras",
            ),
        ),
    ],
)
def test_view_matches_golden(work, name, args):
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr
    check_golden(f"{name}.stdout.txt", result.stdout)
    check_golden(f"{name}.stderr.txt", result.stderr)


def test_no_change(work):
    result = invoke("freeze", "guide_pattern.keras", "--bn-inference", "-o", "out.keras")
    assert result.exit_code == 0
    assert "No flag changed: the 51 selected layer(s) already had these flags." in result.stdout
    assert result.stderr.startswith("wrote out.keras (1.6 MB; input 1.6 MB).\n")
    assert "trainable flag(s) changed" not in result.stderr
    assert (work / "out.keras").read_bytes() == (work / "guide_pattern.keras").read_bytes()


# --- JSON ----------------------------------------------------------------------------------


RUNTIME_PREDICTED = {
    "name": "keras3",
    "measured": False,
    "keras_version": None,
    "backend": None,
    "tensorflow_version": None,
}
OUT_MODEL = {
    "path": "out.keras",
    "format": "keras",
    "keras_version": "3.15.1",
    "compiled": False,
    "optimizer_variables": None,
    "keras_hub": None,
}


def test_json_whole_document(work):
    result = invoke("freeze", "seed_bn.keras", "--bn-inference", "-o", "out.keras", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {
        "schema_version": 2,
        "command": "freeze",
        "model": OUT_MODEL,
        "runtime": RUNTIME_PREDICTED,
        "input": "seed_bn.keras",
        "output": "out.keras",
        "dry_run": False,
        "changes": [{"path": "batch_normalization", "before": True, "after": False}],
        "report": {
            "schema_version": 2,
            "command": "inspect",
            "model": OUT_MODEL,
            "runtime": RUNTIME_PREDICTED,
            "summary": {
                "layers": 2,
                "batchnorm": 1,
                "bn_training_in_fit": 0,
                "bn_inference_in_fit": 1,
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
                    "trainable": False,
                    "is_batchnorm": True,
                    "source": "config",
                    "in_fit": {
                        "trains_weights": False,
                        "normalizes_with": "moving",
                        "updates_moving_stats": False,
                    },
                },
            ],
            "warnings": [],
        },
        "warnings": [
            {
                "code": "recompile-required",
                "path": None,
                "message": RECOMPILE.format(n=1, out="out.keras"),
            },
        ],
    }
    # The report is exactly inspect's JSON of the written file.
    inspected = json.loads(invoke("inspect", "out.keras", "--json").stdout)
    assert json.loads(result.stdout)["report"] == inspected
    json_schemas.validate("freeze", json.loads(result.stdout))
    assert result.stderr.startswith("wrote out.keras (14471 bytes; input 14470 bytes).\n")


def test_json_dry_run_with_optimizer_state(work):
    before = files(work)
    result = invoke("unfreeze", "guide_pattern.keras", "--keep-bn-inference", "--dry-run", "--json")
    assert result.exit_code == 0
    assert files(work) == before
    doc = json.loads(result.stdout)
    json_schemas.validate("unfreeze", doc)
    assert set(doc) == {
        "schema_version",
        "command",
        "model",
        "runtime",
        "input",
        "output",
        "dry_run",
        "changes",
        "report",
        "warnings",
    }
    assert (doc["input"], doc["output"], doc["dry_run"]) == ("guide_pattern.keras", None, True)
    assert doc["model"] == doc["report"]["model"]
    assert len(doc["changes"]) == 100
    assert doc["changes"][0] == {"path": "mobilenetv2_0.35_32", "before": False, "after": True}
    assert all(c["after"] is True for c in doc["changes"])  # BN layers were already False
    assert doc["report"]["summary"]["bn_training_in_fit"] == 0
    assert doc["report"]["model"]["path"] == "guide_pattern.keras"
    assert [w["code"] for w in doc["warnings"]] == ["recompile-required", "optimizer-state"]
    assert doc["warnings"][1]["message"].startswith(
        "The 6 saved optimizer variables would be remapped to the new trainable variables (108 "
        "now): 4 slots kept by variable, 0 of variables that stop training left out, 102 "
        "zero-filled"
    )
    assert result.stderr.startswith("dry run: nothing was written.\n")


# --- bad input: exit 2, one clear line, nothing left behind ---------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("freeze", "guide_pattern.keras", "--bn-inference", "--train-bn", "-o", "out.keras"),
            "error: --bn-inference and --train-bn contradict each other; pick one. "
            "Try 'bnfreeze freeze --help'.",
        ),
        (
            ("freeze", "guide_pattern.keras"),
            "error: -o OUT is required unless --dry-run or --in-place is given.",
        ),
        (
            ("freeze", "guide_pattern.keras", "-o", "guide_pattern.keras"),
            "error: -o guide_pattern.keras is the input file; refusing to overwrite it. Pass "
            "--in-place to rewrite the input itself, or pick another -o.",
        ),
        (
            ("freeze", "guide_pattern.keras", "-o", "./guide_pattern.keras"),
            "error: -o ./guide_pattern.keras is the input file; refusing to overwrite it.",
        ),
        (
            ("freeze", "guide_pattern.keras", "-o", "missing/out.keras"),
            "error: missing/out.keras: the folder missing does not exist. Create it first, or "
            "pick another -o.",
        ),
        (
            ("freeze", "guide_pattern.keras", "--up-to", "block_99_add", "-o", "out.keras"),
            "error: no layer named 'block_99_add' in the model. Did you mean",
        ),
        (
            ("unfreeze", "guide_pattern.keras", "--from", "nope", "-o", "out.keras"),
            "error: no layer named 'nope' in the model.",
        ),
        (
            ("freeze", "guide_pattern.keras", "--layers", "nothing*", "-o", "out.keras"),
            "error: --layers 'nothing*' matches no layer path or name. Run bnfreeze inspect --all "
            "to list layer paths.",
        ),
        (
            (
                "freeze",
                "guide_pattern.keras",
                "--layers",
                "head",
                "--up-to",
                "Conv1",
                "-o",
                "out.keras",
            ),
            "error: the selection matches no layer whose flag can be set.",
        ),
        (
            ("freeze", "missing.keras", "-o", "out.keras"),
            "error: missing.keras: no such file. Check the path.",
        ),
        (
            ("freeze", "not_a_model.keras", "-o", "out.keras"),
            "error: not_a_model.keras: not a Keras model file",
        ),
        (
            ("freeze", "truncated.keras", "-o", "out.keras"),
            "error: truncated.keras: a damaged or truncated zip archive",
        ),
        (
            ("freeze", "guide_pattern.keras", "-o", "out.h5"),
            "error: -o out.h5: a keras model must be saved under a name ending in .keras",
        ),
        (
            ("freeze", "guide_pattern.keras", "--in-place", "-o", "other.keras"),
            "error: --in-place rewrites guide_pattern.keras itself, but -o names other.keras.",
        ),
        (
            ("freeze", "guide_pattern.keras", "--engine", "turbo", "-o", "out.keras"),
            "error: invalid value for '--engine'",
        ),
    ],
)
def test_bad_input(work, args, message):
    (work / "not_a_model.keras").write_text("hello")
    (work / "truncated.keras").write_bytes((work / "seed_bn.keras").read_bytes()[:5000])
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    after = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    assert after == before  # no output, no temporary file, the input untouched


def test_unwritable_folder(work, monkeypatch):
    """Root ignores permission bits, so the refusal is simulated where the file is created."""
    import tempfile

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    (work / "ro").mkdir()
    result = invoke("freeze", "guide_pattern.keras", "-o", "ro/out.keras")
    assert result.exit_code == 2
    assert result.stderr == (
        "error: ro/out.keras: cannot create a file in ro (permission denied).\n"
    )
    assert files(work / "ro") == []


def test_read_only_folder(samples, monkeypatch):
    """As user ``nobody``: root ignores permission bits, and CI runs as root."""
    with unprivileged.open_folder() as folder:
        monkeypatch.chdir(folder)
        shutil.copy(samples / "guide_pattern.keras", "guide_pattern.keras")
        Path("ro").mkdir()
        Path("ro").chmod(0o555)
        args = ["freeze", "guide_pattern.keras", "-o", "ro/out.keras"]
        assert invoke(*args[:-1], "warm-up.keras").exit_code == 0  # imports, as root
        Path("warm-up.keras").unlink()
        exit_code, stdout, stderr = unprivileged.as_nobody(args, env=ENV)
        assert (exit_code, stdout) == (2, "")
        assert stderr == (
            "error: ro/out.keras: the folder ro is not writable (permission denied). "
            "Pick another -o.\n"
        )
        assert files(folder / "ro") == []
        monkeypatch.chdir("/")


# --- writing ---------------------------------------------------------------------------------


def test_dry_run_writes_nothing(work):
    before = {p.name: p.read_bytes() for p in work.iterdir()}
    result = invoke("freeze", "sequential.keras", "--dry-run", "-o", "out.keras")
    assert result.exit_code == 0
    assert "would change" in result.stdout
    # Said once, on stderr: stdout is the data.
    assert "nothing was written" not in result.stdout.lower()
    assert result.stderr.lower().count("nothing was written") == 1
    assert {p.name: p.read_bytes() for p in work.iterdir()} == before


def test_in_place(work):
    result = invoke("freeze", "sequential.keras", "--bn-inference", "--in-place")
    assert result.exit_code == 0
    assert result.stderr.startswith("wrote sequential.keras (")
    doc = json.loads(invoke("inspect", "sequential.keras", "--json").stdout)
    assert doc["summary"]["bn_inference_in_fit"] == 2
    assert not [p for p in work.iterdir() if p.name.startswith(".")]


def test_keep_optimizer_state_weights_byte_identical(work):
    keep = ["--optimizer-state", "keep"]
    result = invoke(
        "unfreeze",
        "guide_pattern.keras",
        "--keep-bn-inference",
        *keep,
        "-o",
        "out.keras",
    )
    assert result.exit_code == 0
    stderr = " ".join(result.stderr.split())
    assert "were kept as they are (--optimizer-state keep)" in stderr
    # 6 saved, 108 built for the new trainable set: Keras will skip them, and says so.
    assert "Keras builds 108 for the new trainable set" in stderr
    with zipfile.ZipFile(work / "guide_pattern.keras") as a, zipfile.ZipFile("out.keras") as b:
        assert a.read("model.weights.h5") == b.read("model.weights.h5")
        assert a.read("metadata.json") == b.read("metadata.json")


# --- Acceptance: the recipes, measured with a real training step ---------------------------


def _measure(path: Path) -> tuple[dict[str, Any], dict[str, bool]]:
    """Load ``path``, compile with a NEW optimizer (fresh SGD), fit one step; return what moved
    per layer and, per Conv2D/DepthwiseConv2D layer, whether its kernel moved."""
    import warnings

    import keras
    import numpy as np
    from keras_truth import layer_paths, measure_fit_step

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Skipping variable loading for optimizer": expected
        model = keras.models.load_model(path)
    convs = {
        p: layer
        for p, layer in layer_paths(model).items()
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))
    }
    kernels = {p: np.array(layer.kernel.numpy(), copy=True) for p, layer in convs.items()}
    moved = measure_fit_step(model)
    kernel_moved = {
        p: not np.array_equal(kernels[p], layer.kernel.numpy()) for p, layer in convs.items()
    }
    return moved, kernel_moved


@pytest.mark.keras
def test_acceptance_guide_recipe_keep_bn_inference(guide_phase2_trained_keras, tmp_path):
    """Phase 2 of the Keras guide, fixed with bnfreeze: zero BN statistics and zero gamma/beta
    move; every conv kernel trains."""
    out = tmp_path / "finetune.keras"
    result = CliRunner().invoke(
        cli,
        ["unfreeze", str(guide_phase2_trained_keras), "--keep-bn-inference", "-o", str(out)],
        env=ENV,
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.stderr
    assert "saved optimizer variables were remapped" in result.stderr
    moved, kernel_moved = _measure(out)
    bn = {p: m for p, m in moved.items() if m.is_batchnorm}
    assert len(bn) == 52
    assert [p for p, m in bn.items() if m.moving_stats] == []
    assert [p for p, m in bn.items() if m.gamma_beta] == []
    assert len(kernel_moved) == 52
    assert [p for p, k in kernel_moved.items() if not k] == []
    assert moved["head"].other_weights is True


@pytest.mark.keras
def test_acceptance_train_bn(guide_phase2_trained_keras, tmp_path):
    """fastai's train_bn: BN gamma/beta and statistics move, nothing else does."""
    out = tmp_path / "train_bn.keras"
    result = CliRunner().invoke(
        cli,
        ["freeze", str(guide_phase2_trained_keras), "--train-bn", "-o", str(out)],
        env=ENV,
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.stderr
    # Issue 11 item 8: no warning against the recipe just applied. The backbone is called
    # with training=False and is now frozen around its 52 trainable BN layers: exactly what
    # --train-bn asks for, so neither trap warning (nor one line per BN layer) is printed.
    assert "meant to protect" not in result.stderr
    assert "--bn-inference" not in result.stderr.replace("(--bn-inference) turns", "")
    assert "is trainable inside frozen container" not in result.stderr
    assert result.stderr.count("warning:") <= 3, result.stderr
    moved, kernel_moved = _measure(out)
    bn = {p: m for p, m in moved.items() if m.is_batchnorm}
    assert len(bn) == 52
    assert all(m.moving_stats and m.gamma_beta for m in bn.values())
    assert [p for p, m in moved.items() if not m.is_batchnorm and m.other_weights] == []
    assert not any(kernel_moved.values())


@pytest.mark.keras
def test_acceptance_weights_identical_but_the_dropped_optimizer(
    guide_phase2_trained_keras, tmp_path
):
    """Every weight dataset is bit-identical; only the optimizer's are gone (--optimizer-state
    drop; their bytes stay in the file, unreferenced)."""
    import io

    import h5py

    out = tmp_path / "finetune.keras"
    result = CliRunner().invoke(
        cli,
        [
            "unfreeze",
            str(guide_phase2_trained_keras),
            "--keep-bn-inference",
            "--optimizer-state",
            "drop",
            "-o",
            str(out),
            "--json",
        ],
        env=ENV,
        catch_exceptions=False,
    )
    assert result.exit_code == 0

    def datasets(path: Path) -> dict[str, bytes]:
        with zipfile.ZipFile(path) as archive:
            data = io.BytesIO(archive.read("model.weights.h5"))
        found: dict[str, bytes] = {}
        with h5py.File(data, "r") as h5:
            h5.visititems(
                lambda name, obj: (
                    found.__setitem__(name, obj[()].tobytes())
                    if isinstance(obj, h5py.Dataset)
                    else None
                )
            )
        return found

    before, after = datasets(guide_phase2_trained_keras), datasets(out)
    optimizer = {k for k in before if k.startswith("optimizer/")}
    assert len(optimizer) > 100  # Adam: iterations, learning rate, two slots per variable
    assert after == {k: v for k, v in before.items() if k not in optimizer}
    assert out.stat().st_size < guide_phase2_trained_keras.stat().st_size + 65536
