"""The one place errors become exit codes: bad input is 2, a bug is 3, never a traceback."""

import pytest
from click.testing import CliRunner

from bnfreeze.cli import cli
from bnfreeze.ops import inspect as inspection


def _boom(*args, **kwargs):
    raise ZeroDivisionError("division by zero")


def test_unexpected_exception_is_one_line_and_exit_3(samples, monkeypatch):
    monkeypatch.setattr(inspection, "inspect_file", _boom)
    monkeypatch.delenv("BNFREEZE_DEBUG", raising=False)
    result = CliRunner().invoke(cli, ["inspect", str(samples / "seed_bn.keras")])
    assert result.exit_code == 3
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: internal error (ZeroDivisionError: division by zero).")
    assert "BNFREEZE_DEBUG=1" in lines[0]
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(samples, monkeypatch):
    monkeypatch.setattr(inspection, "inspect_file", _boom)
    monkeypatch.setenv("BNFREEZE_DEBUG", "1")
    result = CliRunner().invoke(cli, ["inspect", str(samples / "seed_bn.keras")])
    assert result.exit_code == 1
    assert isinstance(result.exception, ZeroDivisionError)


def test_bad_input_is_exit_2(tmp_path):
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "missing.keras")])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ")


# -- usage errors: one line, as the README's "Exit codes" section says -------------------------

USAGE_ERRORS = [
    (["inspect"], "error: missing argument 'MODEL'. Try 'bnfreeze inspect --help'."),
    (
        ["inspect", "--bogus", "x.keras"],
        "error: no such option '--bogus'. Try 'bnfreeze inspect --help'.",
    ),
    (["--bogus"], "error: no such option '--bogus'. Try 'bnfreeze --help'."),
    (["nope"], "error: no such command 'nope'. Try 'bnfreeze --help'."),
    (
        ["verify", "m.keras", "--steps", "0"],
        "error: invalid value for '--steps': 0 is not in the range x>=1. "
        "Try 'bnfreeze verify --help'.",
    ),
    (
        ["freeze", "m.keras", "--engine", "torch"],
        "error: invalid value for '--engine': 'torch' is not one of 'auto', 'config', 'keras'. "
        "Try 'bnfreeze freeze --help'.",
    ),
    (
        ["freeze", "m.keras"],
        "error: -o OUT is required unless --dry-run or --in-place is given. "
        "Try 'bnfreeze freeze --help'.",
    ),
    (
        ["check", "m.keras"],
        "error: give --plan PLAN, --expect NAME or --strict (or several). "
        "Try 'bnfreeze check --help'.",
    ),
]


@pytest.mark.parametrize(("args", "line"), USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_error_is_one_line_exit_2(args, line):
    """Click's own display is three lines (usage, hint, error); bnfreeze prints one."""
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == line + "\n"


def test_usage_error_in_a_real_process_is_one_line():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "bnfreeze", "diff", "only-one.keras"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr == "error: missing argument 'B'. Try 'bnfreeze diff --help'.\n"


def test_bare_command_still_prints_the_help():
    result = CliRunner().invoke(cli, [])
    assert result.exit_code == 2
    assert "Commands:" in result.output
