"""``bnfreeze.runtime.loading``: safe loading, custom objects, TensorFlow's noise kept off stdout,
progress on stderr, runtimes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from bnfreeze.errors import (
    BnfreezeError,
    ModelFormatError,
    RuntimeUnavailableError,
    UnsafeModelError,
)
from bnfreeze.model.measured import RuntimeInfo
from bnfreeze.model.records import Runtime
from bnfreeze.runtime import environment, loading

# --------------------------------------------------------------------------- unsafe content


KERAS3_LAMBDA = {
    "class_name": "Functional",
    "config": {
        "name": "m",
        "layers": [
            {"class_name": "InputLayer", "config": {"name": "x"}},
            {
                "class_name": "Lambda",
                "config": {
                    "name": "double",
                    "function": {"class_name": "__lambda__", "config": {"code": "4wEA..."}},
                },
            },
        ],
    },
}

TF_KERAS_LAMBDA = {
    "class_name": "Functional",
    "config": {
        "name": "m",
        "layers": [
            {
                "class_name": "Sequential",
                "config": {
                    "name": "inner",
                    "layers": [
                        {
                            "class_name": "Lambda",
                            "config": {
                                "name": "old_style",
                                "function": ["4wEA...", None, None],
                                "function_type": "lambda",
                            },
                        }
                    ],
                },
            }
        ],
    },
}


def test_unsafe_layers_keras3_and_tf_keras_styles():
    assert loading.unsafe_layers(KERAS3_LAMBDA) == ["double"]
    assert loading.unsafe_layers(TF_KERAS_LAMBDA) == ["old_style"]


def test_unsafe_content_outside_layers_is_found_too():
    config = {
        "class_name": "Functional",
        "config": {"name": "m", "layers": []},
        "compile_config": {"loss": {"class_name": "__lambda__", "config": {}}},
    }
    assert loading.unsafe_layers(config) == ["m"]


@pytest.mark.parametrize(
    "sample",
    [
        "seed_bn.keras",
        "guide_pattern.keras",
        "bn_under_frozen.keras",
        "sequential.keras",
        "nested_legacy.h5",
    ],
)
def test_samples_are_safe(samples, sample):
    from bnfreeze.formats.readers import read_model

    assert loading.unsafe_layers(read_model(samples / sample, weights=False).config) == []


def test_refuse_unsafe_names_the_option():
    with pytest.raises(UnsafeModelError) as info:
        loading.refuse_unsafe(KERAS3_LAMBDA, "m.keras", unsafe=False)
    assert str(info.value) == (
        "m.keras: layer double holds a Python lambda; loading the model would run code stored "
        "in the file, so bnfreeze refuses (Keras safe_mode). If you trust the file, pass "
        "--unsafe."
    )
    assert info.value.exit_code == 2
    loading.refuse_unsafe(KERAS3_LAMBDA, "m.keras", unsafe=True)  # no error


@pytest.fixture(scope="module")
def lambda_keras(tmp_path_factory) -> Path:
    import keras

    inputs = keras.Input((4,), name="x")
    h = keras.layers.Lambda(lambda t: t * 2.0, name="double")(inputs)
    model = keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(h))
    path = tmp_path_factory.mktemp("engine") / "lambda.keras"
    model.save(path)
    return path


@pytest.mark.keras
def test_load_model_refuses_lambda_and_loads_it_when_unsafe(lambda_keras):
    with pytest.raises(UnsafeModelError, match="--unsafe"):
        loading.load_model(lambda_keras)
    model = loading.load_model(lambda_keras, unsafe=True)
    assert [layer.name for layer in model.layers] == ["x", "double", "bn"]


@pytest.mark.keras
def test_keras_safe_mode_is_on_even_past_our_own_check(lambda_keras, monkeypatch):
    """Defence in depth: with bnfreeze's config scan disabled, Keras's safe_mode refuses."""
    monkeypatch.setattr(loading, "refuse_unsafe", lambda *a, **k: None)
    with pytest.raises(UnsafeModelError) as info:
        loading.load_model(lambda_keras)
    assert "Keras refused to load it in safe mode" in str(info.value)
    assert str(info.value).endswith("If you trust the file, pass --unsafe.")


@pytest.mark.keras
def test_refusal_happens_before_tensorflow_is_imported(lambda_keras):
    code = (
        "import sys\n"
        "from bnfreeze.runtime import loading\n"
        "from bnfreeze.errors import UnsafeModelError\n"
        f"try:\n    loading.load_model({str(lambda_keras)!r})\n"
        "except UnsafeModelError:\n    print('refused', 'tensorflow' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout == "refused False\n"


@pytest.mark.keras
def test_load_model_reads_only(samples, tmp_path):
    source = samples / "sequential.keras"
    copy = tmp_path / "sequential.keras"
    copy.write_bytes(source.read_bytes())
    before = (copy.read_bytes(), copy.stat().st_mtime_ns)
    model = loading.load_model(copy)
    assert [layer.name for layer in model.layers][:2] == ["dense_1", "bn_1"]
    assert (copy.read_bytes(), copy.stat().st_mtime_ns) == before


@pytest.mark.keras
def test_a_task_preset_without_keras_hub_is_one_clear_error(tmp_path, monkeypatch):
    """A keras-hub task's preset folder loads through its task class's from_preset; without
    keras_hub that is a one-line error naming it, not Keras's load of the backbone alone."""
    from code_built_files import bn, write_task_preset

    preset = write_task_preset(
        tmp_path / "preset", {"layers/batch_normalization": ("bn", bn())}, {}
    )
    monkeypatch.setitem(sys.modules, "keras_hub", None)
    with pytest.raises(ModelFormatError, match="task's preset folder, and keras_hub cannot be"):
        loading.load_model(preset, compile=False)


@pytest.mark.keras
def test_load_model_bad_files_are_bnfreeze_errors(tmp_path):
    with pytest.raises(ModelFormatError, match="no such file"):
        loading.load_model(tmp_path / "missing.keras")
    junk = tmp_path / "junk.keras"
    junk.write_text("junk")
    with pytest.raises(ModelFormatError, match="not a Keras model file"):
        loading.load_model(junk)


@pytest.mark.parametrize(
    ("exc", "config", "kind", "text"),
    [
        (
            ValueError("Requested the deserialization of a `Lambda` ... `safe_mode=False` ..."),
            {},
            UnsafeModelError,
            "--unsafe",
        ),
        (
            TypeError("<class Functional> could not be deserialized properly.\n\nconfig={...}"),
            {
                "class_name": "Functional",
                "config": {
                    "layers": [
                        {"class_name": "MyBN", "module": "my_layers", "config": {"name": "b"}}
                    ]
                },
            },
            ModelFormatError,
            "custom class(es) MyBN. Pass the module or .py file that defines "
            "them: --custom-objects my_layers.py.",
        ),
        (
            OSError("Unable to synchronously open file\n\nlots of detail"),
            {},
            ModelFormatError,
            "m.keras: Keras could not load the model: OSError: Unable to synchronously open file",
        ),
    ],
    ids=["safe-mode", "custom-class", "other"],
)
def test_keras_errors_become_one_line(exc, config, kind, text):
    error = loading._load_error("m.keras", exc, config)
    assert isinstance(error, kind)
    assert text in str(error)
    assert "\n" not in str(error)


# --------------------------------------------------------------------------- custom objects


def test_custom_objects_from_a_file_collects_what_it_defines(tmp_path):
    module = tmp_path / "layers.py"
    module.write_text(
        "import json\nfrom os.path import join\n"
        "class Scale:\n    pass\n"
        "def swish(x):\n    return x\n"
        "_private = 1\nCONSTANT = 3\n"
    )
    objects = loading.load_custom_objects(str(module))
    assert sorted(objects) == ["Scale", "swish"]


def test_custom_objects_dict_is_used_as_is(tmp_path):
    module = tmp_path / "declared.py"
    module.write_text("class A:\n    pass\nclass B:\n    pass\nCUSTOM_OBJECTS = {'Alias': A}\n")
    objects = loading.load_custom_objects(str(module))
    assert list(objects) == ["Alias"] and objects["Alias"].__name__ == "A"


def test_custom_objects_from_a_module_in_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "team_layers.py").write_text("class Block:\n    pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "team_layers", raising=False)
    assert list(loading.load_custom_objects("team_layers")) == ["Block"]


@pytest.mark.parametrize(
    ("source", "spec", "message"),
    [
        (None, "missing.py", "--custom-objects missing.py: no such file."),
        (None, "no_such_module_xyz", "--custom-objects no_such_module_xyz: cannot import it"),
        (
            "raise RuntimeError('boom')\n",
            "broken.py",
            "--custom-objects broken.py: importing it raised RuntimeError: boom",
        ),
        (
            "CUSTOM_OBJECTS = [1]\n",
            "listed.py",
            "--custom-objects listed.py: CUSTOM_OBJECTS must be a dict",
        ),
    ],
)
def test_custom_objects_errors(tmp_path, monkeypatch, source, spec, message):
    monkeypatch.chdir(tmp_path)
    if source is not None:
        (tmp_path / spec).write_text(source)
    with pytest.raises(BnfreezeError) as info:
        loading.load_custom_objects(spec)
    assert str(info.value).startswith(message)


# --------------------------------------------------------------------------- output hygiene


def test_quiet_sends_python_and_native_stdout_to_stderr(capfd):
    with environment.quiet():
        print("from python")
        os.write(1, b"from native code\n")
    print("after")
    out, err = capfd.readouterr()
    assert out == "after\n"
    assert "from python\n" in err and "from native code\n" in err


@pytest.mark.keras
def test_fresh_process_stays_lean_and_quiet(tmp_path):
    """Importing every module verify and explain use pulls in no TensorFlow; loading
    TensorFlow through the engine, first by way of a user's custom-objects file that imports
    Keras, prints nothing on stdout and hides TensorFlow's C++ start-up lines, even when the
    user's environment does not set TF_CPP_MIN_LOG_LEVEL."""
    layers = tmp_path / "user_layers.py"
    layers.write_text("import keras\n\nclass Scale(keras.layers.Layer):\n    pass\n")
    code = (
        "import sys\n"
        "import bnfreeze.cli, bnfreeze.runtime.verify, bnfreeze.runtime.explain\n"
        "import bnfreeze.runtime.loading\n"
        "import bnfreeze.render.verify, bnfreeze.render.explain\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'numpy') if m in sys.modules]\n"
        "from bnfreeze.runtime import environment, loading\n"
        f"assert list(loading.load_custom_objects({str(layers)!r})) == ['Scale']\n"
        "keras = environment.keras_module()\n"
        "keras.ops.ones((2,)) + 1  # the first op initialises the devices\n"
        "print('lean' if not heavy else heavy, keras.__version__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env=env,
    )
    import keras

    assert out.stdout == f"lean {keras.__version__}\n"
    assert "absl::InitializeLog" not in out.stderr
    assert "cuda" not in out.stderr.lower()


def test_progress_lines_when_stderr_is_not_a_terminal(capsys):
    with environment.progress_on_stderr() as progress:
        progress("loading TensorFlow")
        progress("training 1 step")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "bnfreeze: loading TensorFlow\nbnfreeze: training 1 step\n"


def test_progress_disabled_prints_nothing(capsys):
    with environment.progress_on_stderr(enabled=False) as progress:
        progress("loading")
    assert capsys.readouterr() == ("", "")


def test_spinner_on_a_terminal_turns_and_clears_its_line():
    import select

    master, slave = os.openpty()
    output = ""
    try:
        spinner = environment._Spinner(slave)
        spinner.update("loading TensorFlow")
        deadline = time.monotonic() + 10  # a loaded CI machine may draw slowly
        while output.count("loading TensorFlow") < 2 and time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                output += os.read(master, 65536).decode()
        spinner.close()
        while select.select([master], [], [], 0.2)[0]:
            output += os.read(master, 65536).decode()
    finally:
        os.close(master)
        os.close(slave)
    assert "loading TensorFlow" in output
    assert output.count("loading TensorFlow") >= 2  # it redraws: it turns
    assert output.endswith("\r\x1b[2K")  # and leaves a clean line


def test_keras_warnings_are_recorded_once_each():
    with environment.keras_warnings() as notes:
        warnings.warn("Skipping variable loading for optimizer 'adam'", UserWarning, stacklevel=1)
        warnings.warn("Skipping variable loading for optimizer 'adam'", UserWarning, stacklevel=1)
        warnings.warn("old API", DeprecationWarning, stacklevel=1)
    assert notes == ["Skipping variable loading for optimizer 'adam'"]


# --------------------------------------------------------------------------- runtimes


@pytest.mark.keras
def test_runtime_info():
    import keras
    import tensorflow as tf

    info = environment.runtime_info()
    assert info == RuntimeInfo(
        Runtime.KERAS3, keras.__version__, "tensorflow", tf.__version__, tf.__version__
    )
    assert info.label == (
        f"Keras {keras.__version__}, backend tensorflow (TensorFlow {tf.__version__})"
    )


def test_tf_keras_missing_is_a_clear_error(without_tf_keras):
    with pytest.raises(RuntimeUnavailableError) as info:
        environment.require_runtime(Runtime.TF_KERAS)
    assert "tf_keras" in str(info.value) and "not installed" in str(info.value)
    assert info.value.exit_code == 2
    environment.require_runtime(Runtime.KERAS3)  # always available


def test_a_jax_label_names_jax_not_tensorflow():
    info = RuntimeInfo(Runtime.KERAS3, "3.15.1", "jax", "2.21.0", "0.10.2")
    assert info.label == "Keras 3.15.1, backend jax (JAX 0.10.2)"


@pytest.mark.parametrize(
    ("variable", "keras_json", "expected"),
    [
        ("jax", {"backend": "tensorflow"}, ("jax", "KERAS_BACKEND")),
        ("", {"backend": "jax"}, ("jax", "keras.json")),
        (None, {"backend": "torch"}, ("torch", "keras.json")),
        (None, {"floatx": "float32"}, ("tensorflow", "Keras's default")),
        (None, None, ("tensorflow", "Keras's default")),
    ],
)
def test_the_backend_is_resolved_as_keras_does(
    tmp_path, monkeypatch, variable, keras_json, expected
):
    """KERAS_BACKEND (when not empty), else keras.json in $KERAS_HOME, else tensorflow; no
    Keras imported (keras/src/backend/config.py does the same at import)."""
    monkeypatch.delitem(sys.modules, "keras", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    if variable is None:
        monkeypatch.delenv("KERAS_BACKEND", raising=False)
    else:
        monkeypatch.setenv("KERAS_BACKEND", variable)
    if keras_json is not None:
        (tmp_path / "keras.json").write_text(json.dumps(keras_json), encoding="utf-8")
    choice = environment.configured_backend()
    name, source = expected
    assert choice.name == name
    assert source in choice.source
    if source == "keras.json":
        assert choice.source == str(tmp_path / "keras.json")
    label = {"jax": "JAX", "torch": "PyTorch", "tensorflow": "TensorFlow"}[name]
    assert environment.loading_message() == f"loading Keras ({label} backend)"


@pytest.mark.keras
def test_bnfreeze_never_sets_the_backend(monkeypatch):
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    environment.keras_module()
    assert "KERAS_BACKEND" not in os.environ


@pytest.mark.parametrize("runtime", list(Runtime))
def test_every_runtime_has_a_label(runtime):
    info = RuntimeInfo(runtime, "9.9", "tensorflow", "2.0")
    assert "Keras 9.9, backend tensorflow (TensorFlow 2.0)" in info.label
