"""The Python API (bnfreeze.api): paths and in-memory keras.Model objects.

The recompile claims are measured as docs/semantics.md, rule 4, says: a real fit() step, and
which variables moved.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import bnfreeze
from bnfreeze.errors import BnfreezeError, SelectionError
from bnfreeze.ops import request as file_edit
from bnfreeze.ops.optimizer_state import OptimizerState
from bnfreeze.render.json import layer_dict
from bnfreeze.runtime import live as keras_live
from bnfreeze.runtime import saving

pytestmark = pytest.mark.keras

ROOT = Path(__file__).resolve().parent.parent
NO_EFFECT = "no effect on fit() until compile() is called again with a new optimizer"

RNG = np.random.default_rng(11)
X = RNG.normal(5.0, 2.0, (16, 4)).astype("float32")
Y = RNG.normal(size=(16, 1)).astype("float32")


# ------------------------------------------------------------------------------ helpers


def build(*, frozen: tuple[str, ...] = ()):
    """Dense "d" -> BatchNormalization "bn" -> Dense "o"."""
    import keras

    keras.utils.set_random_seed(11)
    inputs = keras.Input((4,), name="x")
    h = keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(4, name="d")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, name="o")(h), name="small")
    for name in frozen:
        model.get_layer(name).trainable = False
    return model


def compile_(model, lr: float = 1e-2):
    import keras

    model.compile(optimizer=keras.optimizers.Adam(lr), loss=keras.losses.MeanSquaredError())
    return model


def fit_moves(model, batch_size: int = 16) -> set[str]:
    """The layers whose variables one real fit() epoch changes (no recompile)."""
    before = saving.values_by_path(keras_live.live_layers(model))
    model.fit(X, Y, batch_size=batch_size, epochs=1, verbose=0)
    after = saving.values_by_path(keras_live.live_layers(model))
    return {k.split(":")[0] for k in before if not np.array_equal(before[k], after[k])}


def recompile_warnings(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, bnfreeze.RecompileWarning)]


# ------------------------------------------------------------------------------ the package


def test_import_is_lazy():
    """import bnfreeze, its API names and inspecting a path import no TensorFlow or Keras."""
    code = (
        "import sys, bnfreeze\n"
        "assert issubclass(bnfreeze.RecompileWarning, UserWarning)\n"
        "bnfreeze.freeze, bnfreeze.unfreeze, bnfreeze.recompile, bnfreeze.load_model\n"
        "report = bnfreeze.inspect('sample_models/seed_bn.keras')\n"
        "assert report.bn_training_in_fit == 1\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_public_names():
    assert set(bnfreeze.__all__) >= {
        "inspect",
        "freeze",
        "unfreeze",
        "recompile",
        "RecompileWarning",
        "load_model",
    }
    assert "freeze" in dir(bnfreeze) and "load_model" in dir(bnfreeze)
    with pytest.raises(AttributeError):
        bnfreeze.no_such_name  # noqa: B018


# ------------------------------------------------------------------------------ inspect


def test_inspect_in_memory_matches_the_saved_file(samples):
    """The same report for a model in memory as for its saved file: every layer, flag and
    mode in fit() (only the format differs)."""
    import keras

    model = keras.models.load_model(samples / "bn_under_frozen.keras")
    in_memory = bnfreeze.inspect(model)
    on_disk = bnfreeze.inspect(samples / "bn_under_frozen.keras")
    assert in_memory.model.format.value == "memory"
    assert in_memory.model.path == "<in-memory model 'bn_under_frozen'>"
    assert [layer_dict(s) for s in in_memory.layers] == [layer_dict(s) for s in on_disk.layers]
    assert [f.code for f in in_memory.warnings] == [f.code for f in on_disk.warnings]


def test_inspect_recognises_custom_bn_and_subclassed_models(custom_layers_file):
    from bnfreeze.runtime.loading import load_custom_objects

    my = load_custom_objects(str(custom_layers_file))
    import keras

    inputs = keras.Input((4,))
    model = keras.Model(inputs, my["MyBN"](name="mine")(inputs))
    assert [s.layer.path for s in bnfreeze.inspect(model).batchnorm] == ["mine"]
    tiny = my["TinyNet"](name="tiny")
    tiny(np.zeros((1, 3), "float32"))
    report = bnfreeze.inspect(tiny)
    assert [(s.layer.path, s.layer.is_batchnorm) for s in report.layers] == [
        ("dense", False),
        ("bn", True),
        ("head", False),
    ]


# ------------------------------------------------------------------------------ editing


def test_freeze_in_memory_returns_the_same_objects():
    model = build()
    result = bnfreeze.freeze(model, bn_inference=True)
    assert isinstance(result, file_edit.EditResult)
    assert [(c.path, c.before, c.after) for c in result.changes] == [("bn", True, False)]
    assert model.get_layer("bn").trainable is False
    assert result.report.bn_inference_in_fit == 1
    assert result.output is None and result.engine is file_edit.Engine.KERAS


def test_selection_options_in_memory():
    model = build()
    bnfreeze.freeze(model, up_to="bn")
    assert [layer.trainable for layer in model.layers[1:]] == [False, False, True]
    bnfreeze.unfreeze(model, from_="bn", keep_bn_inference=True)
    assert [layer.trainable for layer in model.layers[1:]] == [False, False, True]
    bnfreeze.unfreeze(model, layers=["d"])
    assert model.get_layer("d").trainable is True
    with pytest.raises(SelectionError):
        bnfreeze.freeze(model, layers=["nothing*"])
    with pytest.raises(TypeError):
        bnfreeze.freeze(object())


def test_dry_run_changes_nothing():
    model = compile_(build())
    emitted = recompile_warnings(lambda: bnfreeze.freeze(model, dry_run=True))
    assert emitted == []
    assert all(layer.trainable for layer in model.layers)


def test_in_memory_output_is_saved(tmp_path):
    import keras

    model = compile_(build())
    model.fit(X, Y, verbose=0)
    out = tmp_path / "out.keras"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bnfreeze.RecompileWarning)
        result = bnfreeze.freeze(model, bn_inference=True, output=out)
    assert result.output == str(out) and result.output_bytes == out.stat().st_size
    assert result.optimizer_state is OptimizerState.DROPPED
    loaded = keras.models.load_model(out, compile=False)
    assert loaded.get_layer("bn").trainable is False


def test_paths_go_through_the_cli_orchestration(samples, tmp_path):
    out = tmp_path / "out.keras"
    result = bnfreeze.unfreeze(samples / "guide_pattern.keras", keep_bn_inference=True, output=out)
    same = bnfreeze.unfreeze(
        samples / "guide_pattern.keras", output=tmp_path / "cli.keras", keep_bn_inference=True
    )
    assert result.engine is file_edit.Engine.CONFIG
    assert result.changes == same.changes
    assert out.read_bytes() == (tmp_path / "cli.keras").read_bytes()
    with pytest.raises(BnfreezeError, match="in_place"):
        bnfreeze.freeze(build(), in_place=True)


# ------------------------------------------------------------------------------ RecompileWarning


def test_no_warning_on_an_uncompiled_model():
    model = build()
    assert recompile_warnings(lambda: bnfreeze.freeze(model, layers=["d"])) == []
    assert fit_moves(compile_(model)) == {"bn", "o"}


def test_compiled_before_fit_warns_and_the_change_reaches_fit():
    model = compile_(build())
    emitted = recompile_warnings(lambda: bnfreeze.freeze(model, layers=["d", "bn"]))
    assert len(emitted) == 1 and NO_EFFECT not in emitted[0]
    assert "still reaches the next fit()" in emitted[0]
    assert fit_moves(model) == {"o"}  # measured: d and bn stayed put


def test_nothing_changed_nothing_to_warn():
    model = compile_(build(frozen=("bn",)))
    assert recompile_warnings(lambda: bnfreeze.freeze(model, bn_inference=True)) == []


def test_after_fit_the_change_has_no_effect_until_recompile():
    """Rule 4 (docs/semantics.md), measured: after fit(), freezing d and bn changes nothing in
    the next fit(); after bnfreeze.recompile(model) it does."""
    model = compile_(build())
    model.fit(X, Y, verbose=0)
    emitted = recompile_warnings(lambda: bnfreeze.freeze(model, layers=["d", "bn"]))
    assert len(emitted) == 1 and NO_EFFECT in emitted[0]
    assert fit_moves(model) == {"d", "bn", "o"}  # the claim: no effect
    bnfreeze.recompile(model)
    assert fit_moves(model) == {"o"}  # in effect now


def test_a_step_traced_anew_sees_the_change_as_the_warning_says():
    """Measured, and said in the warning: a fit() with a new batch shape traces a new step,
    which sees the change; so does the first fit() after train_on_batch() (a step traced for
    tensors, not for fit()'s iterator). "No effect" holds only for the step fit() reuses."""
    model = compile_(build())
    model.fit(X, Y, batch_size=16, verbose=0)
    emitted = recompile_warnings(lambda: bnfreeze.freeze(model, layers=["d", "bn"]))
    assert len(emitted) == 1 and NO_EFFECT in emitted[0]
    assert "new batch shape" in emitted[0] and "fit() after train_on_batch()" in emitted[0]
    assert fit_moves(model, batch_size=8) == {"o"}

    model = compile_(build())
    model.train_on_batch(X, Y)
    assert len(recompile_warnings(lambda: bnfreeze.freeze(model, layers=["d", "bn"]))) == 1
    assert fit_moves(model) == {"o"}


def test_built_optimizer_and_newly_trainable_layers(tmp_path):
    """A model loaded compiled has a built optimizer: unfreezing d makes fit() fail with
    'Unknown variable' (measured), as the warning says, until recompile()."""
    import keras

    model = compile_(build(frozen=("d",)))
    model.fit(X, Y, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    emitted = recompile_warnings(lambda: bnfreeze.unfreeze(loaded, layers=["d"]))
    assert len(emitted) == 1 and "'Unknown variable'" in emitted[0]
    with pytest.raises(ValueError, match="Unknown variable"):
        loaded.fit(X, Y, verbose=0)
    bnfreeze.recompile(loaded)
    assert fit_moves(loaded) == {"d", "bn", "o"}


# ------------------------------------------------------------------------------ recompile


def test_recompile_keeps_the_settings_with_a_fresh_optimizer():
    import keras

    model = build()
    model.compile(
        optimizer=keras.optimizers.Adam(0.0123, beta_1=0.8),
        loss=keras.losses.MeanSquaredError(),
        metrics=["mae"],
    )
    model.fit(X, Y, verbose=0)
    old = model.optimizer
    assert bnfreeze.recompile(model) is model
    new = model.optimizer
    assert new is not old and type(new) is type(old)
    assert new.get_config() == old.get_config()
    assert int(new.iterations.numpy()) == 0 and model.train_function is None
    history = model.fit(X, Y, verbose=0)
    assert set(history.history) == {"loss", "mae"}


def test_recompile_needs_a_compiled_model():
    with pytest.raises(BnfreezeError, match="not compiled"):
        bnfreeze.recompile(build())


# ------------------------------------------------------------------------------ the README


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """The README's Python API example runs as written, and says what it claims."""
    import re
    import shutil

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("## Python API")
    code = re.compile(r"^```python\n(.*?)^```", flags=re.M | re.S).search(readme, start).group(1)
    shutil.copytree(ROOT / "sample_models", tmp_path / "sample_models")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "51 BN layers run in inference mode in fit()"
    assert printed[1].startswith("100 flags changed; RecompileWarning ")  # as the CLI: 100
    assert "'Unknown variable'" in printed[1]
    assert (tmp_path / "frozen.keras").is_file()


# ------------------------------------------------------------------------------ load_model


def test_load_model_without_recorded_flags_is_keras_load_model(samples):
    """A file bnfreeze recorded nothing in loads exactly as keras.models.load_model loads it;
    keyword arguments go to Keras unchanged."""
    import keras

    path = samples / "guide_pattern.keras"
    ours = bnfreeze.load_model(path, compile=False)
    theirs = keras.models.load_model(path, compile=False)
    assert not ours.compiled
    flags = [
        {path: layer.trainable for path, layer in keras_live.live_layers(m).items()}
        for m in (ours, theirs)
    ]
    assert flags[0] == flags[1] and False in flags[0].values()
    with pytest.raises(TypeError):
        bnfreeze.load_model(path, no_such_argument=True)
