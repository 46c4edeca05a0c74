"""The one place errors become exit codes: bad input is 2, a bug is 3, never a traceback."""

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
