"""``diff``: the layers whose flag or fit() behaviour differ, the weights verdict (a checksum
per dataset) and the change in the number of layers that train."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import json_schemas
import pytest
from click.testing import CliRunner
from paths import ROOT

import bnfreeze
from bnfreeze.cli import cli
from bnfreeze.formats.readers import read_model
from bnfreeze.formats.readers.checksums import SLICE_BYTES, checksums, dataset_digest
from bnfreeze.ops.diff import LayerStatus, diff_files
from bnfreeze.ops.inspect import inspect_file


def run(*args: str):
    return CliRunner(env={"COLUMNS": "100", "NO_COLOR": "1"}).invoke(
        cli, ["diff", *map(str, args)], catch_exceptions=False
    )


@pytest.fixture(scope="module")
def frozen_copies(samples, tmp_path_factory):
    """Each sample frozen entirely (every layer trainable=False) with bnfreeze freeze."""

    folder = tmp_path_factory.mktemp("diff")
    out = {}
    for name in ("guide_pattern.keras", "bn_under_frozen.keras"):
        out[name] = folder / f"frozen_{name}"
        bnfreeze.freeze(samples / name, output=out[name])
    return out


def test_diff_against_own_frozen_copy_lists_exactly_the_changed_layers(samples, frozen_copies):
    a = samples / "bn_under_frozen.keras"
    b = frozen_copies["bn_under_frozen.keras"]
    result = run(a, b)
    assert result.exit_code == 0
    assert [line.rstrip() for line in result.stdout.splitlines()] == [
        f"A  {a}",
        f"B  {b}",
        "",
        "3 layers differ in flag or fit() behaviour:",
        "path               class               trainable A → B  in fit() A → B",
        "────────────────────────────────────────────────────────────────────────────",
        "backbone/inner_bn  BatchNormalization  True → False     training → inference",
        "head_bn            BatchNormalization  True → False     training → inference",
        "head               Dense               True → False     trains → frozen",
        "",
        "Training layers  3 → 0 (-3) layers whose weights train in fit()",
        "BN in fit()      2 training / 0 inference → 0 training / 2 inference",
        "Weights          weights identical (12 datasets)",
    ]


def test_diff_of_the_guide_sample_and_its_frozen_copy(samples, frozen_copies):
    a = samples / "guide_pattern.keras"
    result = run(a, frozen_copies["guide_pattern.keras"], "--json")
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    json_schemas.validate("diff", document)
    assert document["a"] == {
        "path": str(a),
        "format": "keras",
        "keras_version": "3.15.1",
        "compiled": True,
        "optimizer_variables": 6,
        "keras_hub": None,
    }
    assert document["b"]["path"] == str(frozen_copies["guide_pattern.keras"])
    assert document["runtime"]["name"] == "keras3" and document["runtime"]["measured"] is False
    trainable_before = {s.layer.path for s in inspect_file(a).layers if s.layer.trainable is True}
    assert trainable_before == {"pool", "head"}  # the backbone was already frozen
    assert [row["path"] for row in document["layers"]] == ["pool", "head"]
    assert document["layers"][1] == {
        "path": "head",
        "class_name": "Dense",
        "status": "changed",
        "a": {
            "trainable": True,
            "in_fit": {
                "trains_weights": True,
                "normalizes_with": None,
                "updates_moving_stats": None,
            },
        },
        "b": {
            "trainable": False,
            "in_fit": {
                "trains_weights": False,
                "normalizes_with": None,
                "updates_moving_stats": None,
            },
        },
    }
    assert document["training_layers"] == {"a": 1, "b": 0, "change": -1}
    assert document["weights"]["identical"] is True
    assert document["weights"]["changed"] == []
    # The trainable set changed: freeze remapped the 6 saved optimizer variables to the new,
    # empty trainable set, which leaves the iteration count and the learning rate.
    assert document["optimizer_state"] == {"a": 6, "b": 2, "identical": False}
    table = run(a, frozen_copies["guide_pattern.keras"])
    assert "weights identical" in table.stdout
    assert "Optimizer state  6 variables → 2 variables" in table.stdout


def test_a_model_against_itself(samples):
    path = samples / "nested_legacy.h5"
    result = run(path, path, "--exit-code")
    assert result.exit_code == 0
    assert "No layer differs in flag or fit() behaviour." in result.stdout
    assert "weights identical (16 datasets)" in result.stdout
    assert "Optimizer state  identical (22 datasets)" in result.stdout


def _with_changed_weight(src: Path, dst: Path, dataset: str) -> None:
    """A copy of a .keras file in which one weight value differs (test scaffolding)."""
    import h5py

    work = dst.parent / "weights.h5"
    with zipfile.ZipFile(src) as archive:
        work.write_bytes(archive.read("model.weights.h5"))
        members = [(i, archive.read(i.filename)) for i in archive.infolist()]
    with h5py.File(work, "r+") as h5:
        values = h5[dataset][()]
        values.flat[0] += 1.0
        h5[dataset][...] = values
    with zipfile.ZipFile(dst, "w") as out:
        for info, data in members:
            if info.filename == "model.weights.h5":
                data = work.read_bytes()
            out.writestr(info, data)


def test_changed_weights_are_reported_by_dataset_and_layer(samples, tmp_path):
    src = samples / "bn_under_frozen.keras"
    index = read_model(src).weights.variables
    target = index["head"][0]
    dst = tmp_path / "changed.keras"
    _with_changed_weight(src, dst, target)
    result = diff_files(src, dst)
    assert result.layers == ()
    assert not result.weights.identical
    assert result.weights.changed == (target,)
    assert result.weights.changed_layers == ("head",)
    cli_result = run(src, dst, "--exit-code")
    assert cli_result.exit_code == 1
    assert "weights differ: 1 of 12 datasets changed" in cli_result.stdout


def test_layers_only_in_one_model(samples):
    result = diff_files(samples / "sequential.keras", samples / "seed_bn.keras")
    statuses = {row.path: row.status for row in result.layers}
    assert statuses["dense_1"] is LayerStatus.ONLY_IN_A
    assert statuses["batch_normalization"] is LayerStatus.ONLY_IN_B
    # The two share no layer path; CHANGED rows are covered by the frozen-copy tests above.
    assert set(statuses.values()) == {LayerStatus.ONLY_IN_A, LayerStatus.ONLY_IN_B}
    assert not result.weights.identical


def test_checksum_streams_large_datasets_in_slices(tmp_path):
    import h5py
    import numpy as np

    rows = 3 * SLICE_BYTES // (4 * 1024) + 7
    data = np.arange(rows * 1024, dtype="float32").reshape(rows, 1024)
    with h5py.File(tmp_path / "a.h5", "w") as h5:
        h5["x"] = data
        h5["s"] = np.float32(2.0)
    with h5py.File(tmp_path / "a.h5", "r") as h5:
        import hashlib

        whole = hashlib.blake2b(digest_size=16)
        whole.update(f"{h5['x'].dtype.str}{h5['x'].shape}".encode())
        whole.update(data.tobytes())
        assert dataset_digest(h5["x"]) == whole.hexdigest()
        assert dataset_digest(h5["s"]) != dataset_digest(h5["x"])


def test_checksums_keep_optimizer_state_apart(samples):
    sums = checksums(read_model(samples / "guide_pattern.keras"))
    assert len(sums.optimizer) == 6
    assert all(name.startswith("/optimizer/") for name in sums.optimizer)
    assert not any(name.startswith("/optimizer") for name in sums.weights)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.keras", "{seed}"], "error: missing.keras: no such file."),
        (["{seed}", "{configs}"], "a directory, not a model"),
        (["{seed}", "{seed}", "--export", "x.png"], "the file name must end in .svg or .html"),
        (["{seed}", "{seed}", "--export", "x.svg", "--json"], "cannot be used with --json"),
    ],
)
def test_bad_input_exits_2(samples, tmp_path, args, message):
    configs = ROOT / "bnfreeze" / "recipes"
    fmt = {"seed": samples / "seed_bn.keras", "configs": configs}
    result = run(*[a.format(**fmt) for a in args])
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_diff_never_writes(samples, tmp_path):
    a = tmp_path / "a.keras"
    shutil.copy(samples / "seed_bn.keras", a)
    before = a.read_bytes()
    run(a, a)
    assert a.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.keras"]


def test_damaged_weights_exit_2_and_the_interpreter_exits_cleanly(samples, tmp_path):
    """A fresh interpreter: h5py must never be left holding a failed Python-file open, which
    crashes the process at exit (SIGSEGV, exit 139) after the error was printed."""
    import subprocess
    import sys

    damaged = tmp_path / "damaged.keras"
    with zipfile.ZipFile(samples / "seed_bn.keras") as a, zipfile.ZipFile(damaged, "w") as b:
        for info in a.infolist():
            data = a.read(info.filename)
            if info.filename == "model.weights.h5":
                data = data[:64] + b"\0" * (len(data) - 64)
            b.writestr(info, data)
    done = subprocess.run(
        [sys.executable, "-m", "bnfreeze", "diff", str(samples / "seed_bn.keras"), str(damaged)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ")
    assert "Traceback" not in done.stderr
