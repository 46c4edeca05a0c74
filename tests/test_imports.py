"""Heavy imports are lazy: importing bnfreeze, reading a model and ``inspect`` never import
TensorFlow or Keras (nor another Keras backend). Each check runs in a fresh interpreter and
looks at ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
SAMPLE_FILES = sorted(str(p) for p in SAMPLES.iterdir() if p.suffix in (".keras", ".h5"))

HEAVY = ("tensorflow", "keras", "tf_keras", "jax", "torch")


def imported_after(code: str) -> set[str]:
    """Run ``code`` in a fresh interpreter; return the top-level names of what it imported."""
    probe = textwrap.dedent(code) + textwrap.dedent(
        """
        import json as _json, sys as _sys
        _sys.__stdout__.write("\\nMODULES=" + _json.dumps(sorted(_sys.modules)) + "\\n")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("MODULES="))
    return {name.split(".")[0] for name in json.loads(line.removeprefix("MODULES="))}


def heavy(modules: set[str]) -> set[str]:
    return modules & set(HEAVY)


def test_import_bnfreeze_is_lean():
    modules = imported_after("import bnfreeze, bnfreeze.model.records, bnfreeze.errors")
    assert heavy(modules) == set()
    # Not even the libraries that only some commands need.
    assert modules.isdisjoint({"numpy", "h5py", "rich", "click"})


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: Path(p).name)
def test_read_model_and_inspect_file_do_not_import_keras(path):
    modules = imported_after(
        f"""
        from bnfreeze.formats.readers import read_model
        from bnfreeze.ops.inspect import inspect_file
        assert read_model({path!r}).config
        assert inspect_file({path!r}).layers
        """
    )
    assert heavy(modules) == set()


@pytest.mark.parametrize("args", [["--json"], [], ["--all"], ["--tree"]], ids=str)
def test_cli_inspect_does_not_import_keras(args):
    path = str(SAMPLES / "guide_pattern.keras")
    modules = imported_after(
        f"""
        from bnfreeze.cli import cli
        try:
            cli.main(["inspect", {path!r}, *{args!r}], prog_name="bnfreeze")
        except SystemExit as exit:
            assert exit.code in (0, None), exit.code
        """
    )
    assert heavy(modules) == set()


def test_the_probe_would_see_keras():
    """The checks above can fail: a Keras module in sys.modules shows up in the probe (faked
    here; a real ``import keras`` costs seconds)."""
    modules = imported_after("import sys, types; sys.modules['keras.src'] = types.ModuleType('k')")
    assert heavy(modules) == {"keras"}
