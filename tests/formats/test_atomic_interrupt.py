"""Interrupted writes: an output is absent, the previous output, or complete; never partial.

``bnfreeze freeze`` runs as a real process on a large model (8 MB, built once per session
without Keras: ``hostile.large_keras``) and is killed with SIGKILL at fixed fractions of its
write phase: from the moment its temporary file appears to its rename, measured first on an
uninterrupted run. A kill is proven to have landed mid-write when the process died of the
signal with its temporary file still there, and each scenario must have at least
``guarantees.MID_WRITE_KILLS`` of those. After each kill the destination is either absent (or, when
one existed, byte-identical to the previous output) or a complete model: inspect reads it
and every weight equals the input's. The input never changes. Then the same on a full disk:
a small tmpfs when this machine lets us mount one, else a simulated ENOSPC.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
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

FRACTIONS = [i / guarantees.KILL_POINTS for i in range(guarantees.KILL_POINTS)]


@pytest.fixture(scope="session")
def large_model(tmp_path_factory) -> Path:
    return hostile.large_keras(tmp_path_factory.mktemp("large") / "large.keras", hidden=2048)


@pytest.fixture(scope="session")
def large_model_digest(large_model) -> dict[str, str]:
    return hostile.weights_digest(large_model)


def freeze_process(model: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "bnfreeze", "freeze", str(model), "--bn-inference", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(TEMP_SUFFIX)]


def wait_for_write(proc: subprocess.Popen, folder: Path, timeout: float = 120) -> float | None:
    """Poll until ``proc`` creates its temporary file; return when (None if it ended first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if temp_files(folder):
            return time.monotonic()
        if proc.poll() is not None:
            return None
        time.sleep(0.0005)
    proc.kill()
    raise AssertionError("freeze never started writing")


def output_temp_files(folder: Path, out: Path) -> list[Path]:
    """The temporary files of ``out`` itself (not the rewritten weights' scratch file)."""
    return [p for p in temp_files(folder) if p.name.startswith(f".{out.name}.")]


@pytest.fixture(scope="session")
def write_phase(large_model, tmp_path_factory) -> float:
    """Seconds from the output's temporary file's creation to its rename, in an
    uninterrupted freeze."""
    folder = tmp_path_factory.mktemp("calibrate")
    out = folder / "out.keras"
    proc = freeze_process(large_model, out)
    started = wait_for_write(proc, folder)
    assert started is not None
    renamed = None
    while renamed is None and proc.poll() is None:
        if out.exists():
            renamed = time.monotonic()
        time.sleep(0.0005)
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode() if proc.stderr else ""
    return (renamed or time.monotonic()) - started


def check_destination(out: Path, previous: bytes | None, digest: dict[str, str], where: str):
    """The destination after an interruption: absent / previous, or complete and exact."""
    if not out.exists():
        assert previous is None, f"{where}: the previous output disappeared"
        return "absent"
    data = out.read_bytes()
    if previous is not None and data == previous:
        return "previous"
    result = CliRunner().invoke(cli, ["check", str(out), "--expect", "bn-inference"])
    assert result.exit_code == 0, f"{where}: a partial output: {result.stderr or result.stdout}"
    assert hostile.weights_digest(out) == digest, f"{where}: the output's weights differ"
    return "complete"


@pytest.mark.parametrize("scenario", guarantees.KILL_SCENARIOS)
def test_sigkill_during_freeze(scenario, large_model, large_model_digest, write_phase, tmp_path):
    input_before = hostile.fingerprint(large_model)
    previous = hostile.sample_bytes("seed_bn.keras") if scenario == "existing output" else None
    seen: dict[str, int] = {}
    mid_write = 0
    for i, fraction in enumerate(FRACTIONS):
        folder = tmp_path / f"kill{i}"
        folder.mkdir()
        out = folder / "out.keras"
        if previous is not None:
            out.write_bytes(previous)
        where = f"{scenario}, SIGKILL at {fraction:.0%} of the {write_phase:.2f} s write phase"
        proc = freeze_process(large_model, out)
        started = wait_for_write(proc, folder)
        if started is not None:
            time.sleep(max(0.0, started + fraction * write_phase - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        # Proof that this kill interrupted the write: the process died of the signal with its
        # temporary file still there (it is only ever removed by the rename or a cleanup).
        if proc.returncode == -signal.SIGKILL and output_temp_files(folder, out):
            mid_write += 1
        state = check_destination(out, previous, large_model_digest, where)
        seen[state] = seen.get(state, 0) + 1
        # Nothing can clean up after SIGKILL: hidden temporary files may remain (the output's
        # and the rewritten weights'), never anything a user could take for a model.
        others = {p.name for p in folder.iterdir()} - {out.name}
        assert all(n.startswith(".") and n.endswith(TEMP_SUFFIX) for n in others), (where, others)
        assert len(others) <= 2, (where, others)
        assert hostile.fingerprint(large_model) == input_before, f"{where}: the input changed"
        guarantees.count("kill_points")
    guarantees.count("kills_mid_write", mid_write)
    print(f"\n{scenario}: {mid_write} of {len(FRACTIONS)} kills mid-write; destination: {seen}")
    assert mid_write >= guarantees.MID_WRITE_KILLS, (
        f"{scenario}: only {mid_write} of {len(FRACTIONS)} kills landed while the output was "
        f"being written (write phase {write_phase:.2f} s); the rest proved nothing"
    )


def test_the_next_run_removes_what_a_killed_one_left(large_model, tmp_path):
    """SIGKILL as soon as the temporary file exists leaves it behind; the next freeze to the
    same output removes it (its process is gone) and leaves only the output."""
    out = tmp_path / "out.keras"
    proc = freeze_process(large_model, out)
    assert wait_for_write(proc, tmp_path) is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert temp_files(tmp_path), "the killed run left nothing to clean up"
    again = freeze_process(large_model, out)
    assert again.wait(timeout=120) == 0, again.stderr.read().decode() if again.stderr else ""
    assert [p.name for p in tmp_path.iterdir()] == ["out.keras"]


# -- a full disk ------------------------------------------------------------------------------


@pytest.fixture()
def small_disk(tmp_path):
    """A 4 MiB tmpfs, or None when this machine does not let us mount one."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
        yield None
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        yield None
        return
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True)


@pytest.fixture()
def no_space(monkeypatch, tmp_path):
    """A folder where writes fail with ENOSPC: the small tmpfs, or a simulation."""

    def make(small_disk):
        if small_disk is not None:
            return small_disk, "tmpfs"
        import bnfreeze.formats.writers.keras_zip as keras_zip

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(keras_zip, "_copy_range", full)
        monkeypatch.setattr(keras_zip, "drop_optimizer", full)
        folder = tmp_path / "simulated-full"
        folder.mkdir()
        return folder, "simulated"

    return make


@pytest.mark.parametrize("case", ["new output", "existing output", "no optimizer state"])
def test_full_disk(case, small_disk, no_space, large_model, tmp_path):
    folder, how = no_space(small_disk)
    model = large_model
    if case == "no optimizer state":  # the plain copy path, not the weights rewrite
        model = hostile.large_keras(tmp_path / "plain.keras", hidden=2048, optimizer=False)
    input_before = hostile.fingerprint(model)
    out = folder / "out.keras"
    previous = hostile.sample_bytes("seed_bn.keras")
    if case == "existing output":
        out.write_bytes(previous)
    result = CliRunner().invoke(cli, ["freeze", str(model), "--bn-inference", "-o", str(out)])
    where = f"full disk ({how}), {case}"
    assert result.exit_code == 2, (where, result.stderr, result.exception)
    assert result.stderr == f"error: {out}: cannot be written (no space left on the device).\n", (
        where
    )
    if case == "existing output":
        assert out.read_bytes() == previous, where
    else:
        assert not out.exists(), where
    assert sorted(p.name for p in folder.iterdir()) == (
        ["out.keras"] if case == "existing output" else []
    ), f"{where}: temporary files left"
    assert hostile.fingerprint(model) == input_before, where
    guarantees.count("full_disk_cases")


# -- files with optimizer state: the remap path ---------------------------------------------


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> Path:
    """A large model with a consistent Adam state: freeze --bn-inference remaps it (the
    weights member copied, patched and appended to)."""
    return hostile.trained_large_keras(tmp_path_factory.mktemp("trained") / "trained.keras")


def _remapped_digest(model: Path) -> list[str]:
    """The optimizer variables the remapped output must hold: bn_1's slots left out."""
    saved = hostile.optimizer_digest(model)
    return saved[:6] + saved[10:]


@pytest.mark.parametrize("scenario", guarantees.KILL_SCENARIOS)
def test_sigkill_while_remapping_the_optimizer_state(scenario, trained_model, tmp_path):
    digest = hostile.weights_digest(trained_model)
    optimizer = _remapped_digest(trained_model)
    input_before = hostile.fingerprint(trained_model)
    previous = hostile.sample_bytes("seed_bn.keras") if scenario == "existing output" else None
    calibrate = tmp_path / "calibrate"
    calibrate.mkdir()
    proc = freeze_process(trained_model, calibrate / "out.keras")
    started = wait_for_write(proc, calibrate)
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode() if proc.stderr else ""
    assert started is not None
    phase = time.monotonic() - started
    assert hostile.optimizer_digest(calibrate / "out.keras") == optimizer
    seen: dict[str, int] = {}
    for i in range(4):
        folder = tmp_path / f"kill{i}"
        folder.mkdir()
        out = folder / "out.keras"
        if previous is not None:
            out.write_bytes(previous)
        where = f"{scenario}, remap, SIGKILL at {i / 4:.0%} of the {phase:.2f} s write phase"
        proc = freeze_process(trained_model, out)
        begun = wait_for_write(proc, folder)
        if begun is not None:
            time.sleep(max(0.0, begun + i / 4 * phase - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        state = check_destination(out, previous, digest, where)
        if state == "complete":
            assert hostile.optimizer_digest(out) == optimizer, f"{where}: optimizer state"
        seen[state] = seen.get(state, 0) + 1
        others = {p.name for p in folder.iterdir()} - {out.name}
        assert all(n.startswith(".") and n.endswith(TEMP_SUFFIX) for n in others), (where, others)
        assert hostile.fingerprint(trained_model) == input_before, f"{where}: the input changed"
    print(f"\n{scenario}, remap: destination after SIGKILL: {seen}")


@pytest.mark.parametrize("case", ["new output", "existing output"])
def test_full_disk_while_remapping_the_optimizer_state(
    case, small_disk, no_space, trained_model, tmp_path
):
    folder, how = no_space(small_disk)
    input_before = hostile.fingerprint(trained_model)
    out = folder / "out.keras"
    previous = hostile.sample_bytes("seed_bn.keras")
    if case == "existing output":
        out.write_bytes(previous)
    result = CliRunner().invoke(
        cli, ["freeze", str(trained_model), "--bn-inference", "-o", str(out)]
    )
    where = f"full disk ({how}), remap, {case}"
    assert result.exit_code == 2, (where, result.stderr, result.exception)
    assert result.stderr == f"error: {out}: cannot be written (no space left on the device).\n", (
        where
    )
    if case == "existing output":
        assert out.read_bytes() == previous, where
    else:
        assert not out.exists(), where
    assert sorted(p.name for p in folder.iterdir()) == (
        ["out.keras"] if case == "existing output" else []
    ), f"{where}: temporary files left"
    assert hostile.fingerprint(trained_model) == input_before, where
