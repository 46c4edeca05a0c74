"""Every Keras-backed part of bnfreeze, measured on each Keras 3 backend.

``verify``, ``explain``, ``freeze --engine keras`` and the in-memory API run in one fresh
subprocess per backend (a process holds one backend): TensorFlow, JAX with TensorFlow made
unimportable (what a ``pip install 'bnfreeze[jax]'`` venv has), JAX chosen by ``keras.json``
alone (``KERAS_HOME`` pointing at a temporary folder, no ``KERAS_BACKEND``), and PyTorch
when it is installed. bnfreeze never picks the backend: each run checks that the one
Keras resolved is the one reported, and the truth of each claim is a real training step
measured in the subprocess (which variables moved), not bnfreeze's own rule.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from paths import ROOT

pytestmark = pytest.mark.keras

SAMPLES = ROOT / "sample_models"

#: Run in the subprocess. argv: hidden modules (comma-separated), results file, scratch dir.
SCRIPT = r"""
import sys
for name in sys.argv[1].split(","):
    if name:
        sys.modules[name] = None
import json, os
from pathlib import Path
from click.testing import CliRunner
from bnfreeze.cli import cli

out_file, scratch, samples = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
results = {}

def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return {"exit": result.exit_code, "stdout": result.stdout, "stderr": result.stderr}

results["verify"] = run("verify", samples / "sequential.keras", "--json")
results["explain"] = run("explain", "--json")
frozen = scratch / "engine.keras"
results["engine"] = run(
    "freeze", samples / "sequential.keras", "--engine", "keras", "--bn-inference", "-o", frozen
)

import keras
import numpy as np
import warnings
import bnfreeze

results["backend"] = keras.backend.backend()
results["tensorflow_imported"] = sys.modules.get("tensorflow") is not None
loaded = keras.models.load_model(frozen)
results["engine_flags"] = {
    layer.name: layer.trainable
    for layer in loaded.layers
    if isinstance(layer, keras.layers.BatchNormalization)
}
if os.environ.get("BNFREEZE_TEST_CLI_ONLY"):
    Path(out_file).write_text(json.dumps(results))
    sys.exit(0)

def numbers(model):
    return {v.path: np.array(keras.ops.convert_to_numpy(v), copy=True) for v in model.weights}

def build():
    keras.utils.set_random_seed(0)
    inp = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inp, keras.layers.Dense(2, name="head")(x))
    model.compile(optimizer="sgd", loss="mse")
    return model

def one_step(model):
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 2.0, (4, 4, 4, 3)).astype("float32")
    y = rng.normal(0.0, 1.0, (4, 2)).astype("float32")
    before = numbers(model)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    after = numbers(model)
    return sorted(path for path in before if not np.array_equal(before[path], after[path]))

control = build()
results["api_control_moved"] = one_step(control)
model = build()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    edit = bnfreeze.freeze(model, bn_inference=True)
results["api_changes"] = len(edit.changes)
results["api_warnings"] = sorted(
    {type(w.message).__name__ for w in caught} - {"DeprecationWarning", "FutureWarning"}
)
report = bnfreeze.inspect(model)
results["api_predicted"] = report.state("bn").in_fit.normalizes_with.value
bnfreeze.recompile(model)
results["api_moved"] = one_step(model)

# A flag changed after fit(): ignored (TensorFlow) or an error (JAX) until compile() again.
def fitted_then_frozen():
    model = build()
    model.fit(np.full((4, 4, 4, 3), 5.0, "float32"), np.zeros((4, 2), "float32"), verbose=0)
    model.get_layer("bn").trainable = False
    return model

def attempt(step):
    try:
        return {"raised": None, "moved": step()}
    except Exception as exc:
        return {"raised": type(exc).__name__, "moved": None}

late = fitted_then_frozen()
results["after_fit"] = attempt(lambda: one_step(late))
results["after_failed_fit_recompiled"] = attempt(lambda: one_step(bnfreeze.recompile(late)))
results["after_recompile"] = attempt(lambda: one_step(bnfreeze.recompile(fitted_then_frozen())))
results["tensorflow_imported"] = sys.modules.get("tensorflow") is not None
Path(out_file).write_text(json.dumps(results))
"""


def start(tmp_path: Path, hidden: str = "", **env: str) -> subprocess.Popen[str]:
    """Start one configuration's measurement; :func:`finish` collects it. They run side by
    side (a process holds one backend, and CI has two cores)."""
    # The configuration decides the backend, never the caller's own KERAS_BACKEND/KERAS_HOME.
    inherited = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "KERAS_HOME")}
    full_env = {**inherited, "TF_CPP_MIN_LOG_LEVEL": "3", "COLUMNS": "100", **env}
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    paths = (str(tmp_path), str(SAMPLES))
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, hidden, str(tmp_path / "results.json"), *paths],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=tmp_path,
    )


def finish(process: subprocess.Popen[str], tmp_path: Path) -> dict:
    try:
        _, stderr = process.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 0, stderr[-3000:]
    return json.loads((tmp_path / "results.json").read_text())


def _keras_json(folder: Path, backend: str) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "keras.json").write_text(json.dumps({"backend": backend}), encoding="utf-8")
    return {"KERAS_HOME": str(folder)}


#: How each configuration is set up: (modules hidden, environment), and the backend expected.
CONFIGURATIONS = {
    # keras.json says jax: the variable must win over it.
    "tensorflow": ("", {"KERAS_BACKEND": "tensorflow"}, "jax", "tensorflow"),
    # A jax install: TensorFlow cannot be imported.
    "jax-variable": ("tensorflow,tf_keras", {"KERAS_BACKEND": "jax"}, "tensorflow", "jax"),
    # No variable at all: keras.json alone picks jax, as Keras does (the commands only: the
    # in-memory API's backend is whatever Keras loaded, measured above).
    "jax-keras-json": ("tensorflow,tf_keras", {"BNFREEZE_TEST_CLI_ONLY": "1"}, "jax", "jax"),
    "torch": ("", {"KERAS_BACKEND": "torch"}, "tensorflow", "torch"),
}


def _available(name: str) -> bool:
    return CONFIGURATIONS[name][3] != "torch" or importlib.util.find_spec("torch") is not None


@pytest.fixture(scope="module")
def all_measured(tmp_path_factory):
    """Every available configuration, measured in parallel subprocesses."""
    started = {}
    for name, (hidden, env, json_backend, _) in CONFIGURATIONS.items():
        if _available(name):
            tmp = tmp_path_factory.mktemp(name)
            env = {**env, **_keras_json(tmp / "keras-home", json_backend)}
            started[name] = (start(tmp, hidden, **env), tmp)
    try:
        return {name: finish(process, tmp) for name, (process, tmp) in started.items()}
    finally:
        for process, _ in started.values():
            if process.poll() is None:
                process.kill()


@pytest.fixture(params=list(CONFIGURATIONS))
def measured(request):
    if not _available(request.param):
        pytest.skip("torch is not installed (its wheels are several GB; measured when present)")
    results = request.getfixturevalue("all_measured")
    return request.param, CONFIGURATIONS[request.param][3], results[request.param]


def test_the_backend_keras_resolves_is_the_one_used_and_reported(measured):
    _, backend, results = measured
    assert results["backend"] == backend
    label = {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}[backend]
    for key in ("verify", "explain", "engine"):
        assert f"bnfreeze: loading Keras ({label} backend)" in results[key]["stderr"], key
    assert "loading TensorFlow" not in results["verify"]["stderr"]
    for key in ("verify", "explain"):
        assert json.loads(results[key]["stdout"])["runtime"]["backend"] == backend


def test_jax_runs_without_tensorflow(measured):
    name, _, results = measured
    if not name.startswith("jax"):
        pytest.skip("JAX configurations only")
    assert results["tensorflow_imported"] is False


def test_verify_measures_and_agrees(measured):
    _, _, results = measured
    verify = results["verify"]
    assert verify["exit"] == 0, verify["stderr"]
    document = json.loads(verify["stdout"])
    assert document["summary"]["agree"] is True
    moved = {layer["path"]: layer["moving_stats"] for layer in document["layers"]}
    # sequential.keras: bn_1 trainable (trains in fit), bn_2 frozen (inference).
    assert moved["bn_1"] == "moved" and moved["bn_2"] == "unchanged"


def test_explain_measures_the_four_cases(measured):
    _, _, results = measured
    explain = results["explain"]
    assert explain["exit"] == 0, explain["stderr"]
    cases = {
        (case["training"], case["trainable"]): case
        for case in json.loads(explain["stdout"])["cases"]
    }
    assert cases[(True, True)]["normalizes_with"] == "batch"
    assert cases[(True, True)]["moving_stats_updated"] is True
    for key in ((True, False), (False, True), (False, False)):
        assert cases[key]["normalizes_with"] == "moving", key
        assert cases[key]["moving_stats_updated"] is False, key


def test_the_keras_engine_writes_the_flags(measured):
    _, _, results = measured
    assert results["engine"]["exit"] == 0, results["engine"]["stderr"]
    assert results["engine_flags"] == {"bn_1": False, "bn_2": False}


def test_the_in_memory_api_freezes_bn_for_a_real_step(measured):
    if "api_moved" not in measured[2]:
        pytest.skip("this configuration runs the commands only")
    _, _, results = measured
    # The control shows the step can move BN: a trainable BN moves its statistics in fit().
    control = results["api_control_moved"]
    assert any(path.startswith("bn/moving_mean") for path in control), control
    assert results["api_changes"] == 1
    assert results["api_warnings"] == ["RecompileWarning"]
    assert results["api_predicted"] == "moving"
    moved = results["api_moved"]
    assert not any(path.startswith("bn/") for path in moved), moved
    assert any(path.startswith("conv/") for path in moved), moved
    assert any(path.startswith("head/") for path in moved), moved


def test_explain_converts_tensors_with_keras_ops_not_numpy():
    """On the torch backend the BN output requires grad, and ``np.asarray`` on it raises
    "Can't call numpy() on Tensor that requires grad". explain converts with
    ``keras.ops.convert_to_numpy`` (measured for real above when torch is installed)."""
    import types

    from bnfreeze.runtime import explain

    class GradTensor:
        def __array__(self, dtype=None, copy=None):
            raise RuntimeError("Can't call numpy() on Tensor that requires grad.")

    fake = types.SimpleNamespace(
        ops=types.SimpleNamespace(convert_to_numpy=lambda value: [1.0, 2.0])
    )
    assert explain._to_numpy(fake, GradTensor()).tolist() == [1.0, 2.0]
    tf_keras_like = types.SimpleNamespace()  # no keras.ops: np.asarray
    assert explain._to_numpy(tf_keras_like, [3.0]).tolist() == [3.0]


def test_a_flag_changed_after_fit_counts_only_after_compile(measured):
    """After fit(), ``bn.trainable = False`` is silently ignored on TensorFlow (the BN still
    moves its statistics) and makes the next fit() raise on JAX, after which the model cannot
    train at all; compile() with a fresh optimizer first (bnfreeze.recompile) and it counts."""
    if "api_moved" not in measured[2]:
        pytest.skip("this configuration runs the commands only")
    _, backend, results = measured
    late = results["after_fit"]
    if backend == "tensorflow":
        assert late["raised"] is None
        assert any(path.startswith("bn/moving_mean") for path in late["moved"]), late
    elif backend == "jax":
        assert late["raised"] == "ValueError", late
        assert results["after_failed_fit_recompiled"]["raised"] is not None
    fixed = results["after_recompile"]
    assert fixed["raised"] is None, fixed
    assert not any(path.startswith("bn/") for path in fixed["moved"]), fixed
    assert any(path.startswith("conv/") for path in fixed["moved"]), fixed
