"""The commands that edit a saved model: ``freeze``, ``unfreeze`` and ``apply``. Each builds
one :class:`~bnfreeze.ops.request.EditRequest`, :func:`bnfreeze.runtime.routes.edit` applies
it, and :mod:`bnfreeze.render.edit` shows the result."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click

from bnfreeze.commands.support import (
    MODEL_PATH,
    emit_warnings,
    gc_paused,
    note,
    plan_option,
    quiet_option,
    set_option,
    stdout_console,
)

if TYPE_CHECKING:
    from bnfreeze.model.assignments import Assignment
    from bnfreeze.ops.request import EditResult, LayerSelection, Output


#: The options of the commands that write a model (freeze, unfreeze, apply). click.option
#: makes a new parameter each time its decorator is applied, so each command gets its own.
OUTPUT = click.option(
    "-o",
    "--output",
    type=click.Path(path_type=str),
    default=None,
    metavar="OUT",
    help="Where to write the result (atomically).",
)
DRY_RUN = click.option("--dry-run", is_flag=True, help="Print what would change; write nothing.")
IN_PLACE = click.option("--in-place", is_flag=True, help="Rewrite MODEL itself (atomically).")
JSON = click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout.")


def optimizer_state_option(more: str = "") -> Any:
    """``--optimizer-state``; ``more`` ends its help."""
    return click.option(
        "--optimizer-state",
        "optimizer_state",
        type=click.Choice(["remap", "drop", "keep"]),
        default=None,
        help="Saved optimizer variables, when the set of trainable variables changes: "
        "remap them to it (the default; dropped when not provably right), drop them, or "
        "keep them as they are (Keras matches them by position)." + more,
    )


def edit_options(f: Any) -> Any:
    """The options ``freeze`` and ``unfreeze`` share (selection, output, engine)."""
    options = [
        OUTPUT,
        click.option(
            "--layers",
            "layers",
            multiple=True,
            metavar="GLOB",
            help="Only layers whose path or name matches GLOB. Repeatable; a container "
            "selects every layer below it.",
        ),
        DRY_RUN,
        IN_PLACE,
        JSON,
        optimizer_state_option(),
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


def flag(name: str, help: str) -> Any:
    return click.option(name, is_flag=True, help=help)


def layer_option(name: str, dest: str, help: str) -> Any:
    """A layer path or name (``--up-to``, ``--from``)."""
    return click.option(name, dest, metavar="LAYER", default=None, help=help)


def edit_command(*recipe: Any) -> Any:
    """``freeze`` / ``unfreeze``: ``-q``, MODEL, the command's own ``recipe`` options, then
    :func:`edit_options`, in that order in ``--help``."""

    def decorate(f: Any) -> Any:
        f = edit_options(f)
        for option in reversed(recipe):
            f = option(f)
        return click.command()(quiet_option(click.argument("model", type=MODEL_PATH)(f)))

    return decorate


def edit_output(path: str | None, *, in_place: bool, dry_run: bool) -> Output:
    """Where an edit command writes; ``-o`` is required unless ``--dry-run`` or
    ``--in-place`` is given."""
    if path is None and not dry_run and not in_place:
        raise click.UsageError("-o OUT is required unless --dry-run or --in-place is given.")
    from bnfreeze.ops.request import Output

    return Output(path, in_place=in_place, dry_run=dry_run)


@contextlib.contextmanager
def flags_spelled() -> Iterator[None]:
    """Options the library finds contradictory, spelled as this command's flags, as a usage
    error (``--bn-inference and --train-bn contradict each other; pick one.``)."""
    from bnfreeze.errors import ContradictoryOptions

    try:
        yield
    except ContradictoryOptions as exc:
        raise click.UsageError(exc.spelled(lambda name: "--" + name.replace("_", "-"))) from None


def run_edit(
    model: str,
    assignment: Assignment,
    selection: LayerSelection,
    *,
    output: str | None,
    dry_run: bool,
    in_place: bool,
    as_json: bool,
    optimizer_state: str | None,
    engine: str,
    custom_objects: str | None,
    unsafe: bool,
) -> None:
    """Build the one :class:`~bnfreeze.ops.request.EditRequest`, apply it, print the result
    (stdout) and what the user must know (stderr)."""
    from bnfreeze.model.assignments import Assignment
    from bnfreeze.ops.request import EditRequest, Loading
    from bnfreeze.runtime.routes import edit

    request = EditRequest(
        model,
        assignment,
        selection,
        edit_output(output, in_place=in_place, dry_run=dry_run),
        Loading.of(engine, custom_objects, unsafe, optimizer_state),
    )
    with gc_paused():
        if assignment.batchnorm is not None and assignment != Assignment.freeze(train_bn=True):
            # An edit that sets BN flags makes FrozenStatsBatchNormalization plain BN again.
            from dataclasses import replace

            from bnfreeze.ops.frozen_stats import edit_as_batchnorm

            result = edit_as_batchnorm(
                lambda path, out: edit(replace(request, model=path, output=out)),
                path=model,
                output=request.output,
                selection=selection,
            )
        else:
            result = edit(request)
    if as_json:
        from bnfreeze.render.edit import render_edit

        click.echo(render_edit(result, click.get_current_context().info_name or "freeze"))
    else:
        from bnfreeze.render.edit import edit_view

        stdout_console().print(edit_view(result))
    edit_notes(result)


def edit_notes(result: EditResult) -> None:
    """The status line and the warnings of an edit, on stderr."""
    from bnfreeze.render.edit import status_line

    note(status_line(result))
    emit_warnings(result.all_warnings)


@edit_command(
    flag(
        "--bn-inference",
        "Only BN layers: trainable=False, which puts them in inference mode in fit().",
    ),
    flag(
        "--train-bn", "Freeze the selected layers but keep BN layers trainable (fastai train_bn)."
    ),
    flag(
        "--bn-frozen-stats",
        "Only BN layers: make them FrozenStatsBatchNormalization (moving statistics in fit(), "
        "never updated; gamma/beta train). Needs bnfreeze to load.",
    ),
    layer_option(
        "--up-to",
        "up_to",
        "Only layers up to and including LAYER (a path or name), in model order.",
    ),
)
def freeze(
    model: str,
    bn_inference: bool,
    train_bn: bool,
    bn_frozen_stats: bool,
    up_to: str | None,
    layers: tuple[str, ...],
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
    from bnfreeze.model.assignments import Assignment
    from bnfreeze.ops.request import LayerSelection

    if bn_frozen_stats:
        from bnfreeze.commands.statistics import run_frozen_stats

        run_frozen_stats(model, layers, up_to, bn_inference or train_bn, **options)
        return
    with flags_spelled():
        assignment = Assignment.freeze(bn_inference=bn_inference, train_bn=train_bn)
    run_edit(model, assignment, LayerSelection(layers, up_to=up_to), **options)


@edit_command(
    flag(
        "--keep-bn-inference",
        "Keep every selected BN layer at trainable=False (inference mode in fit()): "
        "the fine-tuning step of the Keras guide, done right on Keras 3.",
    ),
    layer_option(
        "--from", "from_", "Only LAYER (a path or name) and the layers after it, in model order."
    ),
)
def unfreeze(
    model: str,
    keep_bn_inference: bool,
    from_: str | None,
    layers: tuple[str, ...],
    **options: Any,
) -> None:
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
    from bnfreeze.model.assignments import Assignment
    from bnfreeze.ops.request import LayerSelection

    assignment = Assignment.unfreeze(keep_bn_inference=keep_bn_inference)
    run_edit(model, assignment, LayerSelection(layers, from_=from_), **options)


@click.command("apply")
@quiet_option
@click.argument("model", type=MODEL_PATH)
@plan_option(
    required=True,
    help="The TOML plan file to apply, or a shipped plan's name (bnfreeze plans lists them).",
)
@set_option
@OUTPUT
@DRY_RUN
@IN_PLACE
@optimizer_state_option(" The plan's [plan] optimizer_state otherwise.")
@JSON
def apply_plan(
    model: str,
    plan_path: str,
    sets: tuple[str, ...],
    output: str | None,
    dry_run: bool,
    in_place: bool,
    optimizer_state: str | None,
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
    from bnfreeze.ops.plans import load_plan, parse_sets, plan_edit_request
    from bnfreeze.runtime.routes import apply_plan

    destination = edit_output(output, in_place=in_place, dry_run=dry_run)
    plan = load_plan(plan_path, parse_sets(sets))
    planned = plan_edit_request(model, plan, destination, optimizer_state=optimizer_state)
    application = apply_plan(planned)
    if as_json:
        from bnfreeze.render.plan import render_apply

        click.echo(render_apply(application))
    else:
        from bnfreeze.render.plan import apply_view

        stdout_console().print(apply_view(application))
    edit_notes(application.result)
