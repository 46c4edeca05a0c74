import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# XLA compiles each traced train step for the CPU; the suite's models are tiny and run a few
# batches, so compiling is most of their cost. Without the expensive LLVM passes the JAX guard
# scenarios took 33 s of CPU instead of 59 s (MobileNetV2's jitted step: 34 s instead of 60 s
# under load); what the tests measure (which variables moved, which branch each BN took,
# weights with and without a callback) is compared within one run. The workers' subprocesses
# inherit it. A user's own XLA_FLAGS win.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"


def pytest_configure(config):
    """Compile bnfreeze's modules once, before the workers start: the suite runs bnfreeze in
    about a hundred fresh interpreters, and where ``PYTHONDONTWRITEBYTECODE`` is set (CI) each
    of them compiled every module it imported again (0.1 s of 0.3 s for ``inspect``)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        import compileall

        compileall.compile_dir(ROOT / "bnfreeze", quiet=1)


#: The longest files without Keras (a type check, kill points, fuzzing, crafted HDF5 files):
#: handed out first in the fast lane too.
LONG_FILES = (
    "tests/test_types.py",
    "tests/formats/test_atomic_interrupt.py",
    "tests/cli/test_fuzz.py",
    "tests/formats/test_readers_hdf5.py",
    "tests/cli/test_output.py",
    "tests/test_packaging.py",
    "tests/formats/test_integrity.py",
)


def pytest_collection_modifyitems(config, items):
    """Keras tests first, then the longest other files: pytest-xdist hands out whole files
    in this order (--dist loadfile), so the short files fill the end of the run on both
    workers instead of one worker finishing a long file alone. Otherwise the order is kept."""

    def weight(item) -> tuple[bool, bool]:
        keras = item.get_closest_marker("keras") is not None
        return (not keras, item.nodeid.split("::")[0] not in LONG_FILES)

    items.sort(key=weight)


def pytest_ignore_collect(collection_path, config):
    """In the fast lane (``-m "not keras"``), a module whose every test is marked keras
    (``pytestmark = pytest.mark.keras``) is not even imported: its tests would all be
    deselected, after each worker had rewritten its asserts (a third of the suite's lines)."""
    if config.option.markexpr.replace(" ", "") != "notkeras":
        return None
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    text = collection_path.read_text(encoding="utf-8")
    return True if re.search(r"^pytestmark = pytest\.mark\.keras$", text, re.M) else None


@pytest.fixture(scope="session", autouse=True)
def _warm_interpreters(tmp_path_factory) -> None:
    """Keras scripts run by ``tests/support/warm.py`` share its servers across the workers."""
    import warm

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, shared by its workers
    folder = root / "warm"
    folder.mkdir(exist_ok=True)
    warm.configure(folder)


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


# --- Real Keras models, built once per session (see tests/support/keras_truth.py) ---------
# Each fixture saves a small keras.applications model (weights=None, 32x32) to a temporary
# `.keras` file and returns its path. Tests load their own copy, so training one never
# affects another.


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The file ``name``, written by ``build(path)`` once per run: by the first pytest-xdist
    worker that asks for it (under a file lock, into a scratch folder, then renamed into
    place), and read by the others. Every test loads its own copy of the model from it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, shared by its workers
    root = root / "built_once"
    root.mkdir(exist_ok=True)
    path = root / name
    with FileLock(root / f"{name}.lock"):
        if not path.exists():
            scratch = Path(tempfile.mkdtemp(dir=root))
            build(scratch / name)
            os.replace(scratch / name, path)
            scratch.rmdir()
    return path


def _save_application(tmp_path_factory, name, build):
    def save(path: Path) -> None:
        import keras

        keras.utils.set_random_seed(1234)
        build(keras).save(path)

    return built_once(tmp_path_factory, f"{name}.keras", save)


@pytest.fixture(scope="session")
def guide_phase2_keras(tmp_path_factory) -> Path:
    """The Keras transfer-learning guide, phase 2: a MobileNetV2 backbone (alpha 0.35) called
    with training=False, trained one step frozen, then base.trainable=True and recompiled."""

    def build(keras):
        import numpy as np

        base = keras.applications.MobileNetV2(
            input_shape=(32, 32, 3), include_top=False, weights=None, alpha=0.35
        )
        base.trainable = False
        inputs = keras.Input((32, 32, 3), name="image")
        x = base(inputs, training=False)
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
        outputs = keras.layers.Dense(2, name="head")(x)
        model = keras.Model(inputs, outputs, name="guide_phase2")
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", run_eagerly=True)
        rng = np.random.default_rng(0)
        model.fit(rng.normal(5, 2, (4, 32, 32, 3)), rng.normal(size=(4, 2)), verbose=0)
        base.trainable = True
        model.compile(optimizer=keras.optimizers.Adam(1e-5), loss="mse")
        return model

    return _save_application(tmp_path_factory, "guide_phase2", build)


@pytest.fixture(scope="session")
def mobilenetv3small_keras(tmp_path_factory) -> Path:
    """MobileNetV3Small with its first half of layers frozen (BN and conv alike)."""

    def build(keras):
        model = keras.applications.MobileNetV3Small(
            input_shape=(32, 32, 3), include_top=False, weights=None
        )
        for layer in model.layers[: len(model.layers) // 2]:
            layer.trainable = False
        return model

    return _save_application(tmp_path_factory, "mobilenetv3small", build)


@pytest.fixture(scope="session")
def efficientnetb0_keras(tmp_path_factory) -> Path:
    """EfficientNetB0 with every BN layer frozen (the "BN in inference" recipe); it also
    has a preprocessing Normalization layer, which is not BN."""

    def build(keras):
        model = keras.applications.EfficientNetB0(
            input_shape=(32, 32, 3), include_top=False, weights=None
        )
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
        return model

    return _save_application(tmp_path_factory, "efficientnetb0", build)


@pytest.fixture(scope="session")
def guide_phase2_bn_inference_keras(guide_phase2_keras, tmp_path_factory) -> Path:
    """The guide's phase 2 done right on Keras 3 (the ``--bn-inference`` recipe), built with
    Keras itself: the same model with trainable=False on every BN layer, recompiled."""

    def build(path: Path) -> None:
        import warnings

        import keras

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Skipping variable loading for optimizer ..."
            model = keras.models.load_model(guide_phase2_keras)
        frozen = 0
        for layer in model._flatten_layers(include_self=False, recursive=True):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
                frozen += 1
        assert frozen > 0
        model.compile(optimizer=keras.optimizers.Adam(1e-5), loss="mse")
        model.save(path)

    return built_once(tmp_path_factory, "guide_phase2_bn_inference.keras", build)


@pytest.fixture(scope="session")
def guide_phase2_trained_keras(tmp_path_factory) -> Path:
    """The Keras guide recipe with a *pretrained-like* MobileNetV2 backbone (alpha 0.35):
    its BN moving statistics are those of the data (calibrated with momentum 0), so in
    inference mode every layer passes gradients. Phase 1: base.trainable=False, called with
    training=False, head trained one step. Phase 2: base.trainable=True, recompiled with
    Adam(1e-5) and trained one step, so the file carries a full optimizer state."""

    def build(keras):
        import numpy as np

        rng = np.random.default_rng(0)
        x = rng.normal(5.0, 2.0, (8, 32, 32, 3)).astype("float32")
        y = rng.normal(size=(8, 2)).astype("float32")
        base = keras.applications.MobileNetV2(
            input_shape=(32, 32, 3), include_top=False, weights=None, alpha=0.35
        )
        bns = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
        for bn in bns:
            bn.momentum = 0.0  # one step sets the moving statistics to the batch's
        base.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", run_eagerly=True)
        base.fit(x, np.zeros((8, *base.output.shape[1:]), "float32"), batch_size=8, verbose=0)
        for bn in bns:
            bn.momentum = 0.99
        base.trainable = False
        inputs = keras.Input((32, 32, 3), name="image")
        h = base(inputs, training=False)
        h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
        model = keras.Model(inputs, keras.layers.Dense(2, name="head")(h), name="guide_phase2")
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", run_eagerly=True)
        model.fit(x, y, batch_size=8, verbose=0)
        base.trainable = True
        model.compile(optimizer=keras.optimizers.Adam(1e-5), loss="mse", run_eagerly=True)
        model.fit(x, y, batch_size=8, verbose=0)
        return model

    return _save_application(tmp_path_factory, "guide_phase2_trained", build)


@pytest.fixture(scope="session")
def nested_deep_keras(tmp_path_factory) -> Path:
    """BN layers at depths 0 to 3: model ``deep`` holds Functional ``middle``, which holds
    Functional ``inner``, which holds Sequential ``core``. Compiled with Adam and trained one
    step, so the file carries optimizer state; then ``core`` (two deep, with its layers) and
    ``inner_dense`` (two deep) are frozen."""
    import keras
    import numpy as np

    layers = keras.layers
    keras.utils.set_random_seed(5)
    core = keras.Sequential(
        [
            keras.Input((4,)),
            layers.Dense(4, name="core_dense"),
            layers.BatchNormalization(name="core_bn"),
        ],
        name="core",
    )
    inner_in = keras.Input((4,), name="inner_in")
    h = layers.BatchNormalization(name="inner_bn")(layers.Dense(4, name="inner_dense")(inner_in))
    inner = keras.Model(inner_in, core(h), name="inner")
    middle_in = keras.Input((4,), name="middle_in")
    middle = keras.Model(
        middle_in, layers.BatchNormalization(name="middle_bn")(inner(middle_in)), name="middle"
    )
    x = keras.Input((4,), name="x")
    h = layers.BatchNormalization(name="bn")(middle(x))
    model = keras.Model(x, layers.Dense(1, name="head")(h), name="deep")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", run_eagerly=True)
    rng = np.random.default_rng(5)
    model.fit(rng.normal(5, 2, (8, 4)), rng.normal(size=(8, 1)), batch_size=8, verbose=0)
    core.trainable = False
    inner.get_layer("inner_dense").trainable = False
    path = tmp_path_factory.mktemp("nested_deep") / "nested_deep.keras"
    model.save(path)
    return path


# --- Custom classes, provided the way users do: a .py file passed as --custom-objects -------

CUSTOM_LAYERS_SOURCE = '''"""Custom classes for bnfreeze's tests (--custom-objects this_file.py)."""
import keras


@keras.saving.register_keras_serializable(package="bnfreeze_test")
class MyBN(keras.layers.BatchNormalization):
    """A BatchNormalization subclass: only isinstance() can tell it is BN."""


@keras.saving.register_keras_serializable(package="bnfreeze_test")
class TinyNet(keras.Model):
    """A subclassed model: its config does not list the layers it creates."""

    def __init__(self, units=4, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = keras.layers.Dense(units, name="dense")
        self.bn = keras.layers.BatchNormalization(name="bn")
        self.head = keras.layers.Dense(1, name="head")

    def call(self, x, training=None):
        return self.head(self.bn(self.dense(x), training=training))

    def get_config(self):
        return {**super().get_config(), "units": self.units}
'''


@pytest.fixture(scope="session")
def custom_layers_file(tmp_path_factory) -> Path:
    """A ``.py`` file defining MyBN (a BN subclass) and TinyNet (a subclassed model)."""
    path = tmp_path_factory.mktemp("custom") / "my_layers.py"
    path.write_text(CUSTOM_LAYERS_SOURCE)
    return path


@pytest.fixture(scope="session")
def custom_bn_keras(custom_layers_file, tmp_path_factory) -> Path:
    """Dense -> MyBN -> BatchNormalization -> Dense, compiled and trained one step (Adam)."""
    import keras
    import numpy as np

    from bnfreeze.runtime.loading import load_custom_objects

    my = load_custom_objects(str(custom_layers_file))
    keras.utils.set_random_seed(3)
    inputs = keras.Input((4,), name="x")
    h = keras.layers.Dense(8, name="d")(inputs)
    h = my["MyBN"](name="my_bn")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    model = keras.Model(inputs, keras.layers.Dense(1, name="o")(h), name="custom_bn")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.MeanSquaredError())
    rng = np.random.default_rng(3)
    model.fit(rng.normal(5, 2, (16, 4)), rng.normal(size=(16, 1)), batch_size=8, verbose=0)
    path = tmp_path_factory.mktemp("custom_bn") / "custom_bn.keras"
    model.save(path)
    return path


@pytest.fixture(scope="session")
def subclassed_keras(custom_layers_file, tmp_path_factory) -> Path:
    """A TinyNet (subclassed model) with dense, bn and head, built and saved uncompiled."""
    import keras
    import numpy as np

    from bnfreeze.runtime.loading import load_custom_objects

    my = load_custom_objects(str(custom_layers_file))
    keras.utils.set_random_seed(4)
    model = my["TinyNet"](name="tiny")
    model(np.zeros((1, 3), "float32"))
    path = tmp_path_factory.mktemp("subclassed") / "tiny.keras"
    model.save(path)
    return path


# --- The figures behind docs/guarantees.md (tests/support/guarantees.py) -----------------


def pytest_sessionfinish(session):
    """On a pytest-xdist worker, hand what its tests tried to the controller."""
    workeroutput = getattr(session.config, "workeroutput", None)
    guarantees = sys.modules.get("guarantees")
    if workeroutput is not None and guarantees is not None:
        workeroutput["guarantees_ran"] = dict(guarantees.ran)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """On the controller: add up what each worker's tests tried."""
    ran = getattr(node, "workeroutput", {}).get("guarantees_ran")
    if ran:
        import guarantees

        for key, n in ran.items():
            guarantees.count(key, n)


def pytest_terminal_summary(terminalreporter, config):
    """Print what the robustness tests tried, and save it to tests/.guarantees.json."""
    if hasattr(config, "workerinput"):
        return
    guarantees = sys.modules.get("guarantees")
    if guarantees is None or not guarantees.ran:
        return
    guarantees.write_summary()
    terminalreporter.write_sep("-", "bnfreeze guarantees: tried this run (tests/.guarantees.json)")
    planned = guarantees.planned()
    for key, value in sorted(guarantees.ran.items()):
        terminalreporter.write_line(f"{key}: {value} (docs/guarantees.md: {planned.get(key, '-')})")


@pytest.fixture
def without_tf_keras(monkeypatch):
    """Make ``tf_keras`` look not installed, whether or not it is (it is in the test extra)."""
    import importlib.util

    find_spec = importlib.util.find_spec

    def hidden(name, *args, **kwargs):
        if name == "tf_keras" or name.startswith("tf_keras."):
            return None
        return find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", hidden)
    # A tf_keras imported by an earlier test must look absent too: None in sys.modules is
    # what an import that cannot work looks like.
    monkeypatch.setitem(sys.modules, "tf_keras", None)


# --- The fast lane: ``pytest -m "not keras"`` never imports Keras -------------------------

#: Importing any of these makes a test a Keras test, to be marked ``@pytest.mark.keras``.
HEAVY_MODULES = ("keras", "tensorflow", "jax", "tf_keras", "keras_hub", "torch")
_HEAVY_BEFORE = pytest.StashKey[frozenset[str]]()


def heavy_imported() -> frozenset[str]:
    # ``None`` in sys.modules is a module made unimportable (``without_tf_keras``), not loaded.
    return frozenset(name for name in HEAVY_MODULES if sys.modules.get(name) is not None)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """Importing a test module must not import Keras: the fast lane imports every module."""
    if not isinstance(collector, pytest.Module):
        return (yield)
    before = heavy_imported()
    report = yield
    new = heavy_imported() - before
    if new and report.passed:
        report.outcome = "failed"
        report.longrepr = (
            f"importing {collector.nodeid} imported {', '.join(sorted(new))}: import Keras "
            "inside the tests and fixtures that need it, never at module level"
        )
    return report


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item):
    item.stash[_HEAVY_BEFORE] = heavy_imported()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that is not marked ``keras`` and imports Keras (in its fixtures or its body)
    fails, so the marker stays honest. Only seen while nothing imported Keras before it: in
    the fast lane, that is every test."""
    report = yield
    if call.when == "call" and report.passed and item.get_closest_marker("keras") is None:
        new = heavy_imported() - item.stash.get(_HEAVY_BEFORE, frozenset())
        if new:
            report.outcome = "failed"
            report.longrepr = (
                f"{item.nodeid} imported {', '.join(sorted(new))} but is not marked keras: "
                "mark it @pytest.mark.keras (pytest -m 'not keras' must not import Keras)"
            )
    return report
