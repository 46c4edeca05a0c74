"""Freezing models whose layers are built in code: keras-hub backbones and tasks, a custom
block that holds BN as attributes, a subclassed model (README, "keras-hub and code-built
models").

Keras saves no flag of those layers; bnfreeze records them in the ``.keras`` archive
(``bnfreeze.json``) and :func:`bnfreeze.load_model` sets them again. The truth comes from
Keras: every file is reloaded in a **fresh process** and trained one real step, measuring
which BN statistics, gamma/beta and conv kernels moved.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import warm
from click.testing import CliRunner
from paths import ROOT, SUPPORT

import bnfreeze
from bnfreeze.cli import cli
from bnfreeze.errors import BnfreezeError, ModelFormatError
from bnfreeze.formats import recorded_flags
from bnfreeze.model.records import WarningCode
from bnfreeze.ops import request as file_edit

pytestmark = pytest.mark.keras


@pytest.fixture(scope="session")
def hub():
    """The builders module (imports Keras and keras-hub)."""
    pytest.importorskip("keras_hub")
    import hub_models

    return hub_models


@pytest.fixture(scope="session")
def frozen(hub, tmp_path_factory):
    """Each model built, frozen in memory with ``bnfreeze.freeze(model, bn_inference=True,
    output=...)``: ``{name: (live model, the edit result, the saved path)}``."""
    folder = tmp_path_factory.mktemp("hub_frozen")
    out = {}
    for name, build in hub.BUILDERS.items():
        model = build()
        path = folder / f"{name}.keras"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = bnfreeze.freeze(model, bn_inference=True, output=path)
        out[name] = (model, result, path)
    return out


@pytest.fixture(scope="session")
def cli_frozen(hub, tmp_path_factory):
    """A keras-hub backbone and the custom-block model saved plainly by Keras, then frozen by
    the CLI (``--engine auto``, which the code-built layers send to the Keras engine)."""
    folder = tmp_path_factory.mktemp("hub_cli")
    module = folder / "objects.py"
    module.write_text(f"import sys\nsys.path.insert(0, {str(SUPPORT)!r})\nimport hub_models\n")
    out = {}
    for name in ("efficientnet", "custom_block"):
        plain = folder / f"plain_{name}.keras"
        hub.BUILDERS[name]().save(plain)
        target = folder / f"cli_{name}.keras"
        args = ["freeze", str(plain), "--bn-inference", "-o", str(target)]
        args += ["--custom-objects", str(module)]
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        out[name] = (plain, target, result)
    return out


# ------------------------------------------------------------------------------ in memory


@pytest.mark.parametrize("name", ["resnet", "efficientnet", "task", "custom_block", "subclassed"])
def test_live_freeze_sets_every_bn_leaf_and_fit_keeps_them_still(hub, frozen, name):
    """The Python API on a live model reaches BN held as attributes too: one real step moves
    no BN statistics and no gamma/beta, and the conv kernels train."""
    model, result, _ = frozen[name]
    bns = hub.batchnorm_layers(model)
    assert bns and not any(layer.trainable for layer in bns)
    assert len(result.changes) == len(bns)
    measured = hub.measure(model)
    assert measured["bn_stats_moved"] == 0 and measured["bn_gamma_beta_moved"] == 0, measured
    assert measured["conv_moved"] == measured["conv"] > 0, measured


def test_saving_records_the_flags_and_warns(frozen):
    for name, (_, result, path) in frozen.items():
        assert [f.code for f in result.warnings][-1] is WarningCode.RECORDED_FLAGS, name
        recorded = recorded_flags.read(path)
        assert recorded is not None and recorded.keras_version
        assert not all(recorded.flags.values()), name  # the BN flags are False


# ------------------------------------------------------------------------------ fresh process

CLI_KEYS = ("cli_efficientnet", "cli_custom_block")

RELOAD = """
import json, sys, warnings
warnings.simplefilter("ignore")
import hub_models, keras, bnfreeze
out = {}
for key, path in json.loads(sys.argv[1]).items():
    out[key] = {"bnfreeze": hub_models.measure(bnfreeze.load_model(path))}
    if key in ("resnet", "custom_block", "subclassed"):
        out[key]["keras"] = hub_models.measure(keras.models.load_model(path))
print(json.dumps(out))
"""


@pytest.fixture(scope="session")
def reloaded(frozen, cli_frozen):
    """Every frozen file loaded in one fresh process and trained one step; the ones named in
    RELOAD are also loaded with plain keras.models.load_model (the documented limit)."""
    paths = {name: str(path) for name, (_, _, path) in frozen.items()}
    paths.update({f"cli_{name}": str(target) for name, (_, target, _) in cli_frozen.items()})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(SUPPORT)])}
    done = warm.run(
        [sys.executable, "-c", RELOAD, json.dumps(paths)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "key",
    ["resnet", "efficientnet", "task", "custom_block", "subclassed", *CLI_KEYS],
)
def test_fresh_process_reload_keeps_bn_frozen_and_the_rest_trains(reloaded, key):
    measured = reloaded[key]["bnfreeze"]
    assert measured["bn"] > 0
    assert measured["bn_stats_moved"] == 0 and measured["bn_gamma_beta_moved"] == 0, measured
    assert measured["conv_moved"] == measured["conv"] > 0, measured


@pytest.mark.parametrize("key", ["resnet", "custom_block", "subclassed"])
def test_plain_keras_load_model_loses_the_flags(reloaded, key):
    """The limit the README states: keras.models.load_model ignores bnfreeze.json, and the
    layers built in code train again (in the custom-block model, the BN its config lists
    keeps its flag; the two inside the block do not)."""
    measured = reloaded[key]["keras"]
    lost = {"resnet": 6, "custom_block": 2, "subclassed": 3}[key]
    assert measured["bn_stats_moved"] == measured["bn_gamma_beta_moved"] == lost, measured


@pytest.mark.parametrize("ask", [False, True], ids=["from-file", "asking-keras"])
@pytest.mark.parametrize("key", ["resnet", "custom_block", "subclassed"])
def test_inspect_says_what_bnfreeze_load_model_changes(frozen, reloaded, key, ask):
    """inspect's rows show a plain keras.models.load_model; its recorded-flags warning says how
    the file loads with bnfreeze.load_model: the BN layers it names as switching to inference
    are exactly those measured to train after a plain load and to stay still after
    bnfreeze.load_model (main said nothing of the recorded flags)."""
    import re

    from bnfreeze.ops.inspect import inspect_file
    from bnfreeze.runtime.rebuilt import ask as ask_keras

    path = frozen[key][2]
    report = inspect_file(path, ask_keras=ask_keras if ask else None)
    found = [w for w in report.warnings if w.code is WarningCode.RECORDED_FLAGS]
    assert len(found) == 1, [w.code for w in report.warnings]
    match = re.search(r"(\d+) BN layer\(s\) then run in inference mode", found[0].message)
    assert match, found[0].message
    plain, loader = reloaded[key]["keras"], reloaded[key]["bnfreeze"]
    assert int(match.group(1)) == plain["bn_stats_moved"] - loader["bn_stats_moved"]
    # The rows themselves: the BN layers a plain load trains are the rows that say training.
    assert report.bn_training_in_fit >= int(match.group(1))


# ------------------------------------------------------------------------------ the CLI


def test_cli_freeze_records_flags_and_names_the_loader(cli_frozen):
    for name, (_, target, result) in cli_frozen.items():
        assert result.exit_code == 0, result.stderr
        assert f"bnfreeze.load_model({str(target)!r})" in result.stderr, name
        assert "Traceback" not in result.stderr
        assert recorded_flags.read(target) is not None


def test_config_route_sends_a_custom_block_to_the_keras_engine(cli_frozen):
    """A plain freeze (the same flag for all) of a Functional with a custom block: the config
    would set the block's own flag, which does not reach the BN it builds on load."""
    plain, _, _ = cli_frozen["custom_block"]
    reason = None
    try:
        bnfreeze.freeze(plain, output=None, dry_run=True, engine="config")
    except BnfreezeError as exc:
        reason = str(exc)
    assert reason is not None and "res (ResBlock) hold layers built in code" in reason
    assert "bnfreeze freeze" in reason and "--engine keras" in reason
    assert "bnfreeze.load_model(path)" in reason


def test_engine_config_refusal_on_a_keras_hub_file_names_the_route(cli_frozen, tmp_path):
    plain, _, _ = cli_frozen["efficientnet"]
    args = ["freeze", str(plain), "--bn-inference", "--engine", "config"]
    result = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "o.keras")])
    assert result.exit_code == 2
    assert "--engine keras" in result.stderr and "bnfreeze.load_model(path)" in result.stderr
    assert f"bnfreeze freeze {plain} --bn-inference --engine keras -o" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_file_with_recorded_flags_is_edited_by_the_keras_engine(cli_frozen, tmp_path):
    """Unfreezing a file with recorded flags goes through the Keras engine (the config route
    would leave them stale); the edit starts from the recorded flags, not from Keras's
    trainable=True. Every flag is now what Keras rebuilds, so the output needs no record."""
    _, target, _ = cli_frozen["efficientnet"]
    out = tmp_path / "unfrozen.keras"
    result = bnfreeze.unfreeze(target, output=out)
    assert result.engine is file_edit.Engine.KERAS
    assert {c.before for c in result.changes} == {False}  # the recorded BN flags
    assert recorded_flags.read(out) is None


def test_h5_output_is_refused_naming_the_route(hub, tmp_path):
    """A legacy .h5 cannot carry recorded flags (and Keras cannot even load the .h5 it
    writes for this model once flags inside the block changed): refused, nothing written."""
    model = hub.custom_block()
    with pytest.raises(BnfreezeError) as info:
        bnfreeze.freeze(model, bn_inference=True, output=tmp_path / "m.h5")
    text = str(info.value)
    assert "Keras cannot load the legacy .h5 file it just wrote" in text
    assert "Save as .keras instead" in text and "bnfreeze.load_model(" in text
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ the member


def test_recorded_paths_are_the_weights_file_group_paths(frozen):
    """The keys are where Keras saves each layer's variables, so they survive a reload."""
    import h5py

    _, _, path = frozen["efficientnet"]
    recorded = recorded_flags.read(path)
    assert recorded is not None
    with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as raw:
        groups: list[str] = []
        with h5py.File(raw, "r") as h5:
            h5.visit(lambda name: groups.append(name) if name.endswith("/vars") else None)
    holding = {g.removesuffix("/vars") for g in groups}
    bn = [p for p, flag in recorded.flags.items() if not flag]
    assert bn and set(bn) <= holding
    assert any(p.endswith("/bn1") for p in bn)  # an attribute-held BN of a fused block


def _with_member(path: Path, tmp: Path, text: str) -> Path:
    out = tmp / "edited.keras"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, text.encode() if info.filename == recorded_flags.MEMBER else data)
    return out


def test_a_recorded_path_the_model_lacks_is_refused(frozen, tmp_path):
    _, _, path = frozen["custom_block"]
    recorded = recorded_flags.read(path)
    assert recorded is not None
    flags = {**recorded.flags, "layers/no_such_layer": False}
    edited = _with_member(path, tmp_path, recorded_flags.RecordedFlags(flags).to_json())
    with pytest.raises(ModelFormatError, match="no_such_layer"):
        bnfreeze.load_model(edited)


def test_a_damaged_member_is_refused_before_keras_loads(frozen, tmp_path):
    _, _, path = frozen["custom_block"]
    with pytest.raises(ModelFormatError, match=r"bnfreeze\.json is not valid JSON"):
        bnfreeze.load_model(_with_member(path, tmp_path, "{not json"))


# ------------------------------------------------------------------------------ the README


def test_readme_example_runs(hub, tmp_path, monkeypatch, capsys):
    """The README's "How to freeze them" example runs and prints what it claims."""
    import re

    readme = (ROOT / "docs" / "keras-hub.md").read_text(encoding="utf-8")
    section = readme[readme.index("## How to freeze them") :]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(block.group(1), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "6 of 6 BN layers in inference mode"
