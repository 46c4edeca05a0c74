"""``bnfreeze verify MODEL --replicas N``: one data-parallel ``fit()`` step on N simulated
devices, in a fresh interpreter, with :class:`~bnfreeze.runtime.guard.BatchNormGuard` reporting
what each BN layer normalized over (:mod:`bnfreeze.runtime.replicas`).

Simulated devices can only be asked for before the backend starts (TensorFlow's logical
devices, JAX's ``--xla_force_host_platform_device_count``), so the step always runs in a child
process: ``python -m bnfreeze.runtime.replicas_run``. TensorFlow runs under
``tf.distribute.MirroredStrategy``, JAX under ``keras.distribution.DataParallel``; the backend
is ``KERAS_BACKEND`` (TensorFlow when unset). The model is loaded uncompiled (safe mode) and
trained one step with SGD (learning rate 0: the weights stay, the moving statistics move) and
MSE on synthetic inputs that fit it; the file is never written.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from typing import Any

from bnfreeze.errors import BnfreezeError
from bnfreeze.runtime.replicas import (
    DEFAULT_MIN_SAMPLES,
    BatchNormSamples,
    Engine,
    MovingStatistics,
    ReplicaReport,
    ReplicaSetup,
    Statistics,
)


class ReplicaRunError(BnfreezeError):
    """The data-parallel step could not run."""


def measure_replicas(
    path: str | os.PathLike[str],
    *,
    replicas: int,
    batch_size: int,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    backend: str | None = None,
    timeout: float = 900,
) -> ReplicaReport:
    """Run one data-parallel step of the saved model at ``path`` on ``replicas`` simulated
    devices in a child process; return what the guard reported."""
    if replicas < 1:
        raise ReplicaRunError(f"--replicas takes a positive number of devices, not {replicas}.")
    if batch_size % replicas:
        raise ReplicaRunError(
            f"--batch-size {batch_size} does not split evenly over {replicas} replicas; give a "
            "multiple of --replicas."
        )
    env = dict(os.environ)
    env["KERAS_BACKEND"] = backend or env.get("KERAS_BACKEND") or "tensorflow"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    argv = [
        sys.executable,
        "-m",
        "bnfreeze.runtime.replicas_run",
        os.fspath(path),
        str(replicas),
        str(batch_size),
        str(min_samples),
    ]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ReplicaRunError(
            f"the data-parallel step did not finish in {timeout:.0f} s."
        ) from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["no output"]
        raise ReplicaRunError(f"the data-parallel step failed: {last[0]}")
    doc = json.loads(lines[-1])
    if "error" in doc:
        raise ReplicaRunError(doc["error"])
    return report_from_dict(doc)


def report_to_dict(report: ReplicaReport) -> dict[str, Any]:
    return {
        "engine": report.setup.engine.value,
        "name": report.setup.name,
        "replicas": report.setup.replicas,
        "min_samples": report.min_samples,
        "layers": [
            {
                "path": b.path,
                "training": b.training,
                "seen": b.seen,
                "samples": b.samples,
                "statistics": b.statistics.value,
                "synchronized": b.synchronized,
                "moving": b.moving.value,
            }
            for b in report.layers
        ],
    }


def report_from_dict(doc: dict[str, Any]) -> ReplicaReport:
    return ReplicaReport(
        setup=ReplicaSetup(Engine(doc["engine"]), int(doc["replicas"]), doc["name"]),
        min_samples=int(doc["min_samples"]),
        layers=tuple(
            BatchNormSamples(
                path=b["path"],
                training=b["training"],
                seen=b["seen"],
                samples=b["samples"],
                statistics=Statistics(b["statistics"]),
                synchronized=b["synchronized"],
                moving=MovingStatistics(b["moving"]),
            )
            for b in doc["layers"]
        ),
    )


class UnsupportedBackend(BnfreezeError):
    """--replicas simulates devices on TensorFlow and JAX only."""


def simulate_devices(backend: str, replicas: int) -> Any:
    """Give this fresh process ``replicas`` simulated CPU devices, before Keras starts: JAX's
    forced host platform device count (returns None), or TensorFlow logical devices and the
    ``MirroredStrategy`` over them (returned)."""
    if backend == "jax":
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={replicas}"
        ).strip()
        return None
    if backend == "tensorflow":
        tf = importlib.import_module("tensorflow")
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * replicas
        )
        return tf.distribute.MirroredStrategy()
    raise UnsupportedBackend(f"--replicas runs on TensorFlow or JAX, not {backend}.")


def _child(path: str, replicas: int, batch_size: int, min_samples: int) -> dict[str, Any]:
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    try:
        strategy = simulate_devices(backend, replicas)
    except UnsupportedBackend as error:
        return {"error": str(error)}
    import warnings

    import keras

    from bnfreeze.runtime.batches import build_batches
    from bnfreeze.runtime.guard import BatchNormGuard

    if backend == "jax":
        devices = keras.distribution.list_devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))

    def load() -> Any:
        model = keras.models.load_model(path, compile=False, safe_mode=True)
        model.compile(keras.optimizers.SGD(0.0), "mse")
        return model

    if strategy is not None:
        with strategy.scope():
            model = load()
    else:
        model = load()
    batches = build_batches(keras, model, None, None, 1, batch_size, 0)
    guard = BatchNormGuard(min_samples=min_samples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(
            batches.xs[0],
            batches.ys_for("real")[0],
            batch_size=batch_size,
            epochs=1,
            verbose=0,
            shuffle=False,
            callbacks=[guard],
        )
    report = guard.report.replicas if guard.report is not None else None
    if report is None:
        return {"error": "the guard measured no batch."}
    return report_to_dict(report)


if __name__ == "__main__":
    path, replicas, batch_size, min_samples = sys.argv[1], *map(int, sys.argv[2:5])
    try:
        doc = _child(path, replicas, batch_size, min_samples)
    except Exception as exc:  # reported to the parent as one line
        doc = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    print(json.dumps(doc))
