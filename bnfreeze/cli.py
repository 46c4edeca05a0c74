"""The command line: each command parses arguments, calls one library function and hands the
result to a renderer. Errors for users become one line on stderr and an exit code here, in
:meth:`BnfreezeGroup.invoke`, and nowhere else.

Exit codes: 0 ok, 1 a check found a problem, 2 usage or input error, 3 an internal error
(a bug), 130 interrupted.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import sys
from collections.abc import Iterator
from typing import Any

import click

from bnfreeze import __version__
from bnfreeze.errors import EXIT_INTERNAL, BnfreezeError

#: A model path argument. Not ``readable=True`` (click's default): click would report an
#: unreadable file as a usage error, several lines long; the readers say it in one line.
MODEL_PATH = click.Path(path_type=str, readable=False)


def usage_line(exc: click.UsageError) -> str:
    """A usage error as one line, ending with where to look: ``error: Missing argument
    'MODEL'. Try 'bnfreeze inspect --help'.`` (Click's own display takes three lines)."""
    message = " ".join(exc.format_message().split())
    if message and message[-1] not in ".?!":
        message += "."
    if message[:1].isupper() and message[1:2].islower():
        message = message[0].lower() + message[1:]
    # Named "bnfreeze" however it was started (python -m bnfreeze, a test's CliRunner).
    words = exc.ctx.command_path.split()[1:] if exc.ctx is not None else []
    command = " ".join(["bnfreeze", *words])
    return f"error: {message} Try '{command} --help'."


class BnfreezeGroup(click.Group):
    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        # The group's own options (``bnfreeze --bogus``) are parsed here, before invoke.
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise  # bare ``bnfreeze``: Click prints the help
        except click.UsageError as exc:
            click.echo(usage_line(exc), err=True)
            raise click.exceptions.Exit(exc.exit_code) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            click.echo(usage_line(exc), err=True)
            ctx.exit(exc.exit_code)
        except BnfreezeError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written.", err=True)
            ctx.exit(130)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            # A bug in bnfreeze, not bad input: still one line, but a distinct exit code and
            # the traceback on request, so it can be reported and fixed.
            if os.environ.get("BNFREEZE_DEBUG"):
                raise
            click.echo(
                f"error: internal error ({type(exc).__name__}: {exc}). This is a bug in "
                "bnfreeze; run again with BNFREEZE_DEBUG=1 for the traceback and report it.",
                err=True,
            )
            ctx.exit(EXIT_INTERNAL)


QUIET_KEY = "bnfreeze.quiet"


def _set_quiet(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    ctx.meta[QUIET_KEY] = value


def quiet_option(f: Any) -> Any:
    """``-q/--quiet``, on every command: stderr gets errors only (see :func:`is_quiet`)."""
    return click.option(
        "-q",
        "--quiet",
        is_flag=True,
        expose_value=False,
        callback=_set_quiet,
        help="Print nothing on stderr but errors: no progress, no status line, no notes, "
        "no warnings (--json still lists the warnings). stdout and the exit code do not "
        "change.",
    )(f)


def is_quiet() -> bool:
    """Whether the current command runs with ``-q``: then only errors reach stderr (the
    usage and input errors :class:`BnfreezeGroup` prints are never silenced)."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(QUIET_KEY))


def note(line: str) -> None:
    """A line for people on stderr (status, notes), unless ``-q``."""
    if not is_quiet():
        click.echo(line, err=True)


def stdout_console(record: bool = False) -> Any:
    from rich.console import Console

    # Rich honours NO_COLOR and drops colour when stdout is not a terminal. With record=True
    # it also keeps what it printed, styles included, for --export.
    return Console(soft_wrap=False, highlight=False, record=record)


def stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def stderr_width() -> int | None:
    """The width to wrap warnings to: COLUMNS, else stderr's terminal; None (no wrapping)
    when stderr is a file or a pipe, so logs keep one warning per line."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns if sys.stderr.isatty() else None
    except (AttributeError, OSError, ValueError):
        return None


#: True when this process is the ``bnfreeze`` command itself (``main``), not a host that
#: imported the CLI (a test's CliRunner, a notebook): only then may a command change
#: process-wide garbage-collector state for good.
_OWN_PROCESS = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector. Reading a big model allocates ~10^6 small objects
    (the parsed config) and no cycles worth collecting; the collector's passes over them cost
    about a third of inspect's time on EfficientNetV2L. In the bnfreeze process itself the
    survivors are then frozen (``gc.freeze``), so re-enabling the collector does not scan
    them all once more; a host process keeps its collector as it was."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if _OWN_PROCESS:
            gc.freeze()
        if was_enabled:
            gc.enable()


def emit_warnings(findings: Any) -> None:
    """Warnings to stderr, grouped per code (``render.findings``; no Rich import); none
    with ``-q``."""
    if is_quiet():
        return
    from bnfreeze.render.findings import warning_lines

    lines = warning_lines(findings, width=stderr_width())
    if lines:
        sys.stdout.flush()  # on a terminal, the warnings come after the data, not inside it
    for line in lines:
        click.echo(line, err=True)


def export_option(f: Any) -> Any:
    """``--export report.svg|report.html``: save exactly what the terminal shows."""
    return click.option(
        "--export",
        "export",
        type=click.Path(dir_okay=False, path_type=str),
        default=None,
        metavar="FILE.svg|FILE.html",
        help="Also save what the terminal shows as an SVG picture or an HTML page.",
    )(f)


def start_export(export: str | None, as_json: bool) -> None:
    """Refuse a bad --export before any work is done."""
    if export is None:
        return
    if as_json:
        raise click.UsageError("--export saves the terminal view; it cannot be used with --json.")
    from bnfreeze.formats.export import check_destination

    check_destination(export)


def finish_export(console: Any, export: str | None) -> None:
    if export is None:
        return
    from bnfreeze.formats.export import save_recording

    # Rich centres the title over the window buttons: keep it short, "bnfreeze check".
    save_recording(console, export, title=click.get_current_context().command_path)
    note(f"saved {export}")


RUNTIME_CHOICES = ["keras3", "tf-keras"]


def runtime_option(f: Any) -> Any:
    """``--runtime`` for the commands that predict from the file (no Keras is loaded)."""
    return click.option(
        "--runtime",
        type=click.Choice(RUNTIME_CHOICES),
        default="keras3",
        show_default=True,
        help="The rules to predict with: keras3 (Keras 3, TensorFlow or JAX), or tf-keras "
        "(Keras 2, where a recorded call-site training= wins).",
    )(f)


@click.group(cls=BnfreezeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="bnfreeze")
def cli() -> None:
    """See and set which Keras BatchNormalization layers train and which run in inference mode.

    \b
    Example:
      bnfreeze inspect sample_models/guide_pattern.keras
    """


@cli.command()
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
@runtime_option
@export_option
def inspect(
    model: str,
    as_json: bool,
    all_layers: bool,
    tree: bool,
    strip: bool,
    runtime: str,
    export: str | None,
) -> None:
    """Show each layer's trainable flag and what it really does in fit().

    MODEL is a .keras file, an unzipped .keras folder or a legacy .h5 file. Nothing is
    loaded into Keras: the file's config is read directly, so this is instant.

    \b
    Examples:
      bnfreeze inspect model.keras
      bnfreeze inspect model.keras --all
      bnfreeze inspect model.keras --tree
      bnfreeze inspect model.keras --json | jq .summary
      bnfreeze inspect model.keras --strip --export model.svg
      bnfreeze inspect keras2_model.h5 --runtime tf-keras
    """
    from bnfreeze.model.records import Runtime
    from bnfreeze.ops.inspect import inspect_file

    if strip and (as_json or tree or all_layers):
        raise click.UsageError("--strip is its own view; drop --json, --tree and --all.")
    start_export(export, as_json)
    with gc_paused():
        report = inspect_file(model, Runtime(runtime))
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


def set_option(f: Any) -> Any:
    return click.option(
        "--set",
        "sets",
        multiple=True,
        metavar="NAME=VALUE",
        help="Set a plan parameter declared in its [params] table. Repeatable.",
    )(f)


@cli.command()
@quiet_option
@click.argument("model", type=MODEL_PATH)
@click.option(
    "--plan",
    "plan_path",
    type=click.Path(path_type=str),
    default=None,
    metavar="PLAN",
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
    start_export(export, as_json)
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


@cli.command()
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

    start_export(export, as_json)
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


@cli.command("apply")
@quiet_option
@click.argument("model", type=MODEL_PATH)
@click.option(
    "--plan",
    "plan_path",
    type=click.Path(path_type=str),
    required=True,
    metavar="PLAN",
    help="The TOML plan file to apply, or a shipped plan's name (bnfreeze plans lists them).",
)
@set_option
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=str),
    default=None,
    metavar="OUT",
    help="Where to write the result (atomically).",
)
@click.option("--dry-run", is_flag=True, help="Print what would change; write nothing.")
@click.option("--in-place", is_flag=True, help="Rewrite MODEL itself (atomically).")
@click.option(
    "--optimizer-state",
    "optimizer_state",
    type=click.Choice(["remap", "drop", "keep"]),
    default=None,
    help="Saved optimizer variables, when the set of trainable variables changes: "
    "remap them to it (the default; dropped when not provably right), drop them, or "
    "keep them as they are (Keras matches them by position). The plan's [plan] "
    "optimizer_state otherwise.",
)
@click.option(
    "--keep-optimizer-state",
    is_flag=True,
    help="Deprecated spelling of --optimizer-state keep (still works).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout.")
def apply_plan(
    model: str,
    plan_path: str,
    sets: tuple[str, ...],
    output: str | None,
    dry_run: bool,
    in_place: bool,
    optimizer_state: str | None,
    keep_optimizer_state: bool,
    as_json: bool,
) -> None:
    """Apply a TOML freeze plan: its rules in order, later rules winning.

    Same guarantees as freeze: the output is written atomically and verified, every byte
    but the config is kept, and saved optimizer state is remapped to the new trainable variables
    (see freeze --help). A rule that matches no layer is an error (exit 2).

    \b
    Examples:
      bnfreeze apply model.keras --plan keras-guide-finetune -o finetune.keras
      bnfreeze apply model.keras --plan freeze-up-to --set block=block_13_add -o top.keras
      bnfreeze apply model.keras --plan my-plan.toml --dry-run --json | jq .changes
    """
    from bnfreeze.ops.plans import apply_plan_file, load_plan, parse_sets

    if output is None and not dry_run and not in_place:
        raise click.UsageError("-o OUT is required unless --dry-run or --in-place is given.")
    plan = load_plan(plan_path, parse_sets(sets))
    application = apply_plan_file(
        model,
        output,
        plan,
        dry_run=dry_run,
        in_place=in_place,
        keep_optimizer_state=keep_optimizer_state,
        optimizer_state=optimizer_state,
    )
    if as_json:
        from bnfreeze.render.plan import render_apply

        click.echo(render_apply(application))
    else:
        from bnfreeze.render.plan import apply_view

        stdout_console().print(apply_view(application))
    from bnfreeze.render.edit import status_line

    note(status_line(application.result))
    emit_warnings(application.result.all_warnings)


@cli.command("plans")
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


def edit_options(f: Any) -> Any:
    """The options ``freeze`` and ``unfreeze`` share (selection, output, engine)."""
    options = [
        click.option(
            "-o",
            "--output",
            type=click.Path(path_type=str),
            default=None,
            metavar="OUT",
            help="Where to write the result (atomically).",
        ),
        click.option(
            "--layers",
            "layers",
            multiple=True,
            metavar="GLOB",
            help="Only layers whose path or name matches GLOB. Repeatable; a container "
            "selects every layer below it.",
        ),
        click.option("--dry-run", is_flag=True, help="Print what would change; write nothing."),
        click.option("--in-place", is_flag=True, help="Rewrite MODEL itself (atomically)."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout."),
        click.option(
            "--optimizer-state",
            "optimizer_state",
            type=click.Choice(["remap", "drop", "keep"]),
            default=None,
            help="Saved optimizer variables, when the set of trainable variables changes: "
            "remap them to it (the default; dropped when not provably right), drop them, or "
            "keep them as they are (Keras matches them by position).",
        ),
        click.option(
            "--keep-optimizer-state",
            is_flag=True,
            help="Deprecated spelling of --optimizer-state keep (still works).",
        ),
        click.option(
            "--engine",
            type=click.Choice(["auto", "config", "keras"]),
            default="auto",
            show_default=True,
            help="config: rewrite the saved config, no TensorFlow; keras: load, set "
            "flags and save through Keras (flags Keras does not save, as in keras-hub "
            "models, are recorded in the .keras output: load it with bnfreeze.load_model); "
            "auto: config unless the model needs Keras.",
        ),
        click.option(
            "--custom-objects",
            type=click.Path(path_type=str),
            default=None,
            metavar="MODULE_OR_FILE.py",
            help="Keras engine: custom classes to load the model with.",
        ),
        click.option(
            "--unsafe",
            is_flag=True,
            help="Keras engine: allow loading unsafe content such as Lambda layers.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def run_edit(library_call: Any, output: str | None, as_json: bool, **kwargs: Any) -> None:
    """Call the library, print the result (stdout) and what the user must know (stderr).

    The view is rendered as soon as the library previews the result, while a big file is
    still being copied, and printed once the write succeeded."""
    if output is None and not kwargs.get("dry_run") and not kwargs.get("in_place"):
        raise click.UsageError("-o OUT is required unless --dry-run or --in-place is given.")
    consoles: list[Any] = []  # made on first use: importing Rich takes 30 ms
    rendered: list[tuple[Any, str]] = []

    def render(result: Any) -> str:
        if as_json:
            from bnfreeze.render.edit import render_edit

            return render_edit(result, click.get_current_context().info_name or "freeze") + "\n"
        from bnfreeze.render.edit import edit_view

        if not consoles:
            consoles.append(stdout_console())
        with consoles[0].capture() as capture:
            consoles[0].print(edit_view(result))
        return capture.get()

    def preview(result: Any) -> None:
        rendered.append((result.report, render(result)))

    with gc_paused():
        result = library_call(output=output, preview=preview, **kwargs)
    text = rendered[0][1] if rendered and rendered[0][0] is result.report else render(result)
    if not consoles:
        click.echo(text, nl=False)
    else:
        consoles[0].file.write(text)
        consoles[0].file.flush()
    from bnfreeze.render.edit import status_line

    note(status_line(result))
    emit_warnings(result.all_warnings)


@cli.command()
@quiet_option
@click.argument("model", type=MODEL_PATH)
@click.option(
    "--bn-inference",
    is_flag=True,
    help="Only BN layers: trainable=False, which puts them in inference mode in fit().",
)
@click.option(
    "--train-bn",
    is_flag=True,
    help="Freeze the selected layers but keep BN layers trainable (fastai train_bn).",
)
@click.option(
    "--bn-frozen-stats",
    is_flag=True,
    help="Only BN layers: make them FrozenStatsBatchNormalization (moving statistics in fit(), "
    "never updated; gamma/beta train). Needs bnfreeze to load.",
)
@click.option(
    "--up-to",
    "up_to",
    metavar="LAYER",
    default=None,
    help="Only layers up to and including LAYER (a path or name), in model order.",
)
@edit_options
def freeze(
    model: str,
    bn_inference: bool,
    train_bn: bool,
    bn_frozen_stats: bool,
    up_to: str | None,
    **options: Any,
) -> None:
    """Set trainable=False on the selected layers (all by default), BN included.

    Every selected leaf is edited, also inside nested models: a container's own flag does not
    propagate when Keras loads a saved model. .keras files are rewritten without TensorFlow;
    only config.json changes. Prints each change, then the new modes, as inspect does.

    \b
    Examples:
      bnfreeze freeze model.keras -o frozen.keras
      bnfreeze freeze model.keras --bn-inference -o bn_inference.keras
      bnfreeze freeze model.keras --train-bn -o train_bn.keras
      bnfreeze freeze model.keras --bn-frozen-stats -o frozen_stats.keras
      bnfreeze freeze model.keras --up-to block5_add -o partly_frozen.keras
      bnfreeze freeze model.keras --layers 'mobilenetv2*' --dry-run
    """
    from bnfreeze.ops.edit import freeze_file
    from bnfreeze.ops.frozen_stats import edit_as_batchnorm

    if bn_inference and train_bn:
        raise click.UsageError("--bn-inference and --train-bn contradict each other; pick one.")
    as_json = options.pop("as_json")
    output = options.pop("output")
    if bn_frozen_stats:
        run_frozen_stats(model, output, as_json, bn_inference or train_bn, up_to, **options)
        return
    # An edit that sets BN flags makes FrozenStatsBatchNormalization plain BN again.
    library_call: Any = freeze_file
    if not train_bn:
        library_call = functools.partial(edit_as_batchnorm, freeze_file)
    run_edit(
        library_call,
        output,
        as_json,
        path=model,
        bn_inference=bn_inference,
        train_bn=train_bn,
        up_to=up_to,
        **options,
    )


def run_frozen_stats(
    model: str,
    output: str | None,
    as_json: bool,
    other_mode: bool,
    up_to: str | None,
    **options: Any,
) -> None:
    """``freeze --bn-frozen-stats``: a class change, not a flag edit
    (:mod:`bnfreeze.ops.frozen_stats`)."""
    from bnfreeze.ops.frozen_stats import BnClass, convert_file

    if other_mode:
        raise click.UsageError(
            "--bn-frozen-stats changes the BN layers' class, not flags: use it without "
            "--bn-inference and --train-bn."
        )
    flag_only = [
        name
        for name, default in (
            ("optimizer_state", None),
            ("keep_optimizer_state", False),
            ("engine", "auto"),
            ("custom_objects", None),
            ("unsafe", False),
        )
        if options.get(name) != default
    ]
    if flag_only:
        name = "--" + flag_only[0].replace("_", "-")
        raise click.UsageError(f"{name} does not apply to --bn-frozen-stats (no flag changes).")
    if output is None and not options["dry_run"] and not options["in_place"]:
        raise click.UsageError("-o OUT is required unless --dry-run or --in-place is given.")
    result = convert_file(
        model,
        output,
        BnClass.FROZEN_STATS,
        layers=tuple(options["layers"]),
        up_to=up_to,
        dry_run=options["dry_run"],
        in_place=options["in_place"],
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


@cli.command()
@quiet_option
@click.argument("model", type=MODEL_PATH)
@click.option(
    "--keep-bn-inference",
    is_flag=True,
    help="Keep every selected BN layer at trainable=False (inference mode in fit()): "
    "the fine-tuning step of the Keras guide, done right on Keras 3.",
)
@click.option(
    "--from",
    "from_layer",
    metavar="LAYER",
    default=None,
    help="Only LAYER (a path or name) and the layers after it, in model order.",
)
@edit_options
def unfreeze(model: str, keep_bn_inference: bool, from_layer: str | None, **options: Any) -> None:
    """Set trainable=True on the selected layers (all by default).

    On Keras 3 a call-site training=False does not keep BN layers in inference mode in fit();
    --keep-bn-inference does, by leaving trainable=False on each of them.

    \b
    Examples:
      bnfreeze unfreeze model.keras --keep-bn-inference -o finetune.keras
      bnfreeze unfreeze model.keras --from block_13_expand -o top_unfrozen.keras
      bnfreeze unfreeze model.keras --layers 'mobilenetv2*' --keep-bn-inference --in-place
      bnfreeze unfreeze model.keras --keep-bn-inference --dry-run --json | jq .changes
    """
    from bnfreeze.ops.edit import unfreeze_file
    from bnfreeze.ops.frozen_stats import edit_as_batchnorm

    as_json = options.pop("as_json")
    output = options.pop("output")
    run_edit(
        functools.partial(edit_as_batchnorm, unfreeze_file),
        output,
        as_json,
        path=model,
        keep_bn_inference=keep_bn_inference,
        from_layer=from_layer,
        **options,
    )


@cli.command()
@quiet_option
@click.argument("model", type=MODEL_PATH)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Training steps to run (train_on_batch, the same step as fit()).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Samples per step.",
)
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
@click.option(
    "--runtime",
    type=click.Choice(RUNTIME_CHOICES),
    default="keras3",
    show_default=True,
    help="tf-keras measures with Keras 2 (the tf_keras package), if installed.",
)
@click.option(
    "--unsafe",
    is_flag=True,
    help="Load the model even if it holds Python code (a Lambda layer). Only for files you trust.",
)
@click.option(
    "--custom-objects",
    type=click.Path(path_type=str),
    default=None,
    metavar="MODULE_OR_FILE.py",
    help="A module or .py file that defines the model's custom classes.",
)
@click.option(
    "--all", "all_layers", is_flag=True, help="List every measured layer, not only BN layers."
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
    as_json: bool,
) -> None:
    """Train MODEL for real, in memory, and show what actually moved.

    Loads the model with Keras (safe mode), runs --steps training steps on a batch that fits
    its inputs, and reports per layer whether the BN moving statistics, gamma/beta and other
    weights moved. A built-in BN layer ran in training mode in fit() exactly when its moving
    statistics moved. The measurement is compared with what inspect predicts from the file.
    The file is never written.

    Exit codes: 0 prediction and measurement agree (and every --expect holds), 1 they
    disagree (or an --expect fails), 2 bad input.

    \b
    Examples:
      bnfreeze verify model.keras
      bnfreeze verify model.keras --expect bn-inference
      bnfreeze verify model.keras --steps 3 --batch-size 8 --data batch.npz
      bnfreeze verify model.keras --json | jq .summary
    """
    from bnfreeze.model.expectations import parse_expectation
    from bnfreeze.model.records import Runtime
    from bnfreeze.runtime.loading import progress_on_stderr
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


@cli.command()
@quiet_option
@click.option(
    "--runtime",
    type=click.Choice(RUNTIME_CHOICES),
    default="keras3",
    show_default=True,
    help="tf-keras runs the experiment with Keras 2 (the tf_keras package), if installed.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout.")
def explain(runtime: str, as_json: bool) -> None:
    """Run the training/trainable experiment on one BN layer, live, and explain it.

    A (1, 2, 2, 4) image of whole numbers 0-9 goes through a BatchNormalization layer with
    gamma 2, beta 1, moving mean 0 and moving variance 1, once for each combination of
    training and trainable. The output, whether the moving statistics moved, and their new
    values are measured on the installed Keras, followed by the rules that hold there.

    \b
    Examples:
      bnfreeze explain
      bnfreeze explain --json | jq '.cases[] | {training, trainable, moving_stats_updated}'
    """
    from bnfreeze.model.records import Runtime
    from bnfreeze.runtime.explain import explain as run_explain
    from bnfreeze.runtime.loading import progress_on_stderr

    with progress_on_stderr(enabled=not is_quiet()) as progress:
        report = run_explain(runtime=Runtime(runtime), progress=progress)
    if as_json:
        from bnfreeze.render.explain import render_explain

        click.echo(render_explain(report))
    else:
        from bnfreeze.render.explain import explain_view

        stdout_console().print(explain_view(report))


@cli.command()
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
@click.option(
    "--custom-objects",
    default=None,
    metavar="MODULE",
    help="A module or .py file whose classes the model needs to load.",
)
@click.option("--unsafe", is_flag=True, help="Allow loading Lambda layers (runs their code).")
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
    from bnfreeze.runtime.loading import progress_on_stderr, runtime_info
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


def main() -> None:
    """Run the command line; ends with ``SystemExit``, as click's ``main`` does."""
    global _OWN_PROCESS
    _OWN_PROCESS = True
    cli.main(prog_name="bnfreeze")


def entry_point() -> None:
    """The ``bnfreeze`` console script and ``python -m bnfreeze``: :func:`main`, then the
    process ends without the interpreter's teardown.

    Everything bnfreeze opens is closed by then and its threads are joined; what the teardown
    would do is free every object of a parsed model one by one (60 ms for EfficientNetV2L,
    more once TensorFlow is loaded). Standard output and error are flushed first; a reader
    that went away (``bnfreeze inspect big.keras | head``) is not an error.
    """
    try:
        main()
        code: Any = 0
    except SystemExit as exc:  # click's standalone mode always ends here
        code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe, a closed stream
            stream.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry_point()
