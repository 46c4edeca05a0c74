"""The command line: each command parses arguments, calls one library function and hands the
result to a renderer. Errors for users become one line on stderr and an exit code here, in
:meth:`BnfreezeGroup.invoke`, and nowhere else.

Exit codes: 0 ok, 1 a check found a problem, 2 usage or input error.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from bnfreeze import __version__
from bnfreeze.errors import EXIT_USAGE, BnfreezeError


class BnfreezeGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BnfreezeError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written.", err=True)
            ctx.exit(130)


def stdout_console() -> Any:
    from rich.console import Console

    # Rich honours NO_COLOR and drops colour when stdout is not a terminal.
    return Console(soft_wrap=False, highlight=False)


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


def emit_warnings(findings: Any) -> None:
    """Warnings to stderr, grouped per code (``render.findings``; no Rich import)."""
    from bnfreeze.render.findings import warning_lines

    lines = warning_lines(findings, width=stderr_width())
    if lines:
        sys.stdout.flush()  # on a terminal, the warnings come after the data, not inside it
    for line in lines:
        click.echo(line, err=True)


@click.group(cls=BnfreezeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="bnfreeze")
def cli() -> None:
    """See and set which Keras BatchNormalization layers train and which run in inference mode.

    \b
    Example:
      bnfreeze inspect sample_models/guide_pattern.keras
    """


@cli.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout.")
@click.option("--all", "all_layers", is_flag=True, help="List every layer, not only BN layers.")
@click.option("--tree", is_flag=True, help="Show the nesting as a tree.")
def inspect(model: str, as_json: bool, all_layers: bool, tree: bool) -> None:
    """Show each layer's trainable flag and what it really does in fit().

    MODEL is a .keras file, an unzipped .keras folder or a legacy .h5 file. Nothing is
    loaded into Keras: the file's config is read directly, so this is instant.

    \b
    Examples:
      bnfreeze inspect model.keras
      bnfreeze inspect model.keras --tree
      bnfreeze inspect model.keras --json | jq .summary
    """
    from bnfreeze.inspection import inspect_file

    report = inspect_file(model)
    if as_json:
        from bnfreeze.render.json import render_report

        click.echo(render_report(report))
    else:
        from bnfreeze.render.table import inspect_view

        stdout_console().print(inspect_view(report, all_layers=all_layers, tree=tree))
    emit_warnings(report.warnings)


def main() -> None:
    cli.main(prog_name="bnfreeze")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
