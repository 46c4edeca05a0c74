"""The docs site builds: ``mkdocs build --strict`` (every link and page resolves, the Python API
is read from the docstrings, the CLI reference from the Click commands) without importing
Keras, and the generated CLI reference names every command and every option."""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from bnfreeze.cli import cli

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocs_click")
pytest.importorskip("mkdocstrings")

#: Build the site in a fresh interpreter, then say which heavy modules the build imported.
BUILD = """
import json, sys
from mkdocs.commands.build import build
from mkdocs.config import load_config
config = load_config(config_file=sys.argv[1], site_dir=sys.argv[2], strict=True)
build(config)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("keras", "tensorflow", "jax"))
print(json.dumps(heavy))
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", BUILD, str(ROOT / "mkdocs.yml"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads(done.stdout.splitlines()[-1])


def test_mkdocs_build_strict_passes_without_keras(site):
    out, heavy = site
    assert (out / "index.html").is_file()
    assert heavy == []


def _tree(group: click.Group = cli, prefix: tuple[str, ...] = ()):
    if not prefix:
        yield (), group
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from _tree(command, (*prefix, name))


def test_cli_reference_names_every_command_and_option(site):
    out, _ = site
    page = html.unescape((out / "cli" / "index.html").read_text(encoding="utf-8"))
    for path, command in _tree():
        assert f"bnfreeze {' '.join(path)}".strip() in page, path
        for param in command.params:
            if isinstance(param, click.Option):
                for opt in param.opts:
                    assert opt in page, (path, opt)


def test_api_reference_is_generated(site):
    out, _ = site
    page = html.unescape((out / "python-api" / "index.html").read_text(encoding="utf-8"))
    for name in ("bnfreeze.api.inspect", "bnfreeze.api.freeze", "EditResult", "Report"):
        assert name in page, name
