"""``inspect --strip`` (one cell per layer, coloured by fit() mode) and ``--export`` (what the
terminal shows, saved as SVG or HTML through Rich's console recording)."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from bnfreeze.cli import cli
from bnfreeze.model.records import (
    FitBehaviour,
    LayerKind,
    LayerRecord,
    LayerState,
    Normalization,
    Report,
    Runtime,
)
from bnfreeze.ops.inspect import inspect_file
from bnfreeze.render.strip import GLYPH, LABEL, STYLE, Cell, Strip, cell_of, runs, strip_cells


def invoke(*args: str, columns: int = 100):
    return CliRunner(env={"COLUMNS": str(columns), "NO_COLOR": "1"}).invoke(
        cli, [*map(str, args)], catch_exceptions=False
    )


def render(renderable, width: int = 100) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, soft_wrap=False)
    console.print(renderable)
    return console.file.getvalue()


def state(
    path: str,
    kind: LayerKind,
    *,
    trainable: bool | None = True,
    has_weights: bool | None = True,
    trains: bool | None = None,
    mode: Normalization | None = None,
) -> LayerState:
    record = LayerRecord(path, path.rsplit("/", 1)[-1], "X", kind, path.count("/"), None, trainable)
    fit = FitBehaviour(trains, mode, None if mode is None else mode is Normalization.BATCH)
    return LayerState(record, has_weights, fit, fit)


# ------------------------------------------------------------------------------ cells

CELL_CASES = {
    Cell.TRAINING: state("conv", LayerKind.LAYER, trains=True),
    Cell.FROZEN: state("conv", LayerKind.LAYER, trainable=False, trains=False),
    Cell.BN_INFERENCE: state(
        "bn", LayerKind.BATCHNORM, trainable=False, trains=False, mode=Normalization.MOVING
    ),
    Cell.NO_WEIGHTS: state("relu", LayerKind.LAYER, has_weights=False),
    Cell.UNKNOWN: state("custom", LayerKind.UNKNOWN, has_weights=None),
}


@pytest.mark.parametrize("cell", list(Cell), ids=lambda c: c.value)
def test_every_cell_kind(cell):
    assert cell_of(CELL_CASES[cell]) is cell
    assert GLYPH[cell] and STYLE[cell] and LABEL[cell]


def test_glyphs_differ_so_the_strip_reads_without_colour():
    assert len(set(GLYPH.values())) == len(Cell)


def test_bn_in_training_mode_is_a_training_cell():
    bn = state("bn", LayerKind.BATCHNORM, trains=True, mode=Normalization.BATCH)
    assert cell_of(bn) is Cell.TRAINING


def test_guide_sample_cells_and_boundary(samples):
    report = inspect_file(samples / "guide_pattern.keras")
    cells = strip_cells(report)
    counts = {c: sum(1 for _, x in cells if x is c) for c in Cell}
    assert counts == {
        Cell.TRAINING: 1,
        Cell.FROZEN: 51,
        Cell.BN_INFERENCE: 51,
        Cell.NO_WEIGHTS: 51,
        Cell.UNKNOWN: 0,
    }
    assert len(cells) == len(report.layers) - 1  # the backbone container is not a cell
    found = runs(cells)
    assert [(r.training, r.first, r.last, r.first_path, r.last_path) for r in found] == [
        (False, 1, 152, "image", "mobilenetv2_0.35_32/block_16_project_BN"),
        (True, 153, 154, "pool", "head"),
    ]


def test_inspect_strip_golden(samples):
    path = samples / "bn_under_frozen.keras"
    result = invoke("inspect", path, "--strip")
    assert result.exit_code == 0
    lines = [line.rstrip() for line in result.stdout.splitlines()]
    assert lines[-6:] == [
        "In fit(), one cell per layer in model order (6 layers):",
        "1 ··░███",
        "█ training 3   ░ frozen 1   ▒ BN inference 0   · no weights 2",
        "",
        "        1-3  not training  features … backbone/inner_dense",
        "        4-6  training      backbone/inner_bn … head",
    ]
    assert lines[0].startswith("File ")


def _big_report(n: int) -> Report:
    """n layers: the first 60% frozen (conv, BN in inference, relu), the rest training."""
    states = []
    for i in range(n):
        frozen = i < n * 0.6
        kind = i % 3
        if kind == 0:
            states.append(
                state(f"conv_{i}", LayerKind.LAYER, trainable=not frozen, trains=not frozen)
            )
        elif kind == 1:
            mode = Normalization.MOVING if frozen else Normalization.BATCH
            states.append(
                state(
                    f"bn_{i}",
                    LayerKind.BATCHNORM,
                    trainable=not frozen,
                    trains=not frozen,
                    mode=mode,
                )
            )
        else:
            states.append(state(f"relu_{i}", LayerKind.LAYER, has_weights=False))
    from bnfreeze.model.records import ModelFile, ModelFormat

    model = ModelFile("big.keras", ModelFormat.KERAS, {}, None, False)
    return Report(model, Runtime.KERAS3, True, tuple(states), ())


@pytest.mark.parametrize("width", [40, 80, 100, 200])
def test_a_thousand_layers_wrap_to_the_width(width):
    cells = strip_cells(_big_report(1000))
    text = render(Strip(cells), width=width)
    lines = text.splitlines()
    per_line = len(lines[0]) - 5  # "   1 " prefix: 4 digits and a space
    assert per_line % 10 == 0 and per_line <= width - 5
    assert len(lines) == math.ceil(1000 / per_line)
    assert all(len(line) <= width for line in lines)
    starts = [int(line[:4]) for line in lines]
    assert starts == [1 + per_line * k for k in range(len(lines))]
    glyphs = "".join(line[5:] for line in lines)
    assert len(glyphs) == 1000
    # The frozen boundary: before layer 601 nothing trains, from there on conv and BN do.
    assert GLYPH[Cell.TRAINING] not in glyphs[:600]
    assert GLYPH[Cell.FROZEN] not in glyphs[600:]
    # Layer 600 is a relu (no weights) between the runs: it joins the run after it.
    assert [(r.training, r.first) for r in runs(cells)] == [(False, 1), (True, 600)]


def test_strip_rejects_other_views(samples):
    result = invoke("inspect", samples / "seed_bn.keras", "--strip", "--json")
    assert result.exit_code == 2
    assert "--strip is its own view" in result.stderr


# ----------------------------------------------------------------------------- export


def _commands(samples: Path) -> dict[str, list[str]]:
    guide = samples / "guide_pattern.keras"
    return {
        "inspect": ["inspect", str(guide)],
        "inspect --strip": ["inspect", str(guide), "--strip"],
        "check": [
            "check",
            str(samples / "bn_under_frozen.keras"),
            "--expect",
            "bn-inference",
            "-v",
        ],
        "diff": ["diff", str(guide), str(samples / "sequential.keras")],
    }


@pytest.mark.parametrize("command", ["inspect", "inspect --strip", "check", "diff"])
@pytest.mark.parametrize("suffix", [".svg", ".html"])
def test_export_saves_what_the_terminal_shows(samples, tmp_path, command, suffix):
    args = _commands(samples)[command]
    out = tmp_path / f"report{suffix}"
    plain = invoke(*args)
    exported = invoke(*args, "--export", out)
    assert exported.exit_code == plain.exit_code
    assert exported.stdout == plain.stdout
    assert f"saved {out}" in exported.stderr
    text = out.read_text()
    assert text.lstrip().startswith("<svg" if suffix == ".svg" else "<!DOCTYPE html>")
    # Every word the terminal showed is in the file (SVG escapes spaces as &#160;).
    flat = re.sub(r"<[^>]+>", "", text).replace("&#160;", " ")
    for word in re.findall(r"[A-Za-z_][A-Za-z0-9_.]{3,}", plain.stdout)[:40]:
        assert word in flat
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary left


def test_check_export_on_success_records_the_verbose_view(samples, tmp_path):
    out = tmp_path / "gate.svg"
    result = invoke(
        "check", samples / "guide_pattern.keras", "--expect", "bn-inference", "--export", out
    )
    assert result.exit_code == 0
    assert "PASS" in result.stdout and "holds" in result.stdout
    assert "PASS" in out.read_text()


def test_exported_svg_renders_to_a_picture_that_is_not_blank(samples, tmp_path):
    cairosvg = pytest.importorskip("cairosvg")
    from PIL import Image

    svg = tmp_path / "strip.svg"
    result = invoke("inspect", samples / "guide_pattern.keras", "--strip", "--export", svg)
    assert result.exit_code == 0
    png = tmp_path / "strip.png"
    cairosvg.svg2png(url=str(svg), write_to=str(png))
    image = Image.open(png).convert("RGB")
    assert image.width > 400 and image.height > 150
    colours = image.getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 10
    # The strip's own colours are in the picture: the training cell's green and the
    # BN-inference cyan of Rich's SVG palette.
    svg_text = svg.read_text()
    fills = set(re.findall(r"fill: (#[0-9a-f]{6})", svg_text))
    assert len(fills) >= 4


@pytest.mark.parametrize(
    ("export", "message"),
    [
        ("report.png", "the file name must end in .svg or .html"),
        ("missing_folder/report.svg", "does not exist"),
    ],
)
def test_bad_export_path_exits_2_before_any_work(samples, tmp_path, export, message):
    result = invoke("inspect", samples / "seed_bn.keras", "--export", tmp_path / export)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_export_replaces_an_existing_report_atomically(samples, tmp_path):
    out = tmp_path / "r.html"
    out.write_text("old")
    assert invoke("inspect", samples / "seed_bn.keras", "--export", out).exit_code == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)  # readable like any report
