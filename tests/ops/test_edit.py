"""The library behind freeze/unfreeze: output checks, routes, optimizer state, results."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest
import unprivileged

import bnfreeze
from bnfreeze.errors import BnfreezeError, OutputError, SelectionError
from bnfreeze.formats.atomic import TEMP_SUFFIX
from bnfreeze.formats.readers import read_model
from bnfreeze.model.assignments import Assignment, Change
from bnfreeze.model.records import Finding, WarningCode
from bnfreeze.model.walk import walk
from bnfreeze.ops import config_route
from bnfreeze.ops.edit_warnings import edit_warnings
from bnfreeze.ops.optimizer_state import (
    OptimizerState,
    OptimizerStateMode,
    optimizer_decision,
    parse_mode,
)
from bnfreeze.ops.request import EditRequest, Engine, LayerSelection, Loading, Output
from bnfreeze.runtime import routes


def flags(path: Path) -> dict[str, bool | None]:
    return {r.path: r.trainable for r in walk(read_model(path).config).layers}


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def rewrite_config(src: Path, dst: Path, edit: Any) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "config.json":
                config = json.loads(data)
                edit(config)
                data = json.dumps(config).encode()
            zout.writestr(info, data)
    return dst


@pytest.fixture()
def guide(samples, tmp_path) -> Path:
    path = tmp_path / "in" / "guide.keras"
    path.parent.mkdir()
    shutil.copy(samples / "guide_pattern.keras", path)
    return path


# --- where the output goes ---------------------------------------------------------------


def test_output_is_required_without_dry_run_or_in_place(guide):
    with pytest.raises(OutputError, match="no output file"):
        bnfreeze.freeze(guide)


@pytest.mark.parametrize("spelling", ["same", "relative", "symlink"])
def test_output_equal_to_input_is_refused(guide, tmp_path, monkeypatch, spelling):
    monkeypatch.chdir(guide.parent)
    out: Path | str = guide
    if spelling == "relative":
        out = "./guide.keras"
    elif spelling == "symlink":
        out = tmp_path / "link.keras"
        os.symlink(guide, out)
    before = guide.read_bytes()
    with pytest.raises(OutputError, match="is the input file; refusing to overwrite it"):
        bnfreeze.freeze(guide, output=out)
    assert guide.read_bytes() == before


def test_in_place_with_another_output_is_refused(guide, tmp_path):
    with pytest.raises(OutputError, match="Give either -o OUT or --in-place"):
        bnfreeze.freeze(guide, output=tmp_path / "other.keras", in_place=True)


def test_missing_folder(guide, tmp_path):
    with pytest.raises(OutputError, match=r"the folder .*missing does not exist"):
        bnfreeze.freeze(guide, output=tmp_path / "missing" / "out.keras")
    assert not (tmp_path / "missing").exists()


def test_output_is_a_directory(guide, tmp_path):
    with pytest.raises(OutputError, match="is a directory"):
        bnfreeze.freeze(guide, output=tmp_path)


def test_read_only_folder(guide):
    """As user ``nobody`` (root ignores permission bits, and CI runs as root): the kernel
    refuses the folder, and the check before any work says so."""
    with unprivileged.open_folder() as folder:
        model = folder / "guide.keras"
        shutil.copy(guide, model)
        model.chmod(0o644)
        read_only = folder / "ro"
        read_only.mkdir()
        read_only.chmod(0o555)
        bnfreeze.freeze(
            model, output=folder / "warm-up.keras"
        )  # as root: imports what the edit needs
        (folder / "warm-up.keras").unlink()

        def freeze() -> None:
            bnfreeze.freeze(model, output=read_only / "out.keras")

        state, raised = unprivileged.call_as_nobody(freeze)
        assert state == "raised", "nobody wrote into a read-only folder"
        assert raised == (
            "OutputError",
            f"{read_only / 'out.keras'}: the folder {read_only} is not writable (permission "
            "denied). Pick another -o.",
        )
        assert listing(read_only) == []
        assert listing(folder) == ["guide.keras", "ro"]


def test_unwritable_folder_even_for_root(guide, tmp_path, monkeypatch):
    """Root passes os.access; the write itself still fails cleanly."""
    import tempfile

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match=r"cannot create a file in .* \(permission denied\)"):
        bnfreeze.freeze(guide, output=tmp_path / "out.keras")
    assert not (tmp_path / "out.keras").exists()


def test_output_name_must_match_the_format(guide, samples, tmp_path):
    with pytest.raises(OutputError, match=r"must be saved under a name ending in \.keras"):
        bnfreeze.freeze(guide, output=tmp_path / "out.h5")
    with pytest.raises(OutputError, match=r"ending in \.h5 or \.hdf5"):
        bnfreeze.freeze(samples / "nested_legacy.h5", output=tmp_path / "out.keras")
    assert listing(tmp_path) == ["in"]


def test_bad_model_file(tmp_path):
    from bnfreeze.errors import ModelFormatError

    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelFormatError):
        bnfreeze.freeze(bad, output=tmp_path / "out.keras")
    assert listing(tmp_path) == ["bad.keras"]


# --- what gets written -------------------------------------------------------------------


def test_freeze_writes_and_reports(guide, tmp_path):
    out = tmp_path / "out.keras"
    result = bnfreeze.unfreeze(guide, output=out, keep_bn_inference=True)
    assert result.output == str(out) and not result.dry_run
    assert result.engine is Engine.CONFIG
    assert result.output_bytes == out.stat().st_size
    assert result.input_bytes == guide.stat().st_size
    assert result.report.model.path == str(out)
    assert result.report.bn_training_in_fit == 0
    got = flags(out)
    assert all(got[c.path] is c.after for c in result.changes)
    assert {c.path for c in result.changes} <= set(result.selected) | {"mobilenetv2_0.35_32"}
    assert listing(tmp_path) == ["in", "out.keras"]
    assert listing(guide.parent) == ["guide.keras"]


def test_dry_run_writes_nothing(guide, tmp_path):
    before = listing(tmp_path), guide.read_bytes()
    result = bnfreeze.unfreeze(
        guide, output=tmp_path / "out.keras", keep_bn_inference=True, dry_run=True
    )
    assert result.dry_run and result.output is None and result.output_bytes is None
    assert result.changes and result.report.bn_training_in_fit == 0
    assert (listing(tmp_path), guide.read_bytes()) == before
    # Without -o too.
    assert bnfreeze.unfreeze(guide, dry_run=True, keep_bn_inference=True).changes == result.changes


def test_in_place(guide):
    inode = guide.stat().st_ino
    result = bnfreeze.unfreeze(guide, in_place=True, keep_bn_inference=True)
    assert result.output == str(guide)
    assert guide.stat().st_ino != inode  # replaced, not rewritten in place
    assert flags(guide)["mobilenetv2_0.35_32/Conv1"] is True
    assert listing(guide.parent) == ["guide.keras"]
    # Nothing to change: the file is left alone.
    inode = guide.stat().st_ino
    again = bnfreeze.unfreeze(guide, in_place=True, keep_bn_inference=True)
    assert again.changes == () and again.output is None and guide.stat().st_ino == inode


def test_existing_output_keeps_its_permissions(guide, tmp_path):
    out = tmp_path / "out.keras"
    out.write_bytes(b"old")
    out.chmod(0o640)
    bnfreeze.freeze(guide, output=out)
    assert out.stat().st_mode & 0o777 == 0o640


def test_new_output_gets_default_permissions(guide, tmp_path):
    umask = os.umask(0o022)
    try:
        bnfreeze.freeze(guide, output=tmp_path / "out.keras")
    finally:
        os.umask(umask)
    assert (tmp_path / "out.keras").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_interrupted_write_leaves_previous_output_and_no_temp(
    guide, tmp_path, monkeypatch, failure
):
    from bnfreeze.formats.writers import keras_zip

    out = tmp_path / "out.keras"
    out.write_bytes(b"previous output")

    def explode(self: Any, request: Any, dest: Path) -> Any:
        dest.write_bytes(b"half a file")
        raise failure

    monkeypatch.setattr(keras_zip.KerasZipWriter, "write", explode)
    expected = KeyboardInterrupt if failure is KeyboardInterrupt else OutputError
    with pytest.raises(expected) as info:
        bnfreeze.freeze(guide, output=out)
    if expected is OutputError:
        assert "no space left on the device" in str(info.value)
    assert out.read_bytes() == b"previous output"
    assert listing(tmp_path) == ["in", "out.keras"]
    assert not any(p.name.endswith(TEMP_SUFFIX) for p in tmp_path.iterdir())


def _config_json_lost(real_write: Any) -> Any:
    """A writer that writes the input's config.json instead of the edited one: the edit is
    lost, yet the archive is whole and every member is copied as stored."""

    def write(self: Any, request: Any, dest: Path) -> Any:
        outcome = real_write(self, request, dest)
        with zipfile.ZipFile(request.model.path) as zin:
            original = zin.read("config.json")
        stale = dest.with_name(dest.name + ".stale")
        with zipfile.ZipFile(dest) as zin, zipfile.ZipFile(stale, "w") as zout:
            for info in zin.infolist():
                data = original if info.filename == "config.json" else zin.read(info)
                zout.writestr(info, data)
        os.replace(stale, dest)
        return outcome

    return write


@pytest.mark.parametrize("previous", [None, b"previous output"], ids=["new", "existing"])
@pytest.mark.parametrize("where", ["prepare", "verify"])
def test_failed_verification_replaces_nothing(guide, tmp_path, monkeypatch, where, previous):
    """``prepare``: the new config itself is wrong, refused before the copy ends. ``verify``:
    the config checks out in memory, but the file written is not what was checked; only
    re-reading the written file before the rename finds it."""
    from bnfreeze.formats.writers import keras_zip

    out = tmp_path / "out.keras"
    if previous is not None:
        out.write_bytes(previous)
    if where == "prepare":

        def corrupt(config: dict[str, Any]) -> bytes:
            return b'{"class_name": "Functional", "config": {"layers": []}}'

        monkeypatch.setattr(keras_zip, "serialize_config", corrupt)
        message = "does not read back with the intended flags"
    else:
        writer = keras_zip.KerasZipWriter
        monkeypatch.setattr(writer, "write", _config_json_lost(writer.write))
        message = "config.json does not read back as written"
    with pytest.raises(OutputError, match=message):
        bnfreeze.freeze(guide, output=out, layers=["pool"])
    monkeypatch.undo()
    assert listing(tmp_path) == (["in"] if previous is None else ["in", "out.keras"])
    if previous is not None:
        assert out.read_bytes() == previous


#: nested_deep_keras (tests/conftest.py): every BN layer, and the frozen layers two and three
#: deep.
DEEP_BN = ["middle/inner/inner_bn", "middle/inner/core/core_bn", "middle/middle_bn", "bn"]
DEEP_FROZEN = [
    "middle/inner/inner_dense",
    "middle/inner/core",
    "middle/inner/core/core_dense",
    "middle/inner/core/core_bn",
]


@pytest.mark.keras
@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda src, out: bnfreeze.freeze(src, output=out, bn_inference=True),
            {p: False for p in DEEP_BN if p not in DEEP_FROZEN},
        ),
        (
            lambda src, out: bnfreeze.unfreeze(src, output=out, keep_bn_inference=True),
            {p: True for p in DEEP_FROZEN if p not in DEEP_BN}
            | {p: False for p in DEEP_BN if p not in DEEP_FROZEN},
        ),
        (
            lambda src, out: bnfreeze.unfreeze(src, output=out, layers=["middle/inner/core/*"]),
            {
                "middle/inner/core/core_dense": True,
                "middle/inner/core/core_bn": True,
                "middle/inner/core": True,
            },
        ),
    ],
    ids=["bn-inference", "keep-bn-inference", "three-deep-glob"],
)
def test_layers_nested_two_and_three_deep_are_edited(nested_deep_keras, tmp_path, edit, expected):
    """The config route edits layers inside containers two and three deep, and the file
    written reads back with exactly those flags (and no others changed)."""
    before = flags(nested_deep_keras)
    assert [p for p in before if before[p] is False] == DEEP_FROZEN
    out = tmp_path / "out.keras"
    result = edit(nested_deep_keras, out)
    assert {c.path: c.after for c in result.changes} == expected
    assert any(path.count("/") >= 2 for path in expected)
    assert flags(out) == before | expected


# --- selection errors --------------------------------------------------------------------


def test_unknown_layer_and_empty_selection(guide, tmp_path):
    with pytest.raises(SelectionError, match="no layer named 'block_99_add'"):
        bnfreeze.freeze(guide, output=tmp_path / "out.keras", up_to="block_99_add")
    with pytest.raises(SelectionError, match="--layers 'nothing\\*' matches no layer"):
        bnfreeze.unfreeze(guide, output=tmp_path / "out.keras", layers=["nothing*"])
    with pytest.raises(SelectionError, match="matches no layer whose flag can be set"):
        bnfreeze.freeze(guide, output=tmp_path / "out.keras", layers=["image"])
    assert listing(tmp_path) == ["in"]


def test_bn_inference_on_a_selection_without_bn(guide, tmp_path):
    with pytest.raises(SelectionError, match="holds no BatchNormalization layer"):
        bnfreeze.freeze(guide, output=tmp_path / "out.keras", bn_inference=True, layers=["head"])
    assert listing(tmp_path) == ["in"]


def test_freeze_rejects_contradicting_bn_options(guide):
    with pytest.raises(BnfreezeError, match="contradict"):
        bnfreeze.freeze(guide, dry_run=True, bn_inference=True, train_bn=True)


# --- optimizer state ---------------------------------------------------------------------


@pytest.mark.parametrize("state", list(OptimizerState))
def test_optimizer_decision_covers_every_state(state):
    cases = {
        OptimizerState.NONE: (None, True, OptimizerStateMode.REMAP),
        OptimizerState.UNCHANGED: (6, False, OptimizerStateMode.REMAP),
        OptimizerState.KEPT: (6, True, OptimizerStateMode.KEEP),
        OptimizerState.DROPPED: (6, True, OptimizerStateMode.REMAP),
    }
    if state is OptimizerState.REMAPPED:  # the config route's plan only; the Keras engine drops
        assert state not in {optimizer_decision(*case) for case in cases.values()}
        return
    assert optimizer_decision(*cases[state]) is state


def test_optimizer_dropped_when_the_trainable_set_changes(guide, tmp_path):
    result = bnfreeze.unfreeze(
        guide, output=tmp_path / "out.keras", keep_bn_inference=True, optimizer_state="drop"
    )
    assert result.optimizer_state is OptimizerState.DROPPED
    assert result.optimizer_variables == 6 and result.optimizer_variables_dropped == 6
    assert read_model(tmp_path / "out.keras").optimizer_variables is None
    assert result.report.model.optimizer_variables is None
    codes = [f.code for f in result.warnings]
    assert codes == [WarningCode.RECOMPILE_REQUIRED, WarningCode.OPTIMIZER_STATE]
    assert "were dropped" in result.warnings[1].message
    assert "fresh optimizer" in result.warnings[1].message


def test_optimizer_remapped_by_default_when_the_trainable_set_changes(guide, tmp_path):
    result = bnfreeze.unfreeze(guide, output=tmp_path / "out.keras", keep_bn_inference=True)
    assert result.optimizer_state is OptimizerState.REMAPPED
    assert result.optimizer_variables == 6 and result.optimizer_variables_dropped == 0
    plan = result.optimizer_plan
    assert (plan.kept, plan.left_out, plan.created, plan.expected) == (4, 0, 102, 108)
    assert read_model(tmp_path / "out.keras").optimizer_variables == 108
    assert result.report.model.optimizer_variables == 108
    # Remapped state is a fact, not a warning, and the one piece of advice matches it:
    # load the file (load_model restores the remapped state), no "NEW optimizer".
    assert [f.code for f in result.all_warnings] == [WarningCode.RECOMPILE_REQUIRED]
    assert "NEW optimizer" not in result.warnings[0].message
    from bnfreeze.render.edit import status_line

    line = " ".join(status_line(result).split())
    assert "were remapped to the new trainable set (108 now: 4 slots kept" in line
    assert "load_model restores them and fit() continues from them" in line


def test_optimizer_kept_on_request(guide, tmp_path):
    result = bnfreeze.unfreeze(guide, output=tmp_path / "out.keras", optimizer_state="keep")
    assert result.optimizer_state is OptimizerState.KEPT
    assert result.optimizer_variables_dropped == 0
    assert read_model(tmp_path / "out.keras").optimizer_variables == 6
    assert "were kept as they are (--optimizer-state keep)" in result.warnings[1].message
    # Said once: the result's own optimizer-state finding is not repeated.
    assert [f.code for f in result.all_warnings].count(WarningCode.OPTIMIZER_STATE) == 1


def test_optimizer_left_alone_when_the_trainable_set_does_not_change(guide, tmp_path):
    # The pooling layer owns no variables: its flag changes, the trainable set does not.
    out = tmp_path / "out.keras"
    result = bnfreeze.freeze(guide, output=out, layers=["pool"])
    assert [c.path for c in result.changes] == ["pool"]
    assert result.optimizer_state is OptimizerState.UNCHANGED
    assert read_model(out).optimizer_variables == 6
    assert [f.code for f in result.warnings] == [WarningCode.RECOMPILE_REQUIRED]


def test_nothing_changed_nothing_to_warn(guide, tmp_path):
    result = bnfreeze.freeze(guide, output=tmp_path / "out.keras", bn_inference=True)
    assert result.changes == () and result.warnings == ()
    assert result.optimizer_state is OptimizerState.UNCHANGED
    assert (tmp_path / "out.keras").read_bytes() == guide.read_bytes()


def test_no_optimizer_state(samples, tmp_path):
    result = bnfreeze.freeze(samples / "sequential.keras", output=tmp_path / "out.keras")
    assert result.optimizer_state is OptimizerState.NONE and result.optimizer_variables is None


def test_edit_warnings_text_for_a_dry_run():
    change = Change("bn", "BatchNormalization", True, True, False)
    found = edit_warnings([change], OptimizerState.DROPPED, 4, output=None, dry_run=True)
    assert found[0] == Finding(
        WarningCode.RECOMPILE_REQUIRED,
        None,
        "1 trainable flag(s) changed. Load the model with keras.models.load_model before "
        "fit(): the loaded model is compiled for the new flags. A model already compiled in "
        "memory ignores the change until compile() is called again with a new optimizer "
        "(rule 4 of docs/semantics.md, bnfreeze explain).",
    )
    assert found[1].message.startswith("The 4 saved optimizer variables would be dropped")
    assert edit_warnings([], OptimizerState.DROPPED, 4, output=None, dry_run=True) == ()


# --- routes ------------------------------------------------------------------------------


def subclassed(samples: Path, tmp_path: Path) -> Path:
    def edit(config: dict[str, Any]) -> None:
        config.clear()
        config.update(
            {
                "module": "mypkg",
                "class_name": "MyModel",
                "registered_name": "mypkg>MyModel",
                "config": {"name": "my_model", "trainable": True},
            }
        )

    return rewrite_config(samples / "seed_bn.keras", tmp_path / "sub.keras", edit)


def custom_layer(samples: Path, tmp_path: Path) -> Path:
    def edit(config: dict[str, Any]) -> None:
        layer = config["config"]["layers"][1]  # dense_1
        layer.update(
            {"module": "mypkg.layers", "class_name": "MyNorm", "registered_name": "mypkg>MyNorm"}
        )

    return rewrite_config(samples / "sequential.keras", tmp_path / "custom.keras", edit)


@pytest.fixture()
def fake_engine(monkeypatch):
    """The Keras route, replaced: it records the requests it gets."""
    calls: list[EditRequest] = []

    class FakeKerasRoute:
        def edit(self, request):
            calls.append(request)
            return "engine result"

    from bnfreeze.runtime import keras_route

    monkeypatch.setattr(keras_route, "KerasRoute", FakeKerasRoute)
    return calls


def test_config_route_limits(samples, tmp_path):
    sub = read_model(subclassed(samples, tmp_path))
    walked = walk(sub.config)
    reason = config_route.config_route_limit(sub, walked.layers, walked.lists_layers)
    assert reason is not None and "subclassed model" in reason
    seq = read_model(samples / "sequential.keras")
    walked = walk(seq.config)
    assert config_route.config_route_limit(seq, walked.layers, walked.lists_layers) is None


def test_custom_layers_need_keras_only_when_bn_and_others_differ(samples, tmp_path):
    path = custom_layer(samples, tmp_path)
    layers = walk(read_model(path).config).layers
    assert config_route.custom_batchnorm_limit(Assignment.freeze(), layers) is None
    reason = config_route.custom_batchnorm_limit(Assignment.freeze(bn_inference=True), layers)
    assert reason is not None and "MyNorm" in reason
    # A plain freeze goes through the config route and edits the custom layer too.
    result = bnfreeze.freeze(path, output=tmp_path / "out.keras")
    assert result.engine is Engine.CONFIG and flags(tmp_path / "out.keras")["dense_1"] is False


@pytest.mark.parametrize(
    ("make", "engine", "kwargs"),
    [
        (subclassed, "auto", {}),
        (custom_layer, "auto", {"bn_inference": True}),
        (lambda s, t: s / "sequential.keras", "keras", {}),
    ],
    ids=["subclassed", "custom-bn-candidate", "requested"],
)
def test_keras_engine_receives_the_request(samples, tmp_path, fake_engine, make, engine, kwargs):
    path = make(samples, tmp_path)
    got = bnfreeze.freeze(
        path, output=tmp_path / "out.keras", engine=engine, layers=("*",), **kwargs
    )
    assert got == "engine result"
    (request,) = fake_engine
    assert request.loading.engine is Engine(engine)
    assert request.model == str(path) and request.output.path == str(tmp_path / "out.keras")
    assert request.selection.layers == ("*",)


def test_config_engine_refuses_what_it_cannot_do(samples, tmp_path, fake_engine):
    with pytest.raises(
        BnfreezeError, match="the config route cannot edit this model: it is a subclassed model"
    ):
        bnfreeze.freeze(
            subclassed(samples, tmp_path), output=tmp_path / "out.keras", engine="config"
        )
    assert fake_engine == []


@pytest.mark.parametrize(
    ("engine", "route"),
    [("auto", "ConfigRoute"), ("config", "ConfigRoute"), ("keras", "KerasRoute")],
)
def test_one_function_chooses_the_route(engine, route):
    request = EditRequest("m.keras", Assignment.freeze(), loading=Loading(Engine(engine)))
    chosen = routes.route_for(request)
    assert type(chosen).__name__ == route
    if route == "ConfigRoute":
        fallback = chosen.fallback  # the Keras engine (imported when used), only for auto
        assert (type(fallback).__name__ if fallback else None) == (
            "LazyKerasRoute" if engine == "auto" else None
        )


def test_all_warnings_says_each_thing_once(guide, tmp_path):
    result = bnfreeze.unfreeze(guide, output=tmp_path / "out.keras", optimizer_state="keep")
    assert result.all_warnings[: len(result.warnings)] == result.warnings
    assert set(result.report.warnings) - set(result.all_warnings) <= {
        f for f in result.report.warnings if f.code is WarningCode.OPTIMIZER_STATE
    }


def test_a_request_takes_any_assignment(samples, tmp_path):
    request = EditRequest(
        str(samples / "sequential.keras"),
        Assignment(others=False, batchnorm=None),
        LayerSelection(("dense_*",)),
        Output(str(tmp_path / "o.keras")),
    )
    result = routes.edit(request)
    assert [c.path for c in result.changes] == ["dense_1", "dense_2"]


def test_planning_writes_nothing_and_commit_writes_the_plan(guide, tmp_path):
    """Plan, then commit: the plan is the result a dry run shows; committing it writes the
    output once and returns that result with the output's size."""
    from bnfreeze.formats.readers import read_model as read
    from bnfreeze.model.walk import walk as walk_config

    out = tmp_path / "out.keras"
    request = EditRequest(
        str(guide), Assignment.unfreeze(keep_bn_inference=True), output=Output(str(out))
    )
    model = read(guide)
    layers = walk_config(model.config).layers
    selected = tuple(r for r in layers if r.kind.value != "input")
    plan = config_route.plan_edit(
        request, model, layers, config_route.editable(model.config, selected)
    )
    assert not out.exists() and plan.writes
    result = config_route.commit(plan)
    assert result.output_bytes == out.stat().st_size
    assert result.report is plan.report and result.report.model.path == str(out)
    assert result.optimizer_state is OptimizerState.REMAPPED
    dry = bnfreeze.unfreeze(guide, keep_bn_inference=True, dry_run=True)
    assert dry.changes == result.changes and dry.optimizer_state is result.optimizer_state


@pytest.mark.parametrize(
    ("edit", "upgraded"),
    [
        # The trainable set changes: the archive is copied once, with the optimizer state as
        # it was, while the plan is made; then its weights member is patched in place
        # (dropped or remapped), not written a second time.
        (
            lambda src, out: bnfreeze.unfreeze(
                src, output=out, keep_bn_inference=True, optimizer_state="drop"
            ),
            True,
        ),
        (lambda src, out: bnfreeze.unfreeze(src, output=out, keep_bn_inference=True), "remap"),
        # It does not: the copy is the output.
        (lambda src, out: bnfreeze.freeze(src, output=out, layers=["pool"]), None),
    ],
    ids=["dropped", "remapped", "unchanged"],
)
def test_the_archive_is_written_once(guide, tmp_path, monkeypatch, edit, upgraded):
    from bnfreeze.formats.writers import keras_zip as writer

    seen: list[object] = []
    real_write, real_upgrade = writer.KerasZipWriter.write, writer.KerasZipWriter.upgrade

    def write(self, request, dest):
        seen.append("remap" if request.optimizer_slots else request.drop_optimizer_state)
        return real_write(self, request, dest)

    def upgrade(self, written, request, dest):
        outcome = real_upgrade(self, written, request, dest)
        seen.append(("upgraded", outcome is not None))
        return outcome

    monkeypatch.setattr(writer.KerasZipWriter, "write", write)
    monkeypatch.setattr(writer.KerasZipWriter, "upgrade", upgrade)
    out = tmp_path / "out.keras"
    result = edit(guide, out)
    assert seen == ([False] if upgraded is None else [False, ("upgraded", True)])
    expected = {True: None, None: 6, "remap": 108}[upgraded]
    assert read_model(out).optimizer_variables == expected
    assert result.report.model.optimizer_variables == expected
    with zipfile.ZipFile(out) as archive:
        assert archive.testzip() is None  # every member's CRC, the patched one included


def test_an_archive_the_writer_cannot_patch_is_written_again(guide, tmp_path, monkeypatch):
    """When the copy made while planning cannot be patched into the planned file, the
    archive is written again from the input, and the output is the planned one."""
    from bnfreeze.formats.writers import keras_zip as writer

    seen: list[object] = []
    real_write = writer.KerasZipWriter.write

    def write(self, request, dest):
        seen.append(request.drop_optimizer_state)
        return real_write(self, request, dest)

    monkeypatch.setattr(writer.KerasZipWriter, "write", write)
    monkeypatch.setattr(writer.KerasZipWriter, "upgrade", lambda *args: None)
    out = tmp_path / "out.keras"
    bnfreeze.unfreeze(guide, output=out, keep_bn_inference=True, optimizer_state="drop")
    assert seen == [False, True]
    assert read_model(out).optimizer_variables is None
    with zipfile.ZipFile(out) as archive:
        assert archive.testzip() is None


def test_an_error_while_planning_waits_for_the_copy_and_leaves_nothing(
    guide, tmp_path, monkeypatch
):
    """The plan fails while the copy runs: the copy ends, no output and no temporary file is
    left, and the error is the plan's."""
    from bnfreeze.errors import BnfreezeError
    from bnfreeze.ops import config_route

    def failing(flags):
        raise BnfreezeError("the plan failed")

    monkeypatch.setattr(config_route, "complete", failing)
    out = tmp_path / "out.keras"
    with pytest.raises(BnfreezeError, match="the plan failed"):
        bnfreeze.unfreeze(guide, output=out, keep_bn_inference=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # the input's folder
    assert sorted(p.name for p in guide.parent.iterdir()) == ["guide.keras"]


def test_the_python_api_takes_optimizer_state(guide):
    import bnfreeze

    result = bnfreeze.unfreeze(guide, keep_bn_inference=True, dry_run=True, optimizer_state="drop")
    assert result.optimizer_state is OptimizerState.DROPPED
    result = bnfreeze.unfreeze(guide, keep_bn_inference=True, dry_run=True)
    assert result.optimizer_state is OptimizerState.REMAPPED
    result = bnfreeze.unfreeze(guide, keep_bn_inference=True, dry_run=True, optimizer_state="keep")
    assert result.optimizer_state is OptimizerState.KEPT


@pytest.mark.parametrize("mode", list(OptimizerStateMode))
def test_every_optimizer_state_mode_is_offered_everywhere(mode):
    from bnfreeze.cli import cli
    from bnfreeze.ops.plan_schema import OPTIMIZER_STATES

    assert parse_mode(mode.value) is mode
    assert mode.value in OPTIMIZER_STATES
    for command in ("freeze", "unfreeze", "apply"):
        option = next(p for p in cli.commands[command].params if p.name == "optimizer_state")
        assert mode.value in option.type.choices
