"""The README and the docs pages are tested (in the spirit of sqlite-utils' tests/test_docs.py):

* the README's first two commands are exactly the setup commands CI runs, and it stays short;
* every CLI command appears in the README and has ``--help`` text with an example;
* every ``bnfreeze ...`` command in a ``bash`` block of the README or of a page in ``docs/``
  runs (exit 0, or 1 for a check that found a problem), a page's commands in order in one
  folder, and output piped into a JSON tool is JSON;
* every ``python`` block of the README and the pages runs; a block that should not run is
  fenced ``text``;
* the example outputs they show are what the commands print today (the README's tour shows
  excerpts: each line it shows is printed, in that order);
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
#: The README and every page of the docs site, by path relative to the root.
PAGES = {
    str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
    for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
}
DOCS = "\n".join(PAGES.values())
ENV = {
    "COLUMNS": "100",
    "NO_COLOR": "1",
    "FORCE_COLOR": None,
    "TTY_COMPATIBLE": None,
    "TTY_INTERACTIVE": None,
}

FIRST_COMMAND = "pip install -e . && bnfreeze inspect sample_models/guide_pattern.keras"
SECOND_COMMAND = "pip install -e '.[test]' && pytest"


def fenced_blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def shell_lines(text: str = README) -> list[str]:
    lines = []
    for block in fenced_blocks("bash", text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def bnfreeze_commands(text: str = README) -> list[tuple[list[str], str | None]]:
    """Each ``bnfreeze`` invocation in a bash block: its argv and the command it pipes into."""
    found = []
    for line in shell_lines(text):
        for segment in line.split("&&"):
            stages = [s.strip() for s in segment.split("|")]
            argv = shlex.split(stages[0], comments=True)
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


def test_the_readme_shows_commands():
    assert len(COMMANDS) >= 4
    assert (["inspect", "sample_models/guide_pattern.keras"], None) in COMMANDS


def test_the_readme_is_short():
    assert len(README.splitlines()) <= 250


#: Fence languages: ``bash`` and ``python`` blocks run (see below); the others are output,
#: documents or files shown (``text``, ``json``, ``toml``) and never run.
FENCES = {"bash", "python", "text", "json", "toml"}


@pytest.mark.parametrize("page", list(PAGES))
def test_every_block_says_whether_it_runs(page):
    inside = False
    for number, line in enumerate(PAGES[page].splitlines(), 1):
        if line.startswith("```"):
            if not inside:
                assert line[3:] in FENCES, f"{page}:{number}: fence {line!r}"
            inside = not inside
    assert not inside, f"{page}: a fence is not closed"


def test_no_second_numbering():
    """One numbering: the rules of docs/semantics.md. No page says "trap 3"."""
    for name, text in PAGES.items():
        assert not re.search(r"\btraps? \d", text, flags=re.I), name


#: Commands that load a model with Keras (the rest read and write files).
KERAS_COMMANDS = ("verify", "explain", "recalibrate")


def _needs_keras(argv: list[str]) -> bool:
    line = " ".join(argv).replace("--engine=", "--engine ")
    return (argv[0] if argv else "") in KERAS_COMMANDS or "--engine keras" in line


def _page_params():
    for name, text in PAGES.items():
        commands = bnfreeze_commands(text)
        if commands:
            keras = any(_needs_keras(argv) for argv, _ in commands)
            yield pytest.param(name, commands, id=name, marks=[pytest.mark.keras] if keras else [])


@pytest.mark.parametrize(("page", "commands"), list(_page_params()))
def test_page_commands_run(workdir, page, commands):
    """A page's bash commands, in order, in one folder (a later one may read an earlier one's
    output, as in the README's tour)."""
    for argv, pipe in commands:
        result = CliRunner().invoke(cli, argv, env=ENV, catch_exceptions=False)
        shown = f"{page}: bnfreeze {' '.join(argv)}"
        assert result.exit_code in (EXIT_OK, EXIT_CHECK_FAILED), f"{shown}\n{result.stderr}"
        assert "Traceback" not in result.stderr, shown
        if pipe is not None and ("jq" in pipe or "json.tool" in pipe):
            json.loads(result.stdout)


#: Blocks another test runs as written and checks more closely (one run, not two).
RUN_ELSEWHERE = {
    "docs/finetune.md#0": (
        "tests/support/finetune_cases.py",  # docs_case: printed == shown, no guard warning
        "tests/runtime/test_finetune.py::test_the_docs_example_runs_and_prints_what_the_page_shows",
    ),
}


def test_blocks_run_elsewhere_are_run_there():
    for block, (runner, test) in RUN_ELSEWHERE.items():
        page = block.split("#")[0]
        filename = page.rsplit("/", 1)[-1]
        assert page in PAGES and f'"{filename}"' in (ROOT / runner).read_text(), block
        path, name = test.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), test


def _python_params():
    for name, text in PAGES.items():
        for i, block in enumerate(fenced_blocks("python", text)):
            if f"{name}#{i}" in RUN_ELSEWHERE:
                continue
            keras = re.search(r"^import keras|^from keras|load_model\(|keras\.", block, re.M)
            yield pytest.param(
                name, block, id=f"{name}#{i}", marks=[pytest.mark.keras] if keras else []
            )


@pytest.mark.parametrize(("page", "code"), list(_python_params()))
def test_python_blocks_run(workdir, page, code):
    """Every python block runs as written (a block that should not is fenced ``text``), and
    leaves nothing behind in the current folder unless it says it writes a file."""
    import warnings

    before = set(workdir.iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, page, "exec"), {})
    if page == "README.md":
        assert set(workdir.iterdir()) == before


def test_readme_python_example_says_what_it_claims(workdir, capsys):
    code = fenced_blocks("python")[0]
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "51 BN layers run in inference mode in fit()"
    assert printed[1].startswith("1 flag changed: recompile-required")


TOUR_EDIT = ["sample_models/guide_pattern.keras", "--keep-bn-inference", "-o", "finetune.keras"]


def _shown_in_order(shown: str, printed: str) -> None:
    """Each line of an excerpt is a line of the output, in order; ``...`` skips lines."""
    lines = printed.splitlines()
    at = 0
    for line in shown.splitlines():
        if line == "...":
            continue
        assert line in lines[at:], f"not printed (in this order): {line!r}"
        at = lines.index(line, at) + 1


def test_readme_tour_output_is_current(workdir):
    env = {**ENV, "COLUMNS": "80"}
    tour = README[README.index("## A 60-second tour") : README.index("## The commands")]
    shown = fenced_blocks("text", tour)
    inspect = CliRunner().invoke(
        cli, ["inspect", "sample_models/guide_pattern.keras"], env=env, catch_exceptions=False
    )
    assert inspect.stderr == ""  # the first command warns about nothing
    _shown_in_order(shown[0], inspect.stdout)
    edit = CliRunner().invoke(
        cli,
        ["unfreeze", *TOUR_EDIT],
        env=env,
        catch_exceptions=False,
    )
    _shown_in_order(shown[1], edit.stdout + edit.stderr)
    for line in (edit.stdout + edit.stderr).splitlines():
        assert len(line) <= 80, line


@pytest.mark.keras
def test_readme_tour_verify_output_is_current(workdir):
    env = {**ENV, "COLUMNS": "80"}
    tour = README[README.index("## A 60-second tour") : README.index("## The commands")]
    shown = fenced_blocks("text", tour)
    CliRunner().invoke(cli, ["unfreeze", *TOUR_EDIT], env=env, catch_exceptions=False)
    result = CliRunner().invoke(
        cli,
        ["verify", "finetune.keras", "--expect", "bn-inference"],
        env=env,
        catch_exceptions=False,
    )
    assert result.exit_code == EXIT_OK
    _shown_in_order(shown[2], result.stdout)


def _example_after(marker: str, language: str) -> str:
    text = next(t for t in PAGES.values() if marker in t)
    start = text.index(marker)
    match = re.compile(rf"^```{language}\n(.*?)^```", flags=re.M | re.S).search(text, start)
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
    documented = set(re.findall(r"^\| `([^`]+)`", PAGES["docs/json.md"], flags=re.M))
    documented |= {f"layers[].{k}" for k in ("name", "class_name")}  # one row for both
    for key in _keys(json.loads(result.stdout)):
        if key.startswith("warnings[]."):
            assert f"`{key.split('.')[-1]}`" in PAGES["docs/json.md"]
            continue
        assert key in documented, f"JSON key {key!r} is not in docs/json.md's table"


@pytest.mark.parametrize("code", list(WarningCode), ids=lambda c: c.value)
def test_every_warning_code_is_documented(code):
    assert f"`{code.value}`" in PAGES["docs/json.md"]


@pytest.mark.parametrize("exit_code", [EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, 130])
def test_every_exit_code_is_documented(exit_code):
    section = README[README.index("## Exit codes") :]
    assert re.search(rf"^\| {exit_code} \|", section, flags=re.M)
