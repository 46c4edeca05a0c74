"""``bnfreeze apply``: every shipped plan applied to a sample model, and the result checked by
MEASURED training behaviour (load the output with Keras, train one step with a fresh
optimizer, see which variables moved), plus freeze's guarantees (atomic, byte-exact, dry run,
JSON, optimizer state) and exit codes."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import json_schemas
import pytest
from click.testing import CliRunner
from paths import ROOT

from bnfreeze.cli import cli

CONFIGS = ROOT / "bnfreeze" / "recipes"
BACKBONE = "mobilenetv2_0.35_32"


def invoke(*args: str):
    return CliRunner(env={"COLUMNS": "100", "NO_COLOR": "1"}).invoke(
        cli, [*map(str, args)], catch_exceptions=False
    )


def apply(model: Path, plan: str, out: Path, *extra: str) -> Path:
    result = invoke("apply", model, "--plan", CONFIGS / plan, "-o", out, *extra)
    assert result.exit_code == 0, result.stderr
    return out


# --------------------------------------------------------------------- measured truth


def measure(path: Path) -> dict[str, dict[str, bool]]:
    """Load a saved model with Keras, train ONE step with a fresh Adam optimizer on data of
    mean 5, and report per layer path what moved: ``stats`` (BN moving mean/variance),
    ``gamma_beta`` (BN), ``weights`` (any variable of a non-BN layer)."""
    import keras
    import numpy as np

    model = keras.models.load_model(path, compile=False)
    layers: dict[str, object] = {}

    def visit(container, prefix):
        for layer in container.layers:
            layers[prefix + layer.name] = layer
            if isinstance(layer, keras.Model):
                visit(layer, prefix + layer.name + "/")

    visit(model, "")
    leaves = {p: lyr for p, lyr in layers.items() if not isinstance(lyr, keras.Model)}
    before = {p: [np.array(v.numpy()) for v in lyr.weights] for p, lyr in leaves.items()}
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 2.0, size=(4, *model.inputs[0].shape[1:])).astype("float32")
    y = rng.normal(size=(4, *model.outputs[0].shape[1:])).astype("float32")
    # Adam moves every weight whose gradient is non-zero by about its learning rate; SGD
    # updates of these tiny gradients can fall below float32 resolution and look frozen.
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", run_eagerly=True)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    moved: dict[str, dict[str, bool]] = {}
    for path, layer in leaves.items():
        after = [np.array(v.numpy()) for v in layer.weights]
        changed = [not np.array_equal(a, b) for a, b in zip(before[path], after, strict=True)]
        if not changed:
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            ids = [id(v) for v in layer.weights]
            stats = {id(layer.moving_mean), id(layer.moving_variance)}
            moved[path] = {
                "stats": any(c for i, c in zip(ids, changed, strict=True) if i in stats),
                "gamma_beta": any(c for i, c in zip(ids, changed, strict=True) if i not in stats),
                "bn": True,
            }
        else:
            moved[path] = {"weights": any(changed), "bn": False}
    return moved


def bn(moved):
    return {p: m for p, m in moved.items() if m["bn"]}


def others(moved):
    return {p: m for p, m in moved.items() if not m["bn"]}


@pytest.fixture(scope="module")
def outputs(samples, tmp_path_factory):
    folder = tmp_path_factory.mktemp("apply")
    guide = samples / "guide_pattern.keras"
    out = {
        "finetune": apply(guide, "keras-guide-finetune.toml", folder / "finetune.keras"),
        "train-bn": apply(guide, "train-bn.toml", folder / "train_bn.keras"),
        "up-to": apply(guide, "freeze-up-to.toml", folder / "up_to.keras"),
        "up-to-14": apply(
            guide, "freeze-up-to.toml", folder / "up_to_14.keras", "--set", "block=block_14_add"
        ),
    }
    # freeze-backbone on a model whose backbone trains: the guide after fine-tuning.
    out["backbone"] = apply(out["finetune"], "freeze-backbone.toml", folder / "backbone.keras")
    out["backbone-trap"] = apply(
        samples / "bn_under_frozen.keras", "freeze-backbone.toml", folder / "backbone_trap.keras"
    )
    return out


@pytest.fixture(scope="module")
def measured(outputs):
    cache: dict[str, dict] = {}

    def get(name: str) -> dict[str, dict[str, bool]]:
        if name not in cache:
            cache[name] = measure(outputs[name])
        return cache[name]

    return get


@pytest.mark.keras
def test_keras_guide_finetune_measured(measured):
    moved = measured("finetune")
    assert len(bn(moved)) == 51
    assert not any(m["stats"] for m in bn(moved).values()), "no BN statistics may move"
    assert not any(m["gamma_beta"] for m in bn(moved).values()), "no BN gamma/beta may move"
    weighted = others(moved)
    assert len(weighted) == 52  # 51 conv/depthwise kernels of the backbone, and the head
    assert all(m["weights"] for m in weighted.values()), "every other weight trains"


@pytest.mark.keras
def test_freeze_backbone_measured(measured):
    moved = measured("backbone")
    inside = {p: m for p, m in moved.items() if p.startswith(BACKBONE + "/")}
    assert len(inside) == 102
    assert not any(
        m.get("stats") or m.get("gamma_beta") or m.get("weights") for m in inside.values()
    ), "nothing inside the backbone moves"
    assert moved["head"]["weights"] is True


@pytest.mark.keras
def test_freeze_backbone_fixes_a_trainable_bn_under_a_frozen_container(samples, measured):
    before = measure(samples / "bn_under_frozen.keras")
    assert before["backbone/inner_bn"]["stats"] is True  # the trap: it trains anyway
    moved = measured("backbone-trap")
    assert moved["backbone/inner_bn"] == {"stats": False, "gamma_beta": False, "bn": True}
    assert moved["backbone/inner_dense"]["weights"] is False
    assert moved["head_bn"] == {"stats": True, "gamma_beta": True, "bn": True}
    assert moved["head"]["weights"] is True


@pytest.mark.keras
def test_train_bn_measured(measured):
    moved = measured("train-bn")
    assert len(bn(moved)) == 51
    assert all(m["stats"] and m["gamma_beta"] for m in bn(moved).values()), "every BN trains"
    frozen = {p: m for p, m in others(moved).items() if p.startswith(BACKBONE + "/")}
    assert len(frozen) == 51
    assert not any(m["weights"] for m in frozen.values()), "no other backbone weight trains"
    assert moved["head"]["weights"] is True


@pytest.mark.keras
def test_train_bn_on_a_nested_legacy_h5_measured(samples, tmp_path):
    """The legacy .h5 whose weight order depends on the flags (docs/semantics.md, rule 6): the
    plan goes through the h5 writer, values stay identical by path, and training behaves as
    planned."""
    out = apply(samples / "nested_legacy.h5", "train-bn.toml", tmp_path / "train_bn.h5")
    diff = json.loads(invoke("diff", samples / "nested_legacy.h5", out, "--json").stdout)
    assert [row["path"] for row in diff["layers"]] == ["bn_dense/d1"]
    assert diff["weights"]["identical"] is True
    moved = measure(out)
    assert {p: (m["stats"], m["gamma_beta"]) for p, m in bn(moved).items()} == {
        "bn_bn/bn1": (True, True),
        "bn_bn/bn2": (True, True),
        "bn_dense/bn3": (True, True),
    }
    assert moved["bn_dense/d1"]["weights"] is False
    assert moved["head"]["weights"] is True


def _block(path: str) -> int | None:
    name = path.rsplit("/", 1)[-1]
    if name.startswith("block_"):
        return int(name.split("_")[1])
    return 0 if path.startswith(BACKBONE + "/") else None


@pytest.mark.keras
@pytest.mark.parametrize(("name", "last_frozen"), [("up-to", 12), ("up-to-14", 14)])
def test_freeze_up_to_measured(measured, name, last_frozen):
    moved = measured(name)
    assert not any(m["stats"] or m["gamma_beta"] for m in bn(moved).values())
    kernels = others(moved)
    early = [p for p in kernels if _block(p) is not None and _block(p) <= last_frozen]
    late = [p for p in kernels if _block(p) is not None and _block(p) > last_frozen]
    assert early and late
    assert not any(kernels[p]["weights"] for p in early), f"up to block {last_frozen}: frozen"
    assert all(kernels[p]["weights"] for p in late), f"after block {last_frozen}: trains"
    assert kernels["head"]["weights"] is True


@pytest.mark.parametrize(
    ("name", "plan"),
    [
        ("finetune", "keras-guide-finetune.toml"),
        ("train-bn", "train-bn.toml"),
        ("up-to", "freeze-up-to.toml"),
        ("backbone", "freeze-backbone.toml"),
    ],
)
def test_each_output_passes_its_own_plan_check(outputs, name, plan):
    result = invoke("check", outputs[name], "--plan", CONFIGS / plan)
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "")


# ------------------------------------------------------------------ freeze's guarantees


def test_weights_member_is_byte_identical(samples, tmp_path):
    src = samples / "bn_under_frozen.keras"  # not compiled: no optimizer state to drop
    out = apply(src, "keras-guide-finetune.toml", tmp_path / "out.keras")
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(out) as b:
        assert a.namelist() == b.namelist()
        for name in a.namelist():
            if name != "config.json":
                assert a.read(name) == b.read(name), name
        assert a.read("config.json") != b.read("config.json")


def test_compiled_model_remaps_or_drops_mismatched_optimizer_state(samples, tmp_path):
    src = samples / "guide_pattern.keras"
    result = invoke(
        "apply", src, "--plan", CONFIGS / "keras-guide-finetune.toml", "-o", tmp_path / "r.keras"
    )
    assert result.exit_code == 0
    assert "the 6 saved optimizer variables were remapped" in result.stderr
    diff = json.loads(invoke("diff", src, tmp_path / "r.keras", "--json").stdout)
    assert diff["weights"]["identical"] is True
    assert diff["optimizer_state"]["b"] > 6
    result = invoke(
        "apply",
        src,
        "--plan",
        CONFIGS / "keras-guide-finetune.toml",
        "-o",
        tmp_path / "a.keras",
        "--optimizer-state",
        "drop",
    )
    assert result.exit_code == 0
    assert "The 6 saved optimizer variables were dropped" in result.stderr
    diff = json.loads(invoke("diff", src, tmp_path / "a.keras", "--json").stdout)
    assert diff["weights"]["identical"] is True
    assert diff["optimizer_state"]["b"] == 0
    kept = invoke(
        "apply",
        src,
        "--plan",
        CONFIGS / "keras-guide-finetune.toml",
        "-o",
        tmp_path / "k.keras",
        "--optimizer-state",
        "keep",
    )
    assert kept.exit_code == 0
    diff = json.loads(invoke("diff", src, tmp_path / "k.keras", "--json").stdout)
    assert diff["optimizer_state"] == {"a": 6, "b": 6, "identical": True}


def test_the_plan_can_say_what_to_do_with_optimizer_state(samples, tmp_path):
    src = samples / "guide_pattern.keras"
    plan = tmp_path / "p.toml"
    plan.write_text(
        (CONFIGS / "keras-guide-finetune.toml")
        .read_text()
        .replace("[plan]", '[plan]\noptimizer_state = "drop"', 1)
    )
    result = invoke("apply", src, "--plan", plan, "-o", tmp_path / "a.keras")
    assert result.exit_code == 0, result.stderr
    assert "The 6 saved optimizer variables were dropped" in result.stderr
    # The command line wins over the plan.
    result = invoke(
        "apply", src, "--plan", plan, "-o", tmp_path / "b.keras", "--optimizer-state", "keep"
    )
    assert "were kept as they are" in " ".join(result.stderr.split())
    plan.write_text(plan.read_text().replace('"drop"', '"forget"'))
    bad = invoke("apply", src, "--plan", plan, "-o", tmp_path / "c.keras")
    assert bad.exit_code == 2
    assert "optimizer_state must be one of remap, drop, keep, not 'forget'" in bad.stderr
    assert not (tmp_path / "c.keras").exists()


def test_dry_run_writes_nothing_and_json_is_the_freeze_document(samples, tmp_path):
    out = tmp_path / "never.keras"
    result = invoke(
        "apply",
        samples / "bn_under_frozen.keras",
        "--plan",
        CONFIGS / "freeze-backbone.toml",
        "-o",
        out,
        "--dry-run",
        "--json",
    )
    assert result.exit_code == 0
    assert not out.exists()
    document = json.loads(result.stdout)
    json_schemas.validate("apply", document)
    assert set(document) == {
        "schema_version",
        "command",
        "model",
        "runtime",
        "input",
        "output",
        "dry_run",
        "optimizer_state",
        "changes",
        "report",
        "warnings",
        "plan",
    }
    assert document["schema_version"] == 2 and document["command"] == "apply"
    assert (document["output"], document["dry_run"]) == (None, True)
    assert document["changes"] == [
        {"path": "backbone/inner_bn", "before": True, "after": False},
    ]
    assert document["plan"] == {
        "path": str(CONFIGS / "freeze-backbone.toml"),
        "name": "freeze-backbone",
        "params": {},
        "rules": [
            {
                "rule": 1,
                "line": 19,
                "name": "start from every layer trainable",
                "selects": "every layer",
                "trainable": True,
                "bn": "follow",
                "synchronized": None,
                "selected": 4,
            },
            {
                "rule": 2,
                "line": 23,
                "name": "freeze the backbone (every layer inside a nested model), BN included",
                "selects": "min_depth=1",
                "trainable": False,
                "bn": "follow",
                "synchronized": None,
                "selected": 2,
            },
        ],
    }
    assert "dry run: nothing was written." in result.stderr


def test_table_output_names_the_rules(samples, tmp_path):
    result = invoke(
        "apply",
        samples / "guide_pattern.keras",
        "--plan",
        CONFIGS / "freeze-up-to.toml",
        "--set",
        "block=block_14_add",
        "--dry-run",
    )
    assert result.exit_code == 0
    lines = [line.rstrip() for line in result.stdout.splitlines()]
    assert lines[:2] == [
        f"Plan freeze-up-to  {CONFIGS / 'freeze-up-to.toml'}",
        "Parameters: block=block_14_add",
    ]
    assert "freeze everything up to and including block_14_add" in result.stdout
    assert "12 layer(s) would change (0 BN, 12 other)" in result.stdout


def test_in_place_and_same_output(samples, tmp_path):
    import shutil

    model = tmp_path / "m.keras"
    shutil.copy(samples / "bn_under_frozen.keras", model)
    refused = invoke("apply", model, "--plan", CONFIGS / "freeze-backbone.toml", "-o", model)
    assert refused.exit_code == 2
    assert "is the input file" in refused.stderr
    done = invoke("apply", model, "--plan", CONFIGS / "freeze-backbone.toml", "--in-place")
    assert done.exit_code == 0
    again = invoke("check", model, "--plan", CONFIGS / "freeze-backbone.toml")
    assert again.exit_code == 0


@pytest.mark.parametrize(
    ("plan_text", "message"),
    [
        (
            '[[rule]]\ntrainable = "yes"\n',
            "{plan}:2: rule 1, key 'trainable': must be true or false, not the string 'yes'.",
        ),
        (
            '[[rule]]\nlayers = "nothing*"\ntrainable = false\n',
            "{plan}:2: rule 1, key 'layers': layers 'nothing*' matches no layer.",
        ),
        ("[[rule]]\ntrainable = false\n[[rule\n", "{plan}:3: not valid TOML"),
        ('[[expect]]\nbn = "inference"\n', "{plan}: the plan has no [[rule]] table"),
    ],
)
def test_malformed_plans_exit_2_naming_the_problem(samples, tmp_path, plan_text, message):
    plan = tmp_path / "plan.toml"
    plan.write_text(plan_text)
    out = tmp_path / "out.keras"
    result = invoke("apply", samples / "guide_pattern.keras", "--plan", plan, "-o", out)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: " + message.format(plan=plan))
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.toml"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{guide}", "--plan", "{configs}/train-bn.toml"], "-o OUT is required"),
        (["{guide}"], "missing option '--plan'"),
        (
            ["{guide}", "--plan", "{configs}/train-bn.toml", "--set", "x=y", "--dry-run"],
            "has no parameter 'x'",
        ),
        (
            ["{seq}", "--plan", "{configs}/train-bn.toml", "--dry-run"],
            "rule 2: only=non-bn,min_depth=1 matches no layer whose flag can be set.",
        ),
        (["missing.keras", "--plan", "{configs}/train-bn.toml", "--dry-run"], "no such file"),
    ],
)
def test_bad_input_exits_2(samples, args, message):
    fmt = {
        "guide": samples / "guide_pattern.keras",
        "configs": CONFIGS,
        "seq": samples / "sequential.keras",
    }
    result = invoke("apply", *[a.format(**fmt) for a in args])
    assert result.exit_code == 2
    assert message in result.stderr


# ------------------------------------------------------- help, version, shell completion


@pytest.mark.parametrize("command", ["apply", "check", "diff", "inspect"])
def test_help_has_an_example(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.stdout
    assert f"bnfreeze {command} " in result.stdout


def test_version():
    from bnfreeze import __version__

    result = invoke("--version")
    assert (result.exit_code, result.stdout) == (0, f"bnfreeze, version {__version__}\n")


def test_shell_completion_as_documented():
    """The README's `_BNFREEZE_COMPLETE=bash_source bnfreeze` prints a completion script, and
    completing works: subcommands and options."""
    import os
    import subprocess
    import sys

    # python -m bnfreeze runs this tree's code under the same prog name as the entry point.
    exe = [sys.executable, "-m", "bnfreeze"]
    env = {**os.environ, "_BNFREEZE_COMPLETE": "bash_source"}
    script = subprocess.run(exe, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert script.returncode == 0
    assert "_bnfreeze_completion()" in script.stdout
    assert "_BNFREEZE_COMPLETE=bash_source bnfreeze" in (ROOT / "docs" / "cli.md").read_text()
    env = {
        **os.environ,
        "_BNFREEZE_COMPLETE": "bash_complete",
        "COMP_WORDS": "bnfreeze ap",
        "COMP_CWORD": "1",
    }
    done = subprocess.run(exe, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.stdout.split() == ["plain,apply"]
    env.update(COMP_WORDS="bnfreeze check m.keras --exp", COMP_CWORD="3")
    done = subprocess.run(exe, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.stdout.split() == ["plain,--expect", "plain,--export"]


def test_apply_check_diff_and_strip_never_import_tensorflow_or_keras():
    import subprocess
    import sys

    code = """
import sys
from click.testing import CliRunner
from bnfreeze.cli import cli
for args in (
    ["check", "sample_models/guide_pattern.keras", "--plan", "freeze-backbone",
     "--strict", "--expect", "bn-inference"],
    ["diff", "sample_models/guide_pattern.keras", "sample_models/bn_under_frozen.keras"],
    ["apply", "sample_models/guide_pattern.keras", "--plan", "train-bn",
     "--dry-run"],
    ["inspect", "sample_models/guide_pattern.keras", "--strip"],
):
    assert CliRunner().invoke(cli, args).exit_code == 0, args
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras"))
print(heavy)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
