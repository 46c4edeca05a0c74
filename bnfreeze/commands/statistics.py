"""The commands about BN statistics that are not flag edits: ``recalibrate`` (re-estimate the
moving statistics from data; loads Keras) and ``freeze --bn-frozen-stats``'s conversion (a class
change in the config, no Keras), which :mod:`bnfreeze.commands.edit` hands over here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import click

from bnfreeze.commands.support import (
    MODEL_PATH,
    emit_warnings,
    is_quiet,
    loading_options,
    note,
    quiet_option,
    stderr_console,
    stdout_console,
)


def run_frozen_stats(
    model: str,
    layers: tuple[str, ...],
    up_to: str | None,
    other_mode: bool,
    *,
    output: str | None,
    dry_run: bool,
    in_place: bool,
    as_json: bool,
    **flag_options: Any,
) -> None:
    """``freeze --bn-frozen-stats``: a class change, not a flag edit
    (:mod:`bnfreeze.ops.frozen_stats`)."""
    from bnfreeze.ops.frozen_stats import BnClass, convert_file

    if other_mode:
        raise click.UsageError(
            "--bn-frozen-stats changes the BN layers' class, not flags: use it without "
            "--bn-inference and --train-bn."
        )
    defaults = {"optimizer_state": None, "engine": "auto", "custom_objects": None, "unsafe": False}
    flag_only = [n for n, d in defaults.items() if flag_options.get(n, d) != d]
    if flag_only:
        name = "--" + flag_only[0].replace("_", "-")
        raise click.UsageError(f"{name} does not apply to --bn-frozen-stats (no flag changes).")
    if output is None and not dry_run and not in_place:
        raise click.UsageError("-o OUT is required unless --dry-run or --in-place is given.")
    result = convert_file(
        model,
        output,
        BnClass.FROZEN_STATS,
        layers=tuple(layers),
        up_to=up_to,
        dry_run=dry_run,
        in_place=in_place,
    )
    if as_json:
        from bnfreeze.render.frozen_stats import render_convert

        click.echo(render_convert(result))
    else:
        from bnfreeze.render.frozen_stats import convert_view

        stdout_console().print(convert_view(result))
    from bnfreeze.render.frozen_stats import status_line

    note(status_line(result))
    emit_warnings(result.warnings)


@click.command()
@quiet_option
@click.argument("model", type=MODEL_PATH)
@click.option(
    "--data",
    required=True,
    metavar="PATH",
    help="Inputs: a .npy array, a .npz archive (see --key) or a folder of images.",
)
@click.option("--key", default=None, metavar="NAME", help="The array of a .npz to use.")
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Batch size."
)
@click.option(
    "--batches",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many batches (default: all the data).",
)
@click.option(
    "--layers",
    "layers",
    multiple=True,
    metavar="GLOB",
    help="Only BN layers whose path or name matches (repeatable; a container selects below).",
)
@click.option("--up-to", "up_to", metavar="LAYER", default=None, help="Only up to LAYER.")
@click.option("--from", "from_layer", metavar="LAYER", default=None, help="Only from LAYER.")
@click.option("-o", "--output", default=None, metavar="OUT", help="Write the result to OUT.")
@click.option("--in-place", is_flag=True, help="Rewrite MODEL itself (atomically).")
@click.option("--dry-run", is_flag=True, help="Compute and print; write nothing.")
@loading_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout.")
def recalibrate(
    model: str,
    data: str,
    key: str | None,
    batch_size: int,
    batches: int | None,
    layers: tuple[str, ...],
    up_to: str | None,
    from_layer: str | None,
    output: str | None,
    in_place: bool,
    dry_run: bool,
    custom_objects: str | None,
    unsafe: bool,
    as_json: bool,
) -> None:
    """Re-estimate the moving statistics of BN layers (all by default) from data.

    Each selected layer's moving mean and variance become the average, with equal weight
    per batch, of the batch statistics Keras's training-mode update uses: for after weight
    averaging (EMA, SWA), a new input size or domain. Nothing else changes: the output is
    the input with those values rewritten, every other byte identical. Loads Keras.

    \b
    Examples:
      bnfreeze recalibrate model.keras --data images.npy -o recalibrated.keras
      bnfreeze recalibrate model.keras --data train.npz --key x --batches 100 --in-place
      bnfreeze recalibrate model.keras --data photos/ --layers 'block5*' -o out.keras
    """
    from bnfreeze.runtime.environment import progress_on_stderr, runtime_info
    from bnfreeze.runtime.recalibrate_file import RecalibrateRequest, recalibrate_file

    if output is None and not dry_run and not in_place:
        raise click.UsageError("-o OUT is required unless --dry-run or --in-place is given.")
    request = RecalibrateRequest(
        model=model,
        output=output,
        data=data,
        key=key,
        batch_size=batch_size,
        batches=batches,
        layers=layers,
        up_to=up_to,
        from_layer=from_layer,
        in_place=in_place,
        dry_run=dry_run,
        custom_objects=custom_objects,
        unsafe=unsafe,
    )
    with (
        progress_on_stderr(enabled=not is_quiet()) as status,
        batch_progress(enabled=not is_quiet()) as progress,
    ):
        result = recalibrate_file(request, progress=progress, status=status)
    if as_json:
        from bnfreeze.render.recalibrate import render_recalibrate

        click.echo(render_recalibrate(result, runtime_info()))
    else:
        from bnfreeze.render.recalibrate import recalibrate_view

        stdout_console().print(recalibrate_view(result))
    from bnfreeze.render.recalibrate import status_line

    note(status_line(result))


@contextlib.contextmanager
def batch_progress(enabled: bool) -> Iterator[Any]:
    """A Rich progress bar on stderr (batches done, of how many, and the rate), created on the
    first batch; nothing when quiet."""
    bars: list[Any] = []

    def update(done: int, total: int | None, samples: int) -> None:
        if not enabled:
            return
        if not bars:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            bar = Progress(
                TextColumn("batches"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                console=stderr_console(),
                transient=True,
            )
            bar.start()
            bars.append((bar, bar.add_task("batches", total=total, rate="")))
        bar, task = bars[0]
        elapsed = bar.tasks[0].elapsed or 0.0
        rate = f"{done / elapsed:.1f} batches/s" if elapsed > 0 else ""
        bar.update(task, completed=done, total=total, rate=rate)

    try:
        yield update
    finally:
        if bars:
            bars[0][0].stop()
