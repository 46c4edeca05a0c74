"""The command line: each command parses arguments, calls one library function and hands the
result to a renderer. Errors for users become one line on stderr and an exit code here, in
:meth:`BnfreezeGroup.invoke`, and nowhere else.

Exit codes: 0 ok, 1 a check found a problem, 2 usage or input error, 3 an internal error
(a bug), 130 interrupted.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import click

from bnfreeze import __version__
from bnfreeze.commands import edit, files, measure, replicas, support
from bnfreeze.commands.support import usage_line
from bnfreeze.errors import EXIT_INTERNAL, BnfreezeError


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


@click.group(cls=BnfreezeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="bnfreeze")
def cli() -> None:
    """See and set which Keras BatchNormalization layers train and which run in inference mode.

    \b
    Example:
      bnfreeze inspect sample_models/guide_pattern.keras
    """


for command in (
    files.inspect,
    files.check,
    files.diff,
    files.list_plans,
    edit.freeze,
    edit.unfreeze,
    edit.apply_plan,
    measure.verify,
    measure.explain,
    replicas.sync_bn,
):
    cli.add_command(command)


def main() -> None:
    """Run the command line; ends with ``SystemExit``, as click's ``main`` does."""
    support.OWN_PROCESS = True
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
