"""Types: mypy is clean on ``bnfreeze/`` (configured in pyproject.toml), and a type checker
sees the real signatures of the lazily loaded top-level API (the ``TYPE_CHECKING`` imports in
``bnfreeze/__init__.py``), so a wrong call is an error rather than ``Any``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("mypy")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mypy cache for the module: the snippet's check reuses the package's analysis."""
    return tmp_path_factory.mktemp("mypy_cache")


def mypy(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = str(ROOT / "pyproject.toml")
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", config, "--cache-dir", str(cache), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


def test_mypy_is_clean_on_the_package(cache):
    done = mypy(cache)  # the files and settings come from [tool.mypy]
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("Success: no issues found")


SNIPPET = """\
import warnings

import bnfreeze

bnfreeze.freeze(123, bn_inference="yes")
bnfreeze.unfreeze("model.keras", keep_bn_inference=1.5)
bnfreeze.inspect(["model.keras"])
report = bnfreeze.inspect("model.keras")
count: int = report.bn_inference_in_fit
result = bnfreeze.freeze("model.keras", bn_inference=True, dry_run=True)
changed: int = len(result.changes)
warnings.simplefilter("error", bnfreeze.RecompileWarning)
reveal_type(bnfreeze.freeze)
"""


def test_the_top_level_api_is_typed(tmp_path, cache):
    snippet = tmp_path / "use_bnfreeze.py"
    snippet.write_text(SNIPPET, encoding="utf-8")
    done = mypy(cache, str(snippet))
    errors: dict[int, str] = {}
    for m in re.finditer(r"^.*use_bnfreeze\.py:(\d+): error: (.*)$", done.stdout, re.M):
        errors[int(m.group(1))] = errors.get(int(m.group(1)), "") + m.group(2) + "\n"
    assert set(errors) == {5, 6, 7}, done.stdout
    assert 'Argument 1 to "freeze" has incompatible type "int"' in errors[5]
    assert '"bn_inference" to "freeze" has incompatible type "str"; expected "bool"' in errors[5]
    assert '"keep_bn_inference" to "unfreeze" has incompatible type "float"' in errors[6]
    assert 'Argument 1 to "inspect" has incompatible type "list[str]"' in errors[7]
    revealed = re.search(r"use_bnfreeze\.py:13: note: Revealed type is \"(.*)\"", done.stdout)
    assert revealed and "bn_inference: bool =" in revealed.group(1), done.stdout
    assert "EditResult" in revealed.group(1)
