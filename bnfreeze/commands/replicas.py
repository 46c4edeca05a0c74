"""The data-parallel commands: ``sync-bn`` (turn ``synchronized`` on or off in a saved file),
and the ``--replicas N`` runs of ``verify`` and ``explain`` (one step on N simulated devices,
in a fresh process)."""

from __future__ import annotations

import click

from bnfreeze.commands.support import MODEL_PATH, is_quiet, note, quiet_option, stderr_width
from bnfreeze.render.findings import warning_text


@click.command("sync-bn")
@quiet_option
@click.argument("model", type=MODEL_PATH)
@click.argument("setting", type=click.Choice(["on", "off"]))
@click.option("-o", "--output", default=None, metavar="OUT", help="Write the result here.")
@click.option(
    "--layers",
    "layers",
    multiple=True,
    metavar="GLOB",
    help="Only BN layers whose path or name matches GLOB (repeatable).",
)
@click.option("--dry-run", is_flag=True, help="Print what would change; write nothing.")
@click.option("--in-place", is_flag=True, help="Rewrite MODEL itself (atomically).")
def sync_bn(
    model: str,
    setting: str,
    output: str | None,
    layers: tuple[str, ...],
    dry_run: bool,
    in_place: bool,
) -> None:
    """Turn BatchNormalization(synchronized=...) on or off in a saved model.

    synchronized=True makes each BN normalize over the global batch under tf.distribute
    (docs/data-parallel.md), but Keras loads such a file only on TensorFlow. Only the config
    changes; the weights are copied as they are. tf_keras SyncBatchNormalization layers of a
    legacy .h5 become BatchNormalization with the setting given.

    \b
    Examples:
      bnfreeze sync-bn trained_on_tf.keras off -o for_jax.keras
      bnfreeze sync-bn model.keras on -o synchronized.keras
      bnfreeze sync-bn legacy_sync.h5 off -o converted.h5
    """
    from bnfreeze.ops.sync import set_synchronized_file
    from bnfreeze.render.sync import sync_lines

    result = set_synchronized_file(
        model,
        output,
        synchronized=setting == "on",
        layers=layers,
        dry_run=dry_run,
        in_place=in_place,
    )
    for line in sync_lines(result):
        click.echo(line)
    if not is_quiet():
        for warning in result.warnings:
            click.echo(warning_text(warning, stderr_width()), err=True)


def verify_replicas(
    model: str, replicas: int, batch_size: int, min_samples: int, as_json: bool
) -> None:
    """``verify --replicas N``: the guard's per-BN report of one data-parallel step."""
    from bnfreeze.render.replicas import replica_lines
    from bnfreeze.runtime.replicas_run import measure_replicas

    if as_json:
        raise click.UsageError("--replicas has no --json output yet.")
    note(f"running one data-parallel step on {replicas} simulated devices (a fresh process)...")
    report = measure_replicas(
        model, replicas=replicas, batch_size=batch_size, min_samples=min_samples
    )
    for line in replica_lines(report):
        click.echo(line)
    if not is_quiet():
        for problem in report.problems:
            click.echo(warning_text(problem, stderr_width()), err=True)


def explain_replicas(replicas: int, as_json: bool) -> None:
    """``explain --replicas N``: the seed BN under one data-parallel step."""
    from bnfreeze.render.replicas import explain_replicas_lines
    from bnfreeze.runtime.explain_replicas import explain_replicas as run

    if as_json:
        raise click.UsageError("--replicas has no --json output yet.")
    note(f"running one data-parallel step on {replicas} simulated devices (a fresh process)...")
    for line in explain_replicas_lines(run(replicas)):
        click.echo(line)
