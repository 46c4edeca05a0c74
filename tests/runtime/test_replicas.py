"""What BatchNormalization normalizes over under data-parallel ``fit()``, measured, and what
``BatchNormGuard`` reports about it (:mod:`bnfreeze.runtime.replicas`).

Each configuration trains in its own interpreter (``tests/support/replica_scenarios.py``):
TensorFlow with 2 logical CPU devices and ``MirroredStrategy`` (``synchronized`` off and on),
JAX with 2 forced host devices and ``keras.distribution.DataParallel``. The batch's two halves have
different means, so normalizing by each replica's half and by the whole batch give different
outputs; the scenario measures the distance of the layer's real output in ``fit()`` to both,
computed by hand. The test decides from that distance which one the layer did, and checks the
guard's per-layer sample count and synchronization against it.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import warm
from paths import ROOT, SAMPLES, SUPPORT

from bnfreeze.runtime.replicas import (
    BatchNormSamples,
    Engine,
    MovingStatistics,
    ReplicaReport,
    ReplicaSetup,
    Seen,
    Statistics,
    batchnorm_samples,
    check_min_samples,
)

SCENARIOS = SUPPORT / "replica_scenarios.py"
N = 8  # the scenario's global batch; 2 replicas hold N // 2 each

CONFIGS = ["mirrored-off", "mirrored-on", "data-parallel-off"]


def run_scenario(engine: str, sync: str, *extra: str) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    # The script sets the backend its engine runs on; a warm interpreter needs it now.
    env["KERAS_BACKEND"] = "jax" if engine == "data-parallel" else "tensorflow"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = warm.run(
        [sys.executable, str(SCENARIOS), engine, sync, *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The scenarios run so far, by configuration; mirrored-on also saves its model."""
    return {"sync.keras": tmp_path_factory.mktemp("replicas") / "sync.keras"}


def scenario(runs: dict, config: str) -> dict:
    if config not in runs:
        engine, sync = config.rsplit("-", 1)
        if engine == "data-parallel":
            pytest.importorskip("jax")
        extra = (str(runs["sync.keras"]),) if config == "mirrored-on" else ()
        runs[config] = run_scenario(engine, sync, *extra)
    return runs[config]


@pytest.fixture(scope="module", params=CONFIGS)
def run(request, runs) -> dict:
    return scenario(runs, request.param)


def measured_statistics(run: dict) -> str:
    """Which statistics the layer's output in fit() was normalized with, from the distances
    of that output to both hand-computed normalizations."""
    per_half, whole = run["distance_to_per_half"], run["distance_to_global"]
    if per_half < 1e-6 < 0.1 < whole:
        return "per-replica"
    if whole < 1e-6 < 0.1 < per_half:
        return "global"
    raise AssertionError(f"the output matches neither normalization: {per_half}, {whole}")


@pytest.mark.keras
def test_the_guard_reports_what_each_bn_normalized_over(run):
    statistics = measured_statistics(run)
    layer = run["guard"]["layers"]["bn"]
    assert run["guard"]["replicas"] == 2
    assert (
        run["guard"]["engine"]
        == {"tensorflow": "MirroredStrategy", "jax": "DataParallel"}[run["backend"]]
    )
    assert layer["training"] is True
    assert layer["statistics"] == statistics
    # The samples the statistics cover: one replica's half, or the whole batch.
    assert layer["samples"] == (N // 2 if statistics == "per-replica" else N)
    # Under MirroredStrategy each replica calls the layer on its half: global statistics mean
    # they were synchronized across replicas. Under DataParallel the layer sees the whole
    # (sharded) batch: nothing to synchronize.
    assert layer["synchronized"] == (statistics == "global" and run["engine"] == "mirrored")


@pytest.mark.keras
def test_the_guard_names_the_moving_statistics_measured(run):
    moving = run["guard"]["layers"]["bn"]["moving"]
    mean, variance = run["expected"][moving]
    np.testing.assert_allclose(run["moving_mean"], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run["moving_variance"], variance, rtol=1e-4, atol=1e-5)
    for other, (m, _) in run["expected"].items():
        if other != moving:
            assert not np.allclose(run["moving_mean"], m, rtol=1e-3)


@pytest.mark.keras
def test_the_measured_table(run):
    """docs/semantics.md rule 8 and docs/data-parallel.md: the table, as measured."""
    table = {
        "mirrored-off": ("per-replica", "first-replica"),
        "mirrored-on": ("global", "global"),
        "data-parallel-off": ("global", "global"),
    }
    key = f"{run['engine']}-{'on' if run['synchronized'] else 'off'}"
    statistics = measured_statistics(run)
    moving = next(
        name
        for name, (mean, _) in run["expected"].items()
        if np.allclose(run["moving_mean"], mean, rtol=1e-4, atol=1e-5)
    )
    assert (statistics, moving) == table[key]
    if run["backend"] == "jax":
        assert "only supported with the TensorFlow backend" in run["synchronized_refused"]


@pytest.mark.keras
def test_fewer_samples_than_the_threshold_warn(run):
    layer = run["guard"]["layers"]["bn"]
    assert layer["samples"] < 16
    (problem,) = run["guard"]["problems"]
    assert f"normalized over {layer['samples']} samples, fewer than 16" in problem
    assert any(problem in w for w in run["warnings"])
    if layer["statistics"] == "per-replica":
        assert "each replica's slice" in problem and "sync-bn MODEL on" in problem
    else:
        assert "the global batch" in problem and "sync-bn" not in problem


JAX_LOAD = """
import json, sys
import keras, numpy as np
try:
    keras.models.load_model(sys.argv[1], compile=False)
    refused = None
except Exception as e:  # Keras wraps the layer's ValueError in a TypeError
    refused = str(e)
model = keras.models.load_model(sys.argv[2], compile=False)
saved = np.load(sys.argv[3])
print(json.dumps({
    "backend": keras.backend.backend(),
    "refused": refused,
    "synchronized": model.get_layer("bn").synchronized,
    "paths": sorted(v.path for v in model.weights),
    "saved_paths": sorted(saved.files),
    "unequal": [v.path for v in model.weights
                if not np.array_equal(np.asarray(v.numpy()), saved[v.path])],
}))
"""


@pytest.mark.keras
def test_a_synchronized_file_saved_on_tensorflow_loads_on_jax_once_sync_is_off(runs, tmp_path):
    """Saved with synchronized=True under MirroredStrategy: inspect warns; sync-bn off rewrites
    only the config; Keras on JAX then loads it with every weight equal by path (and refuses
    the original)."""
    pytest.importorskip("jax")
    from bnfreeze.model.records import WarningCode
    from bnfreeze.ops.inspect import inspect_file
    from bnfreeze.ops.sync import set_synchronized_file

    scenario(runs, "mirrored-on")
    source = runs["sync.keras"]
    found = [f for f in inspect_file(source).warnings if f.code is WarningCode.SYNCHRONIZED_BN]
    assert [f.path for f in found] == ["bn"]
    assert "loads this file only on TensorFlow" in found[0].message
    off = tmp_path / "off.keras"
    set_synchronized_file(source, off, synchronized=False)
    assert not [f for f in inspect_file(off).warnings if f.code is WarningCode.SYNCHRONIZED_BN]
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    done = warm.run(
        [sys.executable, "-c", JAX_LOAD, str(source), str(off), f"{source}.npz"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout)
    assert loaded["backend"] == "jax"
    assert "only supported with the TensorFlow backend" in loaded["refused"]
    assert loaded["synchronized"] is False
    assert loaded["paths"] == loaded["saved_paths"] and len(loaded["paths"]) == 4
    assert loaded["unequal"] == []


# --------------------------------------------------------------------------- the pure parts


def setup(engine: Engine, replicas: int) -> ReplicaSetup:
    return ReplicaSetup(engine, replicas, engine.value)


@pytest.mark.parametrize("engine", list(Engine))
def test_every_engine_reports_a_layer(engine):
    replicas = 1 if engine is Engine.NONE else 4
    in_sync = 4 if engine in (Engine.MIRRORED_STRATEGY, Engine.TF_DISTRIBUTE) else 1
    seen = Seen("bn", sizes=(8,) * in_sync, in_sync=(in_sync,) * in_sync)
    for synchronized in (False, True):
        b = batchnorm_samples(
            path="bn",
            layer_synchronized=synchronized,
            training=True,
            seen=seen,
            setup=setup(engine, replicas),
        )
        assert b.statistics in Statistics and b.moving in MovingStatistics
        if in_sync > 1 and not synchronized:
            assert (b.samples, b.statistics, b.synchronized) == (8, Statistics.PER_REPLICA, False)
        elif in_sync > 1:
            assert (b.samples, b.statistics, b.synchronized) == (32, Statistics.GLOBAL, True)
        else:
            assert (b.samples, b.statistics, b.synchronized) == (8, Statistics.GLOBAL, False)


def test_one_device_never_warns_and_inference_layers_never_warn():
    layer = BatchNormSamples("bn", True, 2, 2, Statistics.GLOBAL, False, MovingStatistics.GLOBAL)
    assert ReplicaReport(setup(Engine.NONE, 1), 16, (layer,)).problems == ()
    frozen = BatchNormSamples(
        "bn", False, 2, 2, Statistics.PER_REPLICA, False, MovingStatistics.FIRST_REPLICA
    )
    assert ReplicaReport(setup(Engine.MIRRORED_STRATEGY, 2), 16, (frozen,)).problems == ()
    assert ReplicaReport(setup(Engine.DATA_PARALLEL, 2), 2, (layer,)).problems == ()
    assert len(ReplicaReport(setup(Engine.DATA_PARALLEL, 2), 3, (layer,)).problems) == 1


def test_an_unknown_batch_size_is_reported_as_unknown():
    b = batchnorm_samples(
        path="bn",
        layer_synchronized=False,
        training=True,
        seen=Seen("bn", sizes=(None, None), in_sync=(2, 2)),
        setup=setup(Engine.MIRRORED_STRATEGY, 2),
    )
    assert b.samples is None and not b.below(16)


@pytest.mark.parametrize("bad", [0, -3, 1.5, "16", True, None])
def test_min_samples_must_be_a_positive_whole_number(bad):
    with pytest.raises(ValueError, match="min_samples takes a positive whole number"):
        check_min_samples(bad)


@pytest.mark.keras
def test_verify_replicas_reports_what_the_measured_run_did(runs, tmp_path):
    """``verify --replicas 2`` on the scenario's model with synchronization off reports what
    the measured MirroredStrategy run without synchronization did: each BN over its half."""
    from click.testing import CliRunner

    from bnfreeze.cli import cli
    from bnfreeze.ops.sync import set_synchronized_file

    measured = scenario(runs, "mirrored-off")
    scenario(runs, "mirrored-on")
    off = tmp_path / "off.keras"
    set_synchronized_file(runs["sync.keras"], off, synchronized=False)
    done = CliRunner().invoke(
        cli,
        ["verify", str(off), "--replicas", "2", "--batch-size", str(N)],
        env={"KERAS_BACKEND": "tensorflow", "COLUMNS": "100"},
        catch_exceptions=False,
    )
    assert done.exit_code == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "Engine     MirroredStrategy (2 replicas)"
    row = next(line.split() for line in lines if line.startswith("bn "))
    want = measured["guard"]["layers"]["bn"]
    assert measured_statistics(measured) == "per-replica"
    assert row == ["bn", "training", str(N // 2), "per-replica", "no", want["moving"]]
    assert f"normalized over {N // 2} samples, fewer than 16" in done.stderr


def test_verify_replicas_refuses_a_batch_that_does_not_split(tmp_path):
    from click.testing import CliRunner

    from bnfreeze.cli import cli

    seed = SAMPLES / "seed_bn.keras"
    done = CliRunner().invoke(
        cli, ["verify", str(seed), "--replicas", "3", "--batch-size", "8"], catch_exceptions=False
    )
    assert done.exit_code == 2
    assert done.stderr.splitlines()[-1] == (
        "error: --batch-size 8 does not split evenly over 3 replicas; give a multiple of "
        "--replicas."
    )


def test_replica_lines():
    from bnfreeze.render.replicas import replica_lines

    layers = (
        BatchNormSamples(
            "a/bn", True, 4, 4, Statistics.PER_REPLICA, False, MovingStatistics.FIRST_REPLICA
        ),
        BatchNormSamples(
            "b", False, 4, 4, Statistics.PER_REPLICA, False, MovingStatistics.FIRST_REPLICA
        ),
    )
    lines = replica_lines(ReplicaReport(setup(Engine.MIRRORED_STRATEGY, 2), 16, layers))
    assert lines == [
        "Engine     MirroredStrategy (2 replicas)",
        "Threshold  16 samples per BN in training mode",
        "",
        "path  mode       samples  over         synchronized  moving stats from",
        "─" * 70,
        "a/bn  training   4        per-replica  no            first-replica",
        "b     inference  -        -            no            -",
    ]


@pytest.mark.keras
def test_explain_replicas_side_by_side():
    """``explain --replicas 2`` on TensorFlow: the seed BN, measured in a child process,
    normalizes per replica and keeps the first replica's statistics unless synchronized."""
    from click.testing import CliRunner

    from bnfreeze.cli import cli

    done = CliRunner().invoke(
        cli,
        ["explain", "--replicas", "2"],
        env={"KERAS_BACKEND": "tensorflow"},
        catch_exceptions=False,
    )
    assert done.exit_code == 0, done.stderr
    out = done.stdout.splitlines()
    # The slices' statistics, computed by hand from the batch the experiment feeds.
    from bnfreeze.runtime.explain_replicas import PER_REPLICA, batch

    x = batch(2)
    halves = [x[:PER_REPLICA, 0], x[PER_REPLICA:, 0]]
    for name, values in [("replica 1", halves[0]), ("replica 2", halves[1]), ("global", x[:, 0])]:
        row = next(line for line in out if line.startswith(name))
        assert row.split()[-2:] == [f"{values.mean():.3f}", f"{values.var():.3f}"]
    assert "MirroredStrategy, synchronized=False: normalized with per-replica statistics" in out
    assert "MirroredStrategy, synchronized=True: normalized with global statistics" in out
    moving = [line for line in out if line.startswith("  moving mean")]
    assert moving[0].endswith("from replica 1") and moving[1].endswith("from global")
