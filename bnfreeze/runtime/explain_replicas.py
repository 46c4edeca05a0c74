"""``bnfreeze explain --replicas N``: the seed experiment under simulated data parallelism.

One BatchNormalization layer (gamma 2, beta 1, moving mean 0, moving variance 1, Keras's
momentum and epsilon) trains one ``fit()`` step on N simulated devices: TensorFlow with
``tf.distribute.MirroredStrategy`` (``synchronized`` off, then on), JAX with
``keras.distribution.DataParallel``. The global batch holds 2 samples of 4 channels per
replica, and replica ``r``'s slice is shifted by ``10 * r``, so the slices' means differ.

Measured, never assumed: the layer's output in ``fit()`` is compared (by two metrics, learning
rate 0) with the batch normalized by each slice's statistics and by the global batch's,
computed here with numpy, and the moving statistics after the step with the candidates they
could be. The step runs in a child process (``python -m bnfreeze.runtime.explain_replicas``)
because simulated devices must be set before the backend starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from bnfreeze.errors import BnfreezeError

PER_REPLICA = 2  # samples per replica
CHANNELS = 4
GAMMA, BETA = 2.0, 1.0
MOMENTUM, EPSILON = 0.99, 1e-3
_ATOL = 1e-4


@dataclass(frozen=True)
class SliceStatistics:
    """Channel 0's batch statistics of one slice (or of the global batch)."""

    name: str  # "replica 1", ..., "global"
    samples: int
    mean: float
    variance: float


@dataclass(frozen=True)
class ReplicaCase:
    """One engine setting: what the layer normalized with, and its moving statistics after."""

    engine: str
    synchronized: bool
    refused: str | None  # Keras refused to make the layer (synchronized=True off TensorFlow)
    normalized_with: str | None  # "per-replica" or "global", from the output; None: neither
    distance_per_replica: float | None
    distance_global: float | None
    moving_mean: float | None  # channel 0
    moving_variance: float | None
    moving_from: str | None  # "global", "replica 1", ..., "replica average", or None


@dataclass(frozen=True)
class ExplainReplicasReport:
    backend: str
    replicas: int
    slices: tuple[SliceStatistics, ...]
    cases: tuple[ReplicaCase, ...]


class ExplainReplicasError(BnfreezeError):
    """The data-parallel experiment could not run."""


def batch(replicas: int) -> Any:
    """The global batch: replica r's slice is the seed's whole numbers 0-9 plus 10 * r."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, 10, (replicas * PER_REPLICA, CHANNELS)).astype("float32")
    for r in range(replicas):
        x[r * PER_REPLICA : (r + 1) * PER_REPLICA] += 10.0 * r
    return x


def explain_replicas(replicas: int, *, backend: str | None = None) -> ExplainReplicasReport:
    """Run the experiment on ``replicas`` simulated devices in a child process."""
    if replicas < 2:
        raise ExplainReplicasError(f"--replicas takes 2 or more devices, not {replicas}.")
    env = dict(os.environ)
    env["KERAS_BACKEND"] = backend or env.get("KERAS_BACKEND") or "tensorflow"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", "bnfreeze.runtime.explain_replicas", str(replicas)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["no output"]
        raise ExplainReplicasError(f"the data-parallel experiment failed: {last[0]}")
    return _report(json.loads(lines[-1]), replicas)


def _report(doc: dict[str, Any], replicas: int) -> ExplainReplicasReport:
    import numpy as np

    x = batch(replicas)
    slices = [x[r * PER_REPLICA : (r + 1) * PER_REPLICA] for r in range(replicas)]
    stats = [
        SliceStatistics(f"replica {r + 1}", len(s), float(s[:, 0].mean()), float(s[:, 0].var()))
        for r, s in enumerate(slices)
    ]
    stats.append(SliceStatistics("global", len(x), float(x[:, 0].mean()), float(x[:, 0].var())))
    candidates = {s.name: (s.mean, s.variance) for s in stats}
    candidates["replica average"] = (
        float(np.mean([s.mean for s in stats[:-1]])),
        float(np.mean([s.variance for s in stats[:-1]])),
    )
    cases = []
    for c in doc["cases"]:
        if c.get("refused"):
            cases.append(ReplicaCase(doc["engine"], c["synchronized"], c["refused"], *([None] * 6)))
            continue
        d_rep, d_glob = c["distance_per_replica"], c["distance_global"]
        normalized = (
            "per-replica"
            if d_rep < _ATOL < d_glob
            else ("global" if d_glob < _ATOL < d_rep else None)
        )
        mean, variance = c["moving_mean"], c["moving_variance"]
        moving_from = next(
            (
                name
                for name, (m, v) in candidates.items()
                if abs(mean - (1 - MOMENTUM) * m) < _ATOL
                and abs(variance - (MOMENTUM + (1 - MOMENTUM) * v)) < _ATOL
            ),
            None,
        )
        cases.append(
            ReplicaCase(
                doc["engine"],
                c["synchronized"],
                None,
                normalized,
                d_rep,
                d_glob,
                mean,
                variance,
                moving_from,
            )
        )
    return ExplainReplicasReport(doc["backend"], replicas, tuple(stats), tuple(cases))


# --------------------------------------------------------------------------- the child


def _child(replicas: int) -> dict[str, Any]:
    from bnfreeze.runtime.replicas_run import UnsupportedBackend, simulate_devices

    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    try:
        strategy = simulate_devices(backend, replicas)
    except UnsupportedBackend as error:
        raise ExplainReplicasError(str(error)) from None
    import keras

    if backend == "jax":
        devices = keras.distribution.list_devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    x = batch(replicas)
    y = _targets(x, replicas)
    cases: list[dict[str, Any]] = []
    for synchronized in (False, True):
        try:
            if strategy is not None:
                with strategy.scope():
                    model = _build(keras, synchronized)
            else:
                model = _build(keras, synchronized)
        except ValueError as exc:
            cases.append({"synchronized": synchronized, "refused": str(exc)})
            continue
        cases.append(_case(model, x, y, synchronized))
    engine = "MirroredStrategy" if strategy is not None else "DataParallel"
    return {"backend": backend, "engine": engine, "cases": cases}


def _targets(x: Any, replicas: int) -> Any:
    """``x`` normalized per replica (the first CHANNELS columns) and over the whole batch
    (the last CHANNELS), with the layer's gamma and beta."""
    import numpy as np

    def normalized(a: Any) -> Any:
        return GAMMA * (a - a.mean(0)) / np.sqrt(a.var(0) + EPSILON) + BETA

    per_replica = np.concatenate(
        [normalized(x[r * PER_REPLICA : (r + 1) * PER_REPLICA]) for r in range(replicas)]
    )
    return np.concatenate([per_replica, normalized(x)], axis=1)


def _build(keras: Any, synchronized: bool) -> Any:
    """One BN layer whose output is compared with both targets: the metrics say which it
    normalized like."""
    inputs = keras.Input((CHANNELS,))
    bn = keras.layers.BatchNormalization(
        momentum=MOMENTUM,
        epsilon=EPSILON,
        gamma_initializer=keras.initializers.Constant(GAMMA),
        beta_initializer=keras.initializers.Constant(BETA),
        synchronized=synchronized,
        name="bn",
    )
    h = bn(inputs)
    model = keras.Model(inputs, keras.layers.Concatenate()([h, h]))

    def to_per_replica(t: Any, p: Any) -> Any:
        return keras.ops.mean(keras.ops.square(t[:, :CHANNELS] - p[:, :CHANNELS]))

    def to_global(t: Any, p: Any) -> Any:
        return keras.ops.mean(keras.ops.square(t[:, CHANNELS:] - p[:, CHANNELS:]))

    model.compile(keras.optimizers.SGD(0.0), "mse", metrics=[to_per_replica, to_global])
    return model


def _case(model: Any, x: Any, y: Any, synchronized: bool) -> dict[str, Any]:
    """One step of fit() on the whole batch: how far the output was from each target, and
    the moving statistics it left."""
    import numpy as np

    h = model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False).history
    layer = model.get_layer("bn")
    return {
        "synchronized": synchronized,
        "distance_per_replica": float(h["to_per_replica"][0]),
        "distance_global": float(h["to_global"][0]),
        "moving_mean": float(np.asarray(layer.moving_mean.numpy())[0]),
        "moving_variance": float(np.asarray(layer.moving_variance.numpy())[0]),
    }


if __name__ == "__main__":
    print(json.dumps(_child(int(sys.argv[1]))))
