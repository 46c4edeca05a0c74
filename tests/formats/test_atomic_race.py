"""Two ``bnfreeze freeze`` processes writing the same output at once leave one complete model,
never a mix: each writes its own temporary file and renames it into place, so the last
rename wins whole. The two inputs differ in every weight, so a mix could not go unnoticed.

"At once" is proven, not hoped for: every round must see both temporary files in the folder
at the same moment. The first writer to create its temporary file is held there (SIGSTOP)
until the other has created its own; in round 1 until the other has finished, so the held
one renames last and its model must be the output.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import guarantees
import hostile
import pytest
from click.testing import CliRunner
from paths import ROOT

from bnfreeze.cli import cli
from bnfreeze.formats.atomic import TEMP_SUFFIX


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> list[tuple[Path, dict[str, str]]]:
    folder = tmp_path_factory.mktemp("race")
    models = []
    for seed in (1, 2):
        path = hostile.large_keras(folder / f"model{seed}.keras", hidden=1024, seed=seed)
        models.append((path, hostile.weights_digest(path)))
    assert models[0][1] != models[1][1]
    return models


def start_freeze(model: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "bnfreeze", "freeze", str(model), "--bn-inference", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def writer_pids(folder: Path, out: Path) -> set[int]:
    """The processes whose temporary file of ``out`` exists now, by the pid in its name
    (``.NAME.HOST-PID-RANDOM.bnfreeze-tmp``)."""
    pids = set()
    for path in folder.iterdir():
        name = path.name
        if name.startswith(f".{out.name}.") and name.endswith(TEMP_SUFFIX):
            writer = name[len(out.name) + 2 : -len(TEMP_SUFFIX)].rsplit("-", 2)
            pids.add(int(writer[1]) if len(writer) == 3 and writer[1].isdigit() else -1)
    return pids


def race(
    procs: list[subprocess.Popen], out: Path, *, hold_until_done: bool
) -> tuple[bool, subprocess.Popen | None]:
    """Let both writers run; return whether both temporary files were seen at once, and the
    writer that was held.

    Whichever writer creates its temporary file first is held (SIGSTOP) until the other has
    created its own (or, with ``hold_until_done``, has finished: the held writer then renames
    last). Left alone, two processes on a loaded machine may well run one after the other."""
    by_pid = {p.pid: p for p in procs}
    held: subprocess.Popen | None = None
    overlapped = released = False
    try:
        while any(p.poll() is None for p in procs):
            writing = writer_pids(out.parent, out)
            overlapped = overlapped or len(writing) >= 2
            if held is None and writing and (hold_until_done or not overlapped):
                held = by_pid.get(min(writing))
                if held is not None:
                    held.send_signal(signal.SIGSTOP)
                    if held.pid not in writer_pids(out.parent, out):  # renamed meanwhile
                        held.send_signal(signal.SIGCONT)
                        held = None
            if held is not None and not released:
                (other,) = [p for p in procs if p is not held]
                if (overlapped and not hold_until_done) or other.poll() is not None:
                    held.send_signal(signal.SIGCONT)
                    released = True
            time.sleep(0.0005)
    finally:
        if held is not None and not released:
            held.send_signal(signal.SIGCONT)
    return overlapped, held


@pytest.mark.parametrize("round_", range(guarantees.RACE_ROUNDS))
def test_two_writers_one_output(round_, two_models, tmp_path):
    out = tmp_path / "out.keras"
    if round_ == 2:  # a previous output, replaced whole by one of them
        out.write_bytes(hostile.sample_bytes("seed_bn.keras"))
    inputs_before = [hostile.fingerprint(path) for path, _ in two_models]
    procs = [start_freeze(path, out) for path, _ in two_models]
    # Round 1: the first writer waits, mid-write, until the other has renamed its output.
    overlapped, held = race(procs, out, hold_until_done=round_ == 1)
    for proc in procs:
        assert proc.wait() == 0, proc.stderr.read() if proc.stderr else ""
    where = f"race round {round_}"
    assert overlapped, f"{where}: the two temporary files never existed at once"
    if round_ == 1:  # the held writer renamed last: its model, whole
        assert held is not None
        assert hostile.weights_digest(out) == two_models[procs.index(held)][1], where
    result = CliRunner().invoke(cli, ["check", str(out), "--expect", "bn-inference"])
    assert result.exit_code == 0, f"{where}: {result.stderr or result.stdout}"
    assert hostile.weights_digest(out) in [digest for _, digest in two_models], (
        f"{where}: the output's weights are neither model's: a mix"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.keras"], (
        f"{where}: temporary files left"
    )
    assert [hostile.fingerprint(path) for path, _ in two_models] == inputs_before
    guarantees.count("race_rounds")
    guarantees.count("race_rounds_overlapped")


def test_two_writers_one_output_remapping_optimizer_state(tmp_path):
    """The same race on files whose Adam state is remapped (weights member patched and
    appended to): one complete model, with one input's weights and remapped slots."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    models = []
    for seed in (1, 2):
        path = hostile.trained_large_keras(folder / f"t{seed}.keras", hidden=1024, seed=seed)
        saved = hostile.optimizer_digest(path)
        models.append((path, hostile.weights_digest(path), saved[:6] + saved[10:]))
    out = tmp_path / "out.keras"
    inputs_before = [hostile.fingerprint(path) for path, _, _ in models]
    procs = [start_freeze(path, out) for path, _, _ in models]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    result = CliRunner().invoke(cli, ["check", str(out), "--expect", "bn-inference"])
    assert result.exit_code == 0, result.stderr or result.stdout
    found = (hostile.weights_digest(out), hostile.optimizer_digest(out))
    assert found in [(weights, optimizer) for _, weights, optimizer in models], "a mix"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs", "out.keras"]
    assert [hostile.fingerprint(path) for path, _, _ in models] == inputs_before
