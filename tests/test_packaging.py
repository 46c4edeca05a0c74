"""Packaging: what ``pip install .`` and the extras install, what the wheel contains, and
what the commands do when Keras (or its backend) is not installed.

No venv is built here (too slow for the suite): the lean install is simulated by running
the real command in a subprocess in which the heavy packages cannot be imported (their
``sys.modules`` entries are ``None``, which is what ``import`` and
``importlib.util.find_spec`` see for a package that is not installed... closely enough:
``import`` raises ``ModuleNotFoundError`` and ``find_spec`` returns ``None``). The README
quotes a real fresh-venv measurement.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
SAMPLES = ROOT / "sample_models"

#: Runs the bnfreeze CLI with some top-level packages made unimportable.
HIDE = """
import sys
for name in sys.argv[1].split(","):
    if name:
        sys.modules[name] = None
sys.argv = ["bnfreeze", *sys.argv[2:]]
from bnfreeze.cli import entry_point
entry_point()
"""
KERAS_AND_BACKENDS = "keras,tensorflow,tf_keras,jax,jaxlib,torch,keras_hub"


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def run_hidden(hidden: str, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT):
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "COLUMNS": "100", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    return subprocess.run(
        [sys.executable, "-c", HIDE, hidden, *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=600,
    )


# -------------------------------------------------------------------------- dependency sets


#: What ``pip install .`` installs: what inspect/freeze/apply/check/diff need, no Keras. The
#: ``fast`` extra adds isal, a faster CRC-32 for the copy check (docs/guarantees.md).
CORE = {"click", "rich", "numpy", "h5py"}


def test_core_dependencies_are_the_file_libraries():
    """``pip install .`` installs what inspect/freeze/apply/check/diff need, no Keras."""
    assert requirement_names(PROJECT["dependencies"]) == CORE


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        ("tensorflow", {"keras", "tensorflow"}),
        ("jax", {"keras", "jax"}),
        ("torch", {"keras", "torch"}),
        ("keras", {"keras"}),
        ("fast", {"isal"}),
    ],
)
def test_runtime_extras(extra, names):
    assert requirement_names(PROJECT["optional-dependencies"][extra]) == names


def test_the_test_extra_installs_everything_the_suite_needs():
    """The README's second command (``pip install -e '.[test]' && pytest``, run verbatim by
    .ci/run) must work on a fresh machine: both measured backends, Keras 2, the tools."""
    test = requirement_names(PROJECT["optional-dependencies"]["test"])
    needed = {"pytest", "hypothesis", "ruff", "mypy", "cairosvg", "keras", "tensorflow", "jax"}
    needed |= {"tf_keras", "keras-hub", "setuptools"}
    assert needed <= test, needed - test
    assert "torch" not in test  # measured when installed, skipped otherwise: the wheel is GBs


def test_metadata():
    assert PROJECT["license"] == "Apache-2.0"
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    assert {"Homepage", "Source", "Issues", "Changelog"} <= set(PROJECT["urls"])
    assert "Typing :: Typed" in PROJECT["classifiers"]
    assert any(c.startswith("Programming Language :: Python :: 3.") for c in PROJECT["classifiers"])
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    from bnfreeze import __version__

    assert __version__ == PROJECT["version"]
    assert re.search(rf"^## \[?{re.escape(__version__)}\]?", changelog, flags=re.M)


# -------------------------------------------------------------------------- the wheel


PIP_WHEEL = (sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source tree (a build writes build/ and egg-info next
    to pyproject.toml; the checkout stays clean)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "bnfreeze", src / "bnfreeze", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [*PIP_WHEEL, "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (built,) = out.glob("bnfreeze-*.whl")
    return built


def test_the_wheel_ships_the_plans_license_and_types(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(p.name for p in (ROOT / "bnfreeze" / "recipes").glob("*.toml"))
    assert len(shipped) >= 4
    for name in shipped:
        assert f"bnfreeze/recipes/{name}" in names
    assert "bnfreeze/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Provides-Extra: jax" in text and "Provides-Extra: tensorflow" in text
    assert "Requires-Dist: keras" in text and 'extra == "jax"' in text
    core = [
        line
        for line in text.splitlines()
        if line.startswith("Requires-Dist:") and "extra" not in line
    ]
    assert requirement_names([line.split(":", 1)[1].strip() for line in core]) == CORE


def test_the_installed_wheel_applies_a_shipped_plan_by_name(wheel, tmp_path):
    """Unpacked outside the checkout, the package finds its plans by name."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "100"}
    code = "from bnfreeze.cli import entry_point; entry_point()"

    def bnfreeze(*args):
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )

    listed = bnfreeze("plans")
    assert listed.returncode == 0, listed.stderr
    assert "keras-guide-finetune\n    Unfreeze every layer" in listed.stdout
    applied = bnfreeze(
        "apply",
        str(SAMPLES / "guide_pattern.keras"),
        "--plan",
        "keras-guide-finetune",
        "--json",
        "--dry-run",
    )
    assert applied.returncode == 0, applied.stderr
    plan = json.loads(applied.stdout)["plan"]
    assert plan["name"] == "keras-guide-finetune"
    assert (
        Path(plan["path"]).resolve() == site / "bnfreeze" / "recipes" / "keras-guide-finetune.toml"
    )


# -------------------------------------------------------------------------- without Keras


def test_file_commands_work_without_keras_or_any_backend(tmp_path):
    """The lean install: inspect, freeze, unfreeze, apply, check, diff and plans need only
    click, rich, numpy and h5py."""
    guide = str(SAMPLES / "guide_pattern.keras")
    seq = str(SAMPLES / "sequential.keras")
    commands = [
        ["inspect", guide],
        ["inspect", "--json", seq],
        ["freeze", seq, "--bn-inference", "-o", str(tmp_path / "f.keras")],
        ["unfreeze", guide, "--keep-bn-inference", "-o", str(tmp_path / "u.keras")],
        ["apply", guide, "--plan", "freeze-backbone", "--dry-run"],
        ["check", guide, "--expect", "bn-inference"],
        ["diff", guide, str(tmp_path / "u.keras")],
        ["plans"],
    ]
    for args in commands:
        done = run_hidden(KERAS_AND_BACKENDS, *args)
        assert done.returncode == 0, (args, done.stderr)
        assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["verify", "{seq}"],
        ["explain"],
        ["freeze", "{seq}", "--engine", "keras", "--bn-inference", "-o", "{out}"],
    ],
    ids=["verify", "explain", "freeze --engine keras"],
)
def test_keras_commands_without_keras_name_the_extra(args, tmp_path):
    """Exit 2 and one line naming the extra to install; nothing written."""
    fmt = {"seq": SAMPLES / "sequential.keras", "out": tmp_path / "out.keras"}
    done = run_hidden(KERAS_AND_BACKENDS, *[a.format(**fmt) for a in args])
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: ") and "pip install 'bnfreeze[tensorflow]'" in line
    assert not (tmp_path / "out.keras").exists()


def test_a_configured_backend_that_is_not_installed_names_its_extra(tmp_path):
    """Keras installed, keras.json says jax, jax missing: the line names bnfreeze[jax]."""
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "jax"}), encoding="utf-8")
    env = {"KERAS_HOME": str(tmp_path), "KERAS_BACKEND": ""}
    done = run_hidden("jax,jaxlib", "explain", env=env)
    assert done.returncode == 2, done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert error == [
        f"error: Keras is set to the JAX backend (by {tmp_path / 'keras.json'}), which is not "
        "installed. Install it (pip install 'bnfreeze[jax]'), or pick an installed one: "
        "KERAS_BACKEND=tensorflow."
    ]


def test_the_docs_quote_a_lean_install_within_200_mb():
    """Getting started's measured fresh-venv numbers: the core install stays at most 200 MB."""
    readme = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    head = readme[: readme.index("## Installing Keras and choosing a backend")]
    took, before, after = re.search(
        r"`pip install \.` took\s+(\d+) s and grew the venv from (\d+) MB to (\d+) MB", head
    ).groups()
    assert int(after) <= 200 and int(before) < int(after) and int(took) > 0
