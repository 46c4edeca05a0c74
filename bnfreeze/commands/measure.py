"""The commands that run Keras: ``verify`` (a real training step, measured) and ``explain``
(the training/trainable experiment on one BN layer)."""

from __future__ import annotations

from typing import Any

import click

from bnfreeze.commands.support import (
    MODEL_PATH,
    is_quiet,
    loading_options,
    note,
    quiet_option,
    runtime_choice,
    stdout_console,
)


def positive(name: str, default: int, help: str) -> Any:
    """A count of at least 1, with its default shown."""
    return click.option(
        name, type=click.IntRange(min=1), default=default, show_default=True, help=help
    )


@click.command()
@quiet_option
@click.argument("model", type=MODEL_PATH)
@positive("--steps", 1, "Training steps to run (train_on_batch, the same step as fit()).")
@positive("--batch-size", 2, "Samples per step.")
@click.option(
    "--data",
    type=click.Path(path_type=str),
    default=None,
    metavar="FILE.npz",
    help="Real inputs instead of synthetic ones: arrays x (or x0, x1, ... or the "
    "input names) and optionally y.",
)
@click.option(
    "--expect",
    "expects",
    multiple=True,
    metavar="NAME[=ARG]",
    help="Exit 1 unless the measurement satisfies it, repeatable: bn-inference, "
    "bn-train, bn-frozen-stats, trains, frozen (each =GLOB optional), min-training=N, "
    "max-training=N.",
)
@runtime_choice("tf-keras measures with Keras 2 (the tf_keras package), if installed.")
@loading_options
@click.option(
    "--all", "all_layers", is_flag=True, help="List every measured layer, not only BN layers."
)
@click.option(
    "--replicas",
    type=click.IntRange(min=2),
    default=None,
    metavar="N",
    help="Instead, run one data-parallel step on N simulated devices (MirroredStrategy on "
    "TensorFlow, DataParallel on JAX) and report what each BN normalized over; --batch-size "
    "is the global batch.",
)
@click.option(
    "--min-samples",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="With --replicas: warn when a training-mode BN normalizes over fewer samples.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout.")
def verify(
    model: str,
    steps: int,
    batch_size: int,
    data: str | None,
    expects: tuple[str, ...],
    runtime: str,
    unsafe: bool,
    custom_objects: str | None,
    all_layers: bool,
    replicas: int | None,
    min_samples: int,
    as_json: bool,
) -> None:
    """Train MODEL for real, in memory, and show what actually moved.

    Loads the model with Keras (safe mode), runs --steps training steps on a batch that fits
    its inputs, and reports per layer whether the BN moving statistics, gamma/beta and other
    weights moved. A built-in BN layer's mode is the branch its call() took during the step
    (batch or moving statistics), recorded, not read off its statistics: with momentum=1.0 a
    BN in training mode leaves them unchanged. The measurement is compared with what inspect
    predicts from the file. The file is never written.

    Exit codes: 0 prediction and measurement agree (and every --expect holds), 1 they
    disagree (or an --expect fails), 2 bad input.

    \b
    Examples:
      bnfreeze verify model.keras
      bnfreeze verify model.keras --expect bn-inference
      bnfreeze verify model.keras --steps 3 --batch-size 8 --data batch.npz
      bnfreeze verify model.keras --json | jq .summary
      bnfreeze verify model.keras --replicas 2 --batch-size 16
    """
    if replicas is not None:
        from bnfreeze.commands.replicas import verify_replicas

        verify_replicas(model, replicas, batch_size, min_samples, as_json)
        return
    from bnfreeze.model.expectations import parse_expectation
    from bnfreeze.model.records import Runtime
    from bnfreeze.runtime.environment import progress_on_stderr
    from bnfreeze.runtime.verify import verify_file

    expectations = [parse_expectation(spec) for spec in expects]
    with progress_on_stderr(enabled=not is_quiet()) as progress:
        report = verify_file(
            model,
            steps=steps,
            batch_size=batch_size,
            data=data,
            expectations=expectations,
            runtime=Runtime(runtime),
            unsafe=unsafe,
            custom_objects=custom_objects,
            progress=progress,
        )
    if as_json:
        from bnfreeze.render.verify import render_verify

        click.echo(render_verify(report))
    else:
        from bnfreeze.render.verify import verify_view

        stdout_console().print(verify_view(report, all_layers=all_layers))
    from bnfreeze.render.verify import note_lines

    for line in note_lines(report):
        note(line)
    if report.exit_code:
        click.get_current_context().exit(report.exit_code)


@click.command()
@quiet_option
@runtime_choice("tf-keras runs the experiment with Keras 2 (the tf_keras package), if installed.")
@click.option(
    "--replicas",
    type=click.IntRange(min=2),
    default=None,
    metavar="N",
    help="Instead, run it as one data-parallel fit() step on N simulated devices and show the "
    "per-replica and global statistics side by side.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout.")
def explain(runtime: str, replicas: int | None, as_json: bool) -> None:
    """Run the training/trainable experiment on one BN layer, live, and explain it.

    A (1, 2, 2, 4) image of whole numbers 0-9 goes through a BatchNormalization layer with
    gamma 2, beta 1, moving mean 0 and moving variance 1, once for each combination of
    training and trainable. The output, whether the moving statistics moved, and their new
    values are measured on the installed Keras, followed by the rules that hold there.

    \b
    Examples:
      bnfreeze explain
      bnfreeze explain --json | jq '.cases[] | {training, trainable, moving_stats_updated}'
      bnfreeze explain --replicas 2
    """
    if replicas is not None:
        from bnfreeze.commands.replicas import explain_replicas

        explain_replicas(replicas, as_json)
        return
    from bnfreeze.model.records import Runtime
    from bnfreeze.runtime.environment import progress_on_stderr
    from bnfreeze.runtime.explain import explain as run_explain

    with progress_on_stderr(enabled=not is_quiet()) as progress:
        report = run_explain(runtime=Runtime(runtime), progress=progress)
    if as_json:
        from bnfreeze.render.explain import render_explain

        click.echo(render_explain(report))
    else:
        from bnfreeze.render.explain import explain_view

        stdout_console().print(explain_view(report))
