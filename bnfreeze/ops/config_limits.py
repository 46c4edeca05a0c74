"""What a saved config cannot carry: the reasons the config route
(:mod:`bnfreeze.ops.config_route`) hands an edit to the Keras route with ``--engine auto``,
and refuses it with ``--engine config``. Each returns None when the config can carry the
edit, else the reason, worded for the user.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from bnfreeze.model.assignments import Assignment
from bnfreeze.model.records import LayerKind, LayerRecord, ModelFile, ModelFormat


def config_route_limit(
    model: ModelFile, layers: Sequence[LayerRecord], lists_layers: bool
) -> str | None:
    """Why the config route cannot edit ``model`` (None when it can), before selection."""
    from bnfreeze.formats.writers.dispatch import writer_for

    if writer_for(model.format) is None:
        return f"bnfreeze does not rewrite {model.format.json_name} files without Keras"
    if model.preset_task is not None:
        return (
            f"it is a keras-hub task's preset folder ({model.preset_task}, task.json), which "
            "only keras-hub's from_preset rebuilds"
        )
    if not lists_layers and str(model.config.get("class_name")) not in ("Functional", "Sequential"):
        return "it is a subclassed model whose config does not list its layers"
    return None


def code_built_limit(model: ModelFile, selected: Sequence[LayerRecord]) -> str | None:
    """Why the config route cannot edit ``selected`` of ``model`` (None when it can): layers
    whose flags the saved config cannot carry.

    * The file records flags bnfreeze set on such layers (``bnfreeze.json``): a config edit
      would leave those records stale; the Keras engine rewrites them.
    * A selected custom layer holds layers it builds in code (``self.bn1 =
      BatchNormalization()``), which its weights show as groups below its own: Keras builds
      them again on load with ``trainable=True``, whatever the custom layer's flag says
      (README, "keras-hub and code-built models").
    """
    from bnfreeze.formats import recorded_flags

    if model.format is ModelFormat.KERAS and recorded_flags.has_member(model.path):
        return (
            f"it records trainable flags Keras does not save ({recorded_flags.MEMBER}), "
            "which only the Keras engine rewrites"
        )
    custom = [r for r in selected if r.custom]
    if not custom:
        return None
    if model.weights is None:  # a .keras archive is read unindexed; index it only for this
        from bnfreeze.formats.readers import with_weights

        model = with_weights(model)
    index = model.weights.variables if model.weights is not None else {}
    holders = [r for r in custom if _holds_layers(r, index.get(r.path, ()))]
    if not holders:
        return None
    names = ", ".join(f"{r.path} ({r.class_name})" for r in holders[:3])
    return (
        f"the custom layer(s) {names} hold layers built in code, whose trainable flags Keras "
        "does not save"
    )


def _snake_case(name: str) -> str:
    """Keras's ``naming.to_snake_case``: the group name it saves a layer of a list under."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _holds_layers(record: LayerRecord, datasets: Sequence[str]) -> bool:
    """Whether a layer's weight datasets sit in groups below its own group: Keras names that
    group for the layer's class (``res_block``, ``res_block_1``), and a sublayer's variables
    go below it (``layers/res_block/bn1/vars/0``). Only that positive evidence counts."""
    own = re.compile(rf"{re.escape(_snake_case(record.class_name))}(_\d+)?")
    for dataset in datasets:
        group = dataset.rsplit("/vars/", 1)[0] if "/vars/" in dataset else dataset
        if any(own.fullmatch(part) for part in group.strip("/").split("/")[:-1]):
            return True
    return False


def custom_batchnorm_limit(assignment: Assignment, selected: Sequence[LayerRecord]) -> str | None:
    """Why the config route cannot apply ``assignment`` to ``selected`` (None when it can).

    When BN layers and other layers get different flags (``--bn-inference``, ``--train-bn``,
    ``--keep-bn-inference``), a selected custom class might subclass BatchNormalization, which
    only a loaded model can tell (``isinstance``, docs/semantics.md, rule 7).
    """
    if assignment.batchnorm == assignment.others:
        return None
    custom = [r for r in selected if r.kind is LayerKind.UNKNOWN]
    if not custom:
        return None
    names = ", ".join(sorted({r.class_name for r in custom})[:3])
    return (
        f"the selection holds custom layer classes ({names}) that may subclass "
        "BatchNormalization, which only a loaded model can tell"
    )
