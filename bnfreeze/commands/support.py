"""What every command shares: the model argument, ``-q``, the consoles (stdout for data,
stderr for people), warnings, ``--export``, ``--runtime`` and ``--set``."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Iterator
from typing import Any

import click

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
OWN_PROCESS = False


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
        if OWN_PROCESS:
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


def start_export(export: str | None, as_json: bool, *models: str) -> None:
    """Refuse a bad --export before any work is done (one that would replace ``models``)."""
    if export is None:
        return
    if as_json:
        raise click.UsageError("--export saves the terminal view; it cannot be used with --json.")
    from bnfreeze.formats.export import check_destination

    check_destination(export, models)


def finish_export(console: Any, export: str | None) -> None:
    if export is None:
        return
    from bnfreeze.formats.export import save_recording

    # Rich centres the title over the window buttons: keep it short, "bnfreeze check".
    save_recording(console, export, title=click.get_current_context().command_path)
    note(f"saved {export}")


RUNTIME_CHOICES = ["keras3", "tf-keras"]


def loading_options(f: Any) -> Any:
    """``--unsafe`` and ``--custom-objects``: how a command that loads the model into Keras
    loads it (the options the loading errors advise)."""
    f = click.option(
        "--custom-objects",
        type=click.Path(path_type=str),
        default=None,
        metavar="MODULE_OR_FILE.py",
        help="A module or .py file that defines the model's custom classes.",
    )(f)
    return click.option(
        "--unsafe",
        is_flag=True,
        help="Load the model even if it holds Python code (a Lambda layer). Only for files "
        "you trust.",
    )(f)


def runtime_choice(help: str) -> Any:
    """``--runtime keras3|tf-keras``, keras3 by default; ``help`` says what it changes."""
    return click.option(
        "--runtime",
        type=click.Choice(RUNTIME_CHOICES),
        default="keras3",
        show_default=True,
        help=help,
    )


def runtime_option(f: Any) -> Any:
    """``--runtime`` for the commands that predict from the file (no Keras is loaded)."""
    return runtime_choice(
        "The rules to predict with: keras3 (Keras 3, TensorFlow or JAX), or tf-keras "
        "(Keras 2, where a recorded call-site training= wins)."
    )(f)


def set_option(f: Any) -> Any:
    return click.option(
        "--set",
        "sets",
        multiple=True,
        metavar="NAME=VALUE",
        help="Set a plan parameter declared in its [params] table. Repeatable.",
    )(f)


def plan_option(*, required: bool, help: str) -> Any:
    """``--plan PLAN``: a TOML plan file or a shipped plan's name."""
    # Not default=None: click then no longer reports a missing required option as such.
    return click.option(
        "--plan",
        "plan_path",
        type=click.Path(path_type=str),
        required=required,
        metavar="PLAN",
        help=help,
    )
