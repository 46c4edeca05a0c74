"""Hostile and broken files: every command ends cleanly on every one of them.

For each input of the generated corpus (``tests/support/hostile.py``: truncations, bit flips, wrong
shapes, bombs, odd files), each regression case (``tests/regressions/*.json``) and each
hypothesis mutation of a sample, ``inspect``, ``freeze --bn-inference -o OUT`` and
``check --expect bn-inference`` must:

* exit 0, 1 (check only) or 2;
* on exit 2, print exactly one ``error: ...`` line on stderr and no traceback;
* leave no output file when they fail, and a readable model when freeze succeeds;
* leave no temporary file behind, and the input byte-identical;
* finish within a CPU budget (nothing hangs or loops on a cyclic pointer).

A failure names the case; ``hostile.build(case, folder)`` rebuilds it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import guarantees
import hostile
import pytest
import unprivileged
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paths import REGRESSIONS as REGRESSIONS_DIR
from paths import ROOT

from bnfreeze.cli import cli

as_nobody = unprivileged.as_nobody

REGRESSIONS = sorted(REGRESSIONS_DIR.glob("*.json"))
CPU_BUDGET = guarantees.CPU_BUDGET


def run_commands(case: str, folder: Path) -> list[str]:
    """Build ``case`` in ``folder``, run the three commands on it in-process, return every
    problem found (empty when all is well)."""
    path = hostile.build(case, folder / "in")
    before = hostile.fingerprint(path)
    out_dir = folder / "out"
    out_dir.mkdir()
    out = out_dir / f"out{'.h5' if path.suffix == '.h5' else '.keras'}"
    runner = CliRunner()
    found: list[str] = []
    commands = {
        "inspect": ["inspect", str(path)],
        "freeze": ["freeze", str(path), "--bn-inference", "-o", str(out)],
        "check": ["check", str(path), "--expect", "bn-inference"],
    }
    for command, args in commands.items():
        started = time.process_time()
        result = runner.invoke(cli, args)
        spent = time.process_time() - started
        stderr = result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            exc = result.exception
            stderr += f"\nTraceback (in-process): {type(exc).__name__}: {exc}"
        outcome = hostile.Outcome(command, result.exit_code, result.stdout, stderr)
        found += hostile.problems(case, outcome, output=out if command == "freeze" else None)
        if spent > CPU_BUDGET:
            found.append(f"{command} on {case}: {spent:.1f} s of CPU (budget {CPU_BUDGET} s)")
        if command == "freeze" and result.exit_code == 0:
            reread = runner.invoke(cli, ["inspect", str(out)])
            if reread.exit_code != 0:
                found.append(
                    f"freeze on {case}: wrote {out.name}, which inspect rejects: "
                    f"{reread.stderr.strip()}"
                )
            out.unlink()
    if hostile.fingerprint(path) != before:
        found.append(f"{case}: the input was modified")
    return found


@pytest.mark.parametrize("case", hostile.corpus_names())
def test_corpus(case, tmp_path):
    problems = run_commands(case, tmp_path)
    guarantees.count("corpus_cases")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("regression", REGRESSIONS, ids=[p.stem for p in REGRESSIONS])
def test_regression(regression, tmp_path):
    """Every crash a fuzzer ever found, kept (see tests/regressions/README.md)."""
    case = json.loads(regression.read_text())
    problems = run_commands(case["case"], tmp_path)
    guarantees.count("regression_cases")
    assert not problems, f"{regression.name} ({case['bug']}):\n" + "\n".join(problems)


# -- hypothesis: mutations of the samples ----------------------------------------------------

_offsets = st.integers(min_value=0, max_value=2**20)
_ops = st.one_of(
    st.builds(lambda o, b: f"f{o}.{b}", _offsets, st.integers(0, 7)),
    st.builds(lambda o, v: f"s{o}={v}", _offsets, st.sampled_from([0, 1, 0x7F, 0x80, 0xFF])),
    st.builds(lambda o: f"t{o}", _offsets),
    st.builds(lambda o, n: f"d{o}+{n}", _offsets, st.integers(1, 64)),
    st.builds(lambda o, n: f"i{o}+{n}", _offsets, st.integers(1, 64)),
)
mutations = st.builds(
    lambda sample, ops: f"mutate:{sample}@{','.join(ops)}",
    st.sampled_from(hostile.MUTATED_SAMPLES),
    st.lists(_ops, min_size=1, max_size=4),
)


@settings(
    max_examples=guarantees.FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same inputs every run: the README's count is exact
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=mutations)
def test_mutations(case, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mutation")
    problems = run_commands(case, folder)
    guarantees.count("fuzz_examples")
    assert not problems, "\n".join(problems) + (
        "\nKeep it: add a tests/regressions/<name>.json with this case (see the README there)."
    )


def test_every_planned_input_ran(request):
    """The counts the README quotes are the counts this run tried (when the whole module ran)."""
    selected = {
        item.originalname for item in request.session.items if item.module is request.module
    }
    if not {"test_corpus", "test_regression", "test_mutations"} <= selected:
        pytest.skip("only part of test_fuzz.py was selected")
    plan = guarantees.planned()
    ran = guarantees.ran
    assert ran.get("corpus_cases") == plan["corpus_cases"]
    assert ran.get("regression_cases", 0) == plan["regression_cases"]
    assert ran.get("fuzz_examples") == plan["fuzz_examples"]


# -- odd files and real processes ------------------------------------------------------------


def bnfreeze(*args: str, **kwargs) -> subprocess.CompletedProcess:
    # PYTHONPATH: this checkout, whatever an editable install elsewhere points at.
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "COLUMNS": "100",
        "NO_COLOR": "1",
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.run(
        [sys.executable, "-m", "bnfreeze", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        **kwargs,
    )


@pytest.mark.parametrize(
    "case",
    [
        "truncate:seed_bn.keras@2048",
        "zip:nested-json-10000",
        "zip:weights-bomb-1GiB",
        "h5:weights-only-keras3",
        "fs:symlink-loop",
    ],
)
def test_no_traceback_reaches_a_real_terminal(case, tmp_path):
    """The in-process runs above prove the exit codes; these prove what a user's terminal
    shows: one line on stderr, nothing on stdout, no traceback (TensorFlow's noise included)."""
    path = hostile.build(case, tmp_path / "in")
    out = tmp_path / "out.keras"
    for args in (["inspect", str(path)], ["freeze", str(path), "--bn-inference", "-o", str(out)]):
        proc = bnfreeze(*args)
        assert proc.returncode == 2, (case, args, proc.stderr)
        assert proc.stdout == "", (case, args)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, args, proc.stderr)
        assert not out.exists()


@pytest.fixture()
def open_folder():
    """A folder user ``nobody`` can enter (pytest's own tmp folders are root-only)."""
    with unprivileged.open_folder() as folder:
        yield folder


def warm_up(folder: Path) -> None:
    """Run each command once as root, so the child imports nothing (it could not read the
    installed packages as ``nobody``)."""
    import tomllib  # noqa: F401

    import click._textwrap  # noqa: F401  (click's usage errors)

    readable = folder / "readable.keras"
    readable.write_bytes(hostile.sample_bytes("seed_bn.keras"))
    out = folder / "warm.keras"
    runner = CliRunner()
    for args in (
        ["inspect", str(readable)],
        ["freeze", str(readable), "--bn-inference", "-o", str(out)],
        ["check", str(readable), "--expect", "bn-inference"],
    ):
        assert runner.invoke(cli, args).exit_code in (0, 1), args
    out.unlink()
    readable.unlink()


needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or not hasattr(os, "fork"),
    reason="needs root (to become user nobody) and fork",
)


@needs_root
def test_unreadable_file(open_folder):
    """chmod 000 stops nobody but an unprivileged user, and the suite runs as root: the
    commands run in a child process that has become user ``nobody``."""
    warm_up(open_folder)
    path = open_folder / "secret.keras"
    path.write_bytes(hostile.sample_bytes("seed_bn.keras"))
    path.chmod(0o000)
    out = open_folder / "out.keras"
    for args in (
        ["inspect", str(path)],
        ["freeze", str(path), "--bn-inference", "-o", str(out)],
        ["check", str(path), "--expect", "bn-inference"],
    ):
        exit_code, _, stderr = as_nobody(args)
        assert (exit_code, stderr) == (2, f"error: {path}: permission denied.\n"), args
        assert not out.exists()
    assert path.read_bytes() == hostile.sample_bytes("seed_bn.keras")


@needs_root
def test_folders_this_user_may_not_enter(open_folder, tmp_path):
    """A model, or an output folder, below a folder the user may not enter (pytest's
    root-only tmp folder): one line, exit 2, nothing written."""
    warm_up(open_folder)
    hidden = tmp_path / "model.keras"
    hidden.write_bytes(hostile.sample_bytes("seed_bn.keras"))
    exit_code, _, stderr = as_nobody(["inspect", str(hidden)])
    assert (exit_code, stderr) == (2, f"error: {hidden}: permission denied.\n")
    readable = open_folder / "model.keras"
    readable.write_bytes(hostile.sample_bytes("seed_bn.keras"))
    out = tmp_path / "out.keras"
    exit_code, _, stderr = as_nobody(["freeze", str(readable), "--bn-inference", "-o", str(out)])
    assert (exit_code, stderr) == (2, f"error: {out}: cannot be written (permission denied).\n")
    assert not out.exists()


def test_interpreter_exits_cleanly_after_damaged_weights(tmp_path):
    """Regression: when h5py failed to open a damaged weights member given as a Python file
    object, HDF5 kept the driver's settings and freed them at process exit, crashing the
    interpreter (SIGSEGV, exit 139) after every command had already exited 2. Found when the
    whole corpus ran in one pytest process: the failures only show at exit, so a fresh
    interpreter runs the commands here and must exit 0."""
    cases = [
        "zip:weights-garbage",
        "zip:weights-empty",
        "zip:weights-text",
        "zip:weights-deflated",
        "flip:seed_bn.keras@2100.3",
    ]
    paths = [str(hostile.build(case, tmp_path / "in")) for case in cases]
    script = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from bnfreeze.cli import cli\n"
        "for path in sys.argv[1:]:\n"
        "    for args in (['inspect', path], ['check', path, '--expect', 'bn-inference'],\n"
        "                 ['freeze', path, '--bn-inference', '--dry-run']):\n"
        "        CliRunner().invoke(cli, args)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-c", script, *paths], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
