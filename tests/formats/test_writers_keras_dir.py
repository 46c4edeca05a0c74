"""An unzipped `.keras` folder is frozen without TensorFlow, written as a `.keras` archive
(the format ``model.save("x.keras")`` writes), and Keras 3 loads the result with every value
identical by path and the flags the edit set, measured with a real ``fit()`` step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from keras_truth import layer_paths, measure_fit_step

from bnfreeze.cli import cli

pytestmark = pytest.mark.keras


@pytest.fixture(scope="session")
def trained_folder(tmp_path_factory) -> Path:
    """A compiled, trained guide-pattern model saved with model.save(..., zipped=False)."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(3)
    inner_in = keras.Input((4,))
    y = keras.layers.Dense(4, name="proj")(inner_in)
    y = keras.layers.BatchNormalization(name="bn")(y)
    base = keras.Model(inner_in, y, name="base")
    inp = keras.Input((4,), name="x")
    out = keras.layers.Dense(2, name="head")(base(inp, training=False))
    model = keras.Model(inp, out, name="guide")
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.normal(5, 2, (8, 4)), rng.normal(size=(8, 2)), verbose=0)
    folder = tmp_path_factory.mktemp("folder") / "guide_model"
    model.save(folder, zipped=False)
    assert (folder / "config.json").is_file()
    return folder


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a fresh interpreter, which reports whether TensorFlow got imported."""
    code = (
        "import sys\nfrom bnfreeze.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print('TF', 'tensorflow' in sys.modules, file=sys.stderr)\nsys.exit(code)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_freeze_a_folder_writes_a_keras_file_without_tensorflow(trained_folder, tmp_path):
    import keras
    import numpy as np

    out = tmp_path / "frozen.keras"
    done = run_cli("freeze", str(trained_folder), "--bn-inference", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "TF False" in done.stderr
    assert zipfile.is_zipfile(out)
    with zipfile.ZipFile(out) as archive:
        assert archive.namelist() == ["metadata.json", "config.json", "model.weights.h5"]
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}
    # Every value identical by path; the optimizer state was dropped (the trainable set
    # changed), nothing else.
    before = keras.models.load_model(trained_folder, compile=False)
    after = keras.models.load_model(out, compile=False)
    old, new = layer_paths(before), layer_paths(after)
    assert list(old) == list(new)
    for path in old:
        for a, b in zip(old[path].weights, new[path].weights, strict=True):
            assert np.array_equal(a.numpy(), b.numpy()), (path, a.path)
    assert after.get_layer("base").get_layer("bn").trainable is False
    # A real step: the BN runs in inference mode, the rest trains.
    moved = measure_fit_step(after)
    assert moved["base/bn"].moving_stats is False and moved["base/bn"].gamma_beta is False
    assert moved["base/proj"].other_weights is True and moved["head"].other_weights is True
    assert not (trained_folder / "config.json").read_bytes().count(b'"trainable": false')


def test_freeze_a_folder_keeping_its_optimizer_state(trained_folder, tmp_path):
    out = tmp_path / "kept.keras"
    result = CliRunner().invoke(
        cli,
        [
            "freeze",
            str(trained_folder),
            "--bn-inference",
            "--optimizer-state",
            "keep",
            "-o",
            str(out),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.stderr
    with zipfile.ZipFile(out) as archive:
        assert (
            archive.read("model.weights.h5") == (trained_folder / "model.weights.h5").read_bytes()
        )
        config = json.loads(archive.read("config.json"))
    assert config["config"]["layers"][1]["config"]["layers"][2]["config"]["trainable"] is False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "{tmp}/out_folder"], "is written as a .keras file, so its name must end in .keras"),
        (["--in-place"], "--in-place cannot rewrite the folder"),
    ],
)
def test_folder_refusals_give_advice_that_works(trained_folder, tmp_path, args, message):
    done = run_cli("freeze", str(trained_folder), *[a.format(tmp=tmp_path) for a in args])
    assert done.returncode == 2
    assert message in done.stderr and "TF False" in done.stderr
    assert "--engine keras" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_folder_named_dot_keras(trained_folder, tmp_path):
    """Keras 3 cannot load it (IsADirectoryError): the keras engine says so before loading
    TensorFlow and advises the config route, which works."""
    import shutil

    folder = tmp_path / "model.keras"
    shutil.copytree(trained_folder, folder)
    out = tmp_path / "out.keras"
    refused = run_cli("freeze", str(folder), "--engine", "keras", "-o", str(out))
    assert refused.returncode == 2 and "TF False" in refused.stderr
    assert "Use --engine config" in refused.stderr and not out.exists()
    done = run_cli("freeze", str(folder), "--bn-inference", "--engine", "config", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert zipfile.is_zipfile(out)
