"""docs/bn-statistics.md is tested: its ``bnfreeze`` commands run in order (exit 0) in a
scratch copy of ``sample_models/``, piped JSON parses, and every Python block is marked
``<!-- not run: why -->`` (they need the reader's own model and data)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from bnfreeze.cli import cli

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "bn-statistics.md").read_text(encoding="utf-8")


def commands() -> list[list[str]]:
    found = []
    for block in re.findall(r"^```bash\n(.*?)^```", PAGE, flags=re.M | re.S):
        for line in block.splitlines():
            argv = shlex.split(line.strip())
            if argv and argv[0] == "bnfreeze":
                found.append(argv[1:])
    return found


def test_every_example_not_run_says_why():
    """The examples that need the reader's own model and data are fenced ``text`` (never run,
    see tests/test_docs.py) and say why they are not run."""
    blocks = re.findall(r"^(.*)\n```text\n", PAGE, flags=re.M)
    assert blocks
    assert all(re.fullmatch(r"<!-- not run: [^>]+ -->", b) for b in blocks), blocks


@pytest.mark.keras
def test_the_commands_run_in_order(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "sample_models", tmp_path / "sample_models")
    monkeypatch.chdir(tmp_path)
    found = commands()
    assert len(found) >= 4
    for argv in found:
        result = CliRunner().invoke(cli, argv, catch_exceptions=False)
        assert result.exit_code == 0, (argv, result.stderr)
        if "--json" in argv:
            json.loads(result.stdout)
    assert (tmp_path / "shareable.keras").exists() and (tmp_path / "recalibrated.keras").exists()
