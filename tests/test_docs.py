"""The README is tested (in the spirit of sqlite-utils' tests/test_docs.py):

* its first two commands are exactly the setup commands CI runs;
* every CLI command appears in it and has ``--help`` text with an example;
* every ``bnfreeze ...`` command in its ``bash`` blocks runs (exit 0, or 1 for a check that
  found a problem), and output piped into a JSON tool is JSON;
* the example outputs it shows are what the commands print today;
* every key of the JSON contract, every warning code and every exit code is documented.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from bnfreeze.cli import cli
from bnfreeze.errors import EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE
from bnfreeze.model.records import WarningCode

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
ENV = {
    "COLUMNS": "100",
    "NO_COLOR": "1",
    "FORCE_COLOR": None,
    "TTY_COMPATIBLE": None,
    "TTY_INTERACTIVE": None,
}

FIRST_COMMAND = "pip install -e . && bnfreeze inspect sample_models/guide_pattern.keras"
SECOND_COMMAND = "pip install -e '.[test]' && pytest"


def fenced_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.M | re.S)


def shell_lines() -> list[str]:
    lines = []
    for block in fenced_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def bnfreeze_commands() -> list[tuple[list[str], str | None]]:
    """Each ``bnfreeze`` invocation in a bash block: its argv and the command it pipes into."""
    found = []
    for line in shell_lines():
        for segment in line.split("&&"):
            stages = [s.strip() for s in segment.split("|")]
            argv = shlex.split(stages[0])
            if argv and argv[0] == "bnfreeze":
                found.append((argv[1:], stages[1] if len(stages) > 1 else None))
    return found


def all_commands(group: click.Group = cli, prefix: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        path = (*prefix, name)
        yield path, command
        if isinstance(command, click.Group):
            yield from all_commands(command, path)


def test_first_two_commands_are_the_setup_commands():
    """The README's first two fenced commands do all the setup; .ci/run runs the second."""
    blocks = fenced_blocks("bash")
    assert blocks[0].strip() == FIRST_COMMAND
    assert blocks[1].strip() == SECOND_COMMAND
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert SECOND_COMMAND in ci.splitlines()


@pytest.mark.parametrize("path", [p for p, _ in all_commands()], ids=" ".join)
def test_every_command_is_documented_with_an_example(path):
    shown = [argv[: len(path)] for argv, _ in bnfreeze_commands()]
    assert list(path) in shown, f"no `bnfreeze {' '.join(path)} ...` in a README bash block"
    result = CliRunner().invoke(cli, [*path, "--help"], env=ENV, catch_exceptions=False)
    assert result.exit_code == 0
    assert re.search(r"^\s*Examples?:", result.stdout, flags=re.M), result.stdout
    assert f"bnfreeze {' '.join(path)}" in result.stdout


def test_top_level_help_has_an_example():
    result = CliRunner().invoke(cli, ["--help"], env=ENV, catch_exceptions=False)
    assert result.exit_code == 0 and "Example" in result.stdout


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A scratch copy of what the README's commands refer to, so they can write files."""
    for folder in ("sample_models",):
        if (ROOT / folder).is_dir():
            shutil.copytree(
                ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__")
            )
    monkeypatch.chdir(tmp_path)
    return tmp_path


COMMANDS = bnfreeze_commands()
#: Commands that load a model with Keras and train it (the rest read and write files).
KERAS_COMMANDS = ("verify", "explain")


def needs_keras(argv: list[str]) -> bool:
    line = " ".join(argv).replace("--engine=", "--engine ")
    return (argv[0] if argv else "") in KERAS_COMMANDS or "--engine keras" in line


def test_the_readme_shows_commands():
    assert len(COMMANDS) >= 4
    assert (["inspect", "sample_models/guide_pattern.keras"], None) in COMMANDS


@pytest.mark.parametrize(
    ("argv", "pipe"),
    [
        pytest.param(argv, pipe, marks=[pytest.mark.keras] if needs_keras(argv) else [])
        for argv, pipe in COMMANDS
    ],
    ids=[" ".join(a) for a, _ in COMMANDS],
)
def test_readme_commands_run(workdir, argv, pipe):
    result = CliRunner().invoke(cli, argv, env=ENV, catch_exceptions=False)
    assert result.exit_code in (EXIT_OK, EXIT_CHECK_FAILED), result.stderr
    assert "Traceback" not in result.stderr
    if pipe is not None and ("jq" in pipe or "json.tool" in pipe):
        json.loads(result.stdout)


def _example_after(marker: str, language: str) -> str:
    start = README.index(marker)
    match = re.compile(rf"^```{language}\n(.*?)^```", flags=re.M | re.S).search(README, start)
    assert match, f"no {language} block after {marker!r}"
    return match.group(1)


def test_inspect_example_output_is_current(monkeypatch):
    monkeypatch.chdir(ROOT)
    shown = _example_after("The first command above prints", "text")
    result = CliRunner().invoke(
        cli, ["inspect", "sample_models/bn_under_frozen.keras"], env=ENV, catch_exceptions=False
    )
    assert shown == result.stdout + result.stderr


def test_json_example_is_current(monkeypatch):
    monkeypatch.chdir(ROOT)
    shown = _example_after("For `sample_models/seed_bn.keras`:", "json")
    result = CliRunner().invoke(
        cli, ["inspect", "--json", "sample_models/seed_bn.keras"], env=ENV, catch_exceptions=False
    )
    assert shown == result.stdout


def _keys(document: dict, prefix: str = "") -> set[str]:
    """Dotted names of the leaves and lists of a JSON document (``layers[].in_fit.x``)."""
    keys = set()
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            keys |= _keys(value, name + ".")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            keys.add(name + "[]")
            keys |= _keys(value[0], name + "[].")
        else:
            keys.add(name)
    return keys


def test_every_json_key_is_documented(monkeypatch):
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(
        cli,
        ["inspect", "--json", "sample_models/bn_under_frozen.keras"],
        env=ENV,
        catch_exceptions=False,
    )
    documented = set(re.findall(r"^\| `([^`]+)`", README, flags=re.M))
    documented |= {f"layers[].{k}" for k in ("name", "class_name")}  # one row for both
    for key in _keys(json.loads(result.stdout)):
        if key.startswith("warnings[]."):
            assert f"`{key.split('.')[-1]}`" in README
            continue
        assert key in documented, f"JSON key {key!r} is not in the README's table"


@pytest.mark.parametrize("code", list(WarningCode), ids=lambda c: c.value)
def test_every_warning_code_is_documented(code):
    assert f"`{code.value}`" in README


@pytest.mark.parametrize("exit_code", [EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, 130])
def test_every_exit_code_is_documented(exit_code):
    section = README[README.index("## Exit codes") :]
    assert re.search(rf"^\| {exit_code} \|", section, flags=re.M)
