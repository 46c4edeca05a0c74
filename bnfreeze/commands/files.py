"""The commands that read saved files without Keras: ``inspect``, ``check``, ``diff``,
``plans``."""

from __future__ import annotations

from functools import partial

import click

from bnfreeze.commands.support import (
    MODEL_PATH,
    emit_warnings,
    export_option,
    finish_export,
    gc_paused,
    is_quiet,
    loading_options,
    plan_option,
    quiet_option,
    runtime_option,
    set_option,
    start_export,
    stderr_console,
    stdout_console,
)


@click.command()
@quiet_option
@click.argument("model", type=MODEL_PATH)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout.")
@click.option("--all", "all_layers", is_flag=True, help="List every layer, not only BN layers.")
@click.option("--tree", is_flag=True, help="Show the nesting as a tree.")
@click.option(
    "--strip",
    is_flag=True,
    help="Draw the model as one line of cells, one per layer, coloured by what it does in fit().",
)
@click.option(
    "--from-file",
    is_flag=True,
    help="Never ask Keras: predict the layers that code builds (keras-hub, custom layers) by "
    "rule, from the weights file. Fast, and needs no Keras.",
)
@runtime_option
@export_option
@loading_options
def inspect(
    model: str,
    as_json: bool,
    all_layers: bool,
    tree: bool,
    strip: bool,
    from_file: bool,
    runtime: str,
    export: str | None,
    custom_objects: str | None,
    unsafe: bool,
) -> None:
    """Show each layer's trainable flag and what it really does in fit().

    MODEL is a .keras file, an unzipped .keras folder or a legacy .h5 file. The file's
    config is read directly, so this is instant. Only when the file holds layers that
    code builds (keras-hub models, custom layers, subclassed models), whose flags the file
    does not record, and Keras is installed, is the model loaded into Keras (in memory, the
    file is only read) to list them as Keras rebuilds them; --from-file predicts them by
    rule instead.

    \b
    Examples:
      bnfreeze inspect model.keras
      bnfreeze inspect model.keras --all
      bnfreeze inspect model.keras --tree
      bnfreeze inspect model.keras --json | jq .summary
      bnfreeze inspect model.keras --strip --export model.svg
      bnfreeze inspect keras2_model.h5 --runtime tf-keras
      bnfreeze inspect hub_classifier.keras --from-file
      bnfreeze inspect custom.keras --custom-objects my_layers.py
    """
    from bnfreeze.model.records import Runtime
    from bnfreeze.ops.inspect import inspect_file
    from bnfreeze.runtime.rebuilt import ask

    if (custom_objects or unsafe) and from_file:
        raise click.UsageError(
            "--custom-objects and --unsafe load the model into Keras; drop --from-file."
        )
    if strip and (as_json or tree or all_layers):
        raise click.UsageError("--strip is its own view; drop --json, --tree and --all.")
    start_export(export, as_json, model)
    with gc_paused():
        asking = None if from_file else partial(ask, custom_objects=custom_objects, unsafe=unsafe)
        report = inspect_file(model, Runtime(runtime), ask_keras=asking)
    if as_json:
        from bnfreeze.render.json import render_report

        click.echo(render_report(report))
    elif strip:
        from rich.console import Group
        from rich.text import Text

        from bnfreeze.render.strip import strip_view
        from bnfreeze.render.table import Trimmed, summary

        console = stdout_console(record=export is not None)
        console.print(Trimmed(Group(summary(report), Text(""), strip_view(report))))
        finish_export(console, export)
    else:
        from bnfreeze.render.table import inspect_view

        console = stdout_console(record=export is not None)
        console.print(inspect_view(report, all_layers=all_layers, tree=tree))
        finish_export(console, export)
    emit_warnings(report.warnings)


@click.command()
@quiet_option
@click.argument("model", type=MODEL_PATH)
@plan_option(
    required=False,
    help="A TOML plan file, or a shipped plan's name (bnfreeze plans): its [[expect]] tables "
    "must hold, and every layer's flag must be what its [[rule]] tables set.",
)
@click.option(
    "--expect",
    "expects",
    multiple=True,
    metavar="NAME[=ARG]",
    help="An expectation, repeatable: bn-inference[=GLOB], bn-train[=GLOB], "
    "bn-frozen-stats[=GLOB], trains[=GLOB], frozen[=GLOB], min-training=N, max-training=N.",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Also fail on the Keras 3 traps: a call-site training=False relied on, or a "
    "trainable BN layer under a frozen container.",
)
@set_option
@click.option("-v", "--verbose", is_flag=True, help="Print every check, also on success.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout.")
@runtime_option
@export_option
def check(
    model: str,
    plan_path: str | None,
    expects: tuple[str, ...],
    strict: bool,
    sets: tuple[str, ...],
    verbose: bool,
    as_json: bool,
    runtime: str,
    export: str | None,
) -> None:
    """Gate a saved model on what its layers will do in fit(), for CI.

    Exit 0 when every check holds (silent unless -v), 1 when any fails (each failure is
    listed: layer, expected, actual), 2 on bad input. Predicted from the file: no Keras.

    \b
    Examples:
      bnfreeze check finetune.keras --expect bn-inference
      bnfreeze check model.keras --expect 'frozen=mobilenetv2*' --expect trains=head
      bnfreeze check finetune.keras --plan keras-guide-finetune --strict
      bnfreeze check model.keras --expect bn-inference --json | jq .failures
      bnfreeze check keras2_model.h5 --runtime tf-keras --expect bn-inference
    """
    from bnfreeze.errors import EXIT_CHECK_FAILED
    from bnfreeze.model.expectations import parse_expectation
    from bnfreeze.ops.check import check_file

    if plan_path is None and not expects and not strict:
        raise click.UsageError("give --plan PLAN, --expect NAME or --strict (or several).")
    if sets and plan_path is None:
        raise click.UsageError("--set sets parameters of a --plan.")
    start_export(export, as_json, model)
    plan = None
    if plan_path is not None:
        from bnfreeze.ops.plans import load_plan, parse_sets

        plan = load_plan(plan_path, parse_sets(sets))
    expectations = [parse_expectation(spec) for spec in expects]
    from bnfreeze.model.records import Runtime

    result = check_file(
        model, plan=plan, expectations=expectations, strict=strict, runtime=Runtime(runtime)
    )
    if as_json:
        from bnfreeze.render.check import render_check

        click.echo(render_check(result))
    elif not result.passed or verbose or export is not None:
        from bnfreeze.render.check import check_view

        console = stdout_console(record=export is not None)
        console.print(check_view(result, verbose=verbose or export is not None))
        finish_export(console, export)
    if verbose:
        emit_warnings(result.report.warnings)
    if not result.passed:
        ctx = click.get_current_context()
        ctx.exit(EXIT_CHECK_FAILED)


@click.command()
@quiet_option
@click.argument("a", type=MODEL_PATH)
@click.argument("b", type=MODEL_PATH)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout.")
@click.option(
    "--exit-code",
    is_flag=True,
    help="Exit 1 when the models differ (a layer or any weight), like git diff --exit-code.",
)
@export_option
def diff(a: str, b: str, as_json: bool, exit_code: bool, export: str | None) -> None:
    """Show the layers whose flags or fit() behaviour differ between two saved models.

    Also says whether the weights are identical (a BLAKE2b checksum per dataset, optimizer
    state apart) and how the number of layers that train in fit() changed.

    \b
    Examples:
      bnfreeze diff model.keras finetune.keras
      bnfreeze diff model.keras finetune.keras --json | jq .weights.identical
      bnfreeze diff model.keras finetune.keras --export diff.html
    """
    from bnfreeze.errors import EXIT_CHECK_FAILED
    from bnfreeze.ops.diff import diff_files

    start_export(export, as_json, a, b)
    if is_quiet():
        result = diff_files(a, b)
    else:
        with stderr_console().status("comparing the models and checksumming their weights..."):
            result = diff_files(a, b)
    if as_json:
        from bnfreeze.render.diff import render_diff

        click.echo(render_diff(result))
    else:
        from bnfreeze.render.diff import diff_view

        console = stdout_console(record=export is not None)
        console.print(diff_view(result))
        finish_export(console, export)
    if exit_code and not result.identical:
        click.get_current_context().exit(EXIT_CHECK_FAILED)


@click.command("plans")
@click.argument("name", required=False)
def list_plans(name: str | None) -> None:
    """List the plans that ship with bnfreeze, or print one plan's TOML.

    --plan NAME (apply, check) takes a shipped plan by name. Each plan file opens with a
    comment that says when to use it; print it, copy it and edit it to make your own.

    \b
    Examples:
      bnfreeze plans
      bnfreeze plans freeze-up-to
      bnfreeze plans train-bn > my-plan.toml
    """
    from bnfreeze.ops.plans import shipped_plans

    plans = shipped_plans()
    if name is None:
        from bnfreeze.render.plan import plans_text

        click.echo(plans_text(plans))
        return
    by_name = {plan.name: plan for plan in plans}
    plan = by_name.get(name.removesuffix(".toml"))
    if plan is None:
        raise click.UsageError(
            f"{name}: not a shipped plan; the shipped plans are {', '.join(by_name)}."
        )
    click.echo(plan.path.read_text(encoding="utf-8"), nl=False)
