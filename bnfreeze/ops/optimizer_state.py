"""The saved optimizer state after an edit: remap it to the new trainable variables, drop it,
or keep it as it is.

Keras 3 saves an optimizer's variables by position (``/optimizer/vars/0..N-1`` in
``model.weights.h5``), with no names, and on load assigns them by position to the variables
the optimizer builds for ``model.trainable_variables`` (README, "Saved optimizer state").
Measured on Keras 3.15.1, the order is:

1. ``iteration``, then ``learning_rate`` (absent when the learning rate is a schedule);
2. with ``use_ema=True``, one ``average`` per trainable variable;
3. the optimizer's own slots, in blocks. Within a block the slots of one variable are
   adjacent, the variables in ``trainable_variables`` order: Adam and AdamW (momentum,
   velocity), then with ``amsgrad`` a block of velocity_hat; SGD with a non-zero momentum
   (momentum); RMSprop (velocity), then with ``momentum`` > 0 a block of momentum, then with
   ``centered`` a block of average_gradient.

When the set of trainable variables changes, :func:`plan_optimizer_state` rewrites that list
for the new set (:attr:`OptimizerStateMode.REMAP`, the default): each variable that still
trains keeps its slots, found by its dataset path; the slots of a variable that no longer
trains are left out; a variable that starts training gets zero-filled slots; ``iteration``
and ``learning_rate`` are kept. It does so only when it can show the result is what Keras
expects: the optimizer is one measured above, every layer that trains before or after is of a
class whose trainable variables are known, and the saved list has exactly the count and, slot
by slot, the shapes that the old trainable variables imply. Otherwise the state is dropped,
with the reason (:attr:`OptimizerPlan.reason`).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bnfreeze.formats.writers import OptimizerSlot
from bnfreeze.model.keras_classes import ALL_TRAINABLE_CLASSES
from bnfreeze.model.records import LayerState, ModelFile, ModelFormat

OPTIMIZER_VARS = "/optimizer/vars"


class OptimizerStateMode(enum.Enum):
    """What to do with the saved optimizer variables when the trainable set changes."""

    REMAP = "remap"  # rewrite them for the new trainable set when provably right, else drop
    DROP = "drop"  # leave them out
    KEEP = "keep"  # keep them as they are (Keras then misassigns or skips them)


class OptimizerState(enum.Enum):
    """What happened to the saved optimizer variables."""

    NONE = "none"  # the input holds none
    UNCHANGED = "unchanged"  # the set of trainable variables did not change: kept as they were
    REMAPPED = "remapped"  # it changed, and they were rewritten for the new set
    KEPT = "kept"  # it changed, and they were kept as they were on request (mode keep)
    DROPPED = "dropped"  # it changed, and they were dropped (asked, or remap not provable)


@dataclass(frozen=True)
class OptimizerLayout:
    """How one optimizer orders its variables: ``head`` scalars (iteration, learning rate),
    then ``blocks``, each a tuple of slot names repeated per trainable variable."""

    class_name: str
    head: tuple[str, ...]
    blocks: tuple[tuple[str, ...], ...]

    def count(self, variables: int) -> int:
        return len(self.head) + sum(len(b) for b in self.blocks) * variables


@dataclass(frozen=True)
class OptimizerPlan:
    """What to do with the saved optimizer variables, and why.

    ``slots`` is the new ``/optimizer/vars`` list for REMAPPED (empty for DROPPED), None when
    the variables are written as they are. ``reason`` says why a remap was not done.
    ``expected`` is how many variables Keras will build for the new trainable set, when known.
    """

    state: OptimizerState
    saved: int | None  # variables in the input
    slots: tuple[OptimizerSlot, ...] | None = None
    reason: str | None = None
    kept: int = 0  # slots kept for variables that still train
    created: int = 0  # zero-filled slots for variables that start training
    left_out: int = 0  # slots of variables that stop training
    expected: int | None = None

    @property
    def dropped(self) -> int:
        """How many saved variables the output leaves out entirely."""
        return (self.saved or 0) if self.state is OptimizerState.DROPPED else 0


class _NotProvable(Exception):
    pass


def optimizer_layout(compile_config: dict[str, Any] | None) -> OptimizerLayout:
    """The measured layout of the compiled optimizer; raises _NotProvable for any other."""
    optimizer = (compile_config or {}).get("optimizer")
    if not isinstance(optimizer, dict):
        raise _NotProvable("the compile config does not name a built-in optimizer")
    name = optimizer.get("class_name")
    module = optimizer.get("module")
    cfg = optimizer.get("config")
    if module not in (None, "keras.optimizers") or not isinstance(cfg, dict):
        raise _NotProvable(f"the optimizer {name!r} is not a built-in Keras optimizer")
    if cfg.get("gradient_accumulation_steps"):
        raise _NotProvable("gradient accumulation adds variables whose order was not measured")
    blocks: list[tuple[str, ...]] = []
    if cfg.get("use_ema"):
        blocks.append(("average",))
    if name in ("Adam", "AdamW"):
        blocks.append(("momentum", "velocity"))
        if cfg.get("amsgrad"):
            blocks.append(("velocity_hat",))
    elif name == "SGD":
        if cfg.get("momentum"):
            blocks.append(("momentum",))
    elif name == "RMSprop":
        blocks.append(("velocity",))
        if cfg.get("momentum"):
            blocks.append(("momentum",))
        if cfg.get("centered"):
            blocks.append(("average_gradient",))
    else:
        raise _NotProvable(
            f"bnfreeze knows the variable order of Adam, AdamW, SGD and RMSprop, not {name}"
        )
    schedule = isinstance(cfg.get("learning_rate"), dict)
    head = ("iteration",) if schedule else ("iteration", "learning_rate")
    return OptimizerLayout(str(name), head, tuple(blocks))


def _layer_config(model: ModelFile, state: LayerState) -> dict[str, Any]:
    node: Any = model.config
    for key in state.layer.config_path:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return {}
    inner = node.get("config") if isinstance(node, dict) else None
    return inner if isinstance(inner, dict) else {}


def trainable_variables(model: ModelFile, states: Sequence[LayerState]) -> tuple[str, ...]:
    """The dataset paths of ``model.trainable_variables``, in Keras's order, for the layer
    states given; raises _NotProvable when a layer that trains is of a class whose trainable
    variables bnfreeze does not know."""
    index = model.weights.variables if model.weights is not None else {}
    out: list[str] = []
    for state in states:
        layer = state.layer
        datasets = index.get(layer.path, ())
        if layer.is_container and not layer.custom:
            # A nested model's own optimizer group (saved by Keras, never loaded) is not a
            # variable of the model; its layers come as their own records.
            datasets = tuple(d for d in datasets if "/optimizer/vars/" not in d)
        if not datasets or state.in_fit.trains_weights is False:
            continue
        where = f"layer {layer.path!r} ({layer.class_name})"
        if state.in_fit.trains_weights is None:
            raise _NotProvable(f"{where} may train variables only its Python code knows")
        group = datasets[0].rpartition("/vars/")[0]
        if any(d.rpartition("/vars/")[0] != group for d in datasets):
            raise _NotProvable(f"{where} holds variables of inner objects")
        if layer.is_batchnorm:
            n = int(layer.scale) + int(layer.center)
            if layer.renorm or len(datasets) != n + 2:
                raise _NotProvable(f"{where} has variables other than gamma, beta and statistics")
            out.extend(datasets[:n])
            continue
        cfg = _layer_config(model, state)
        dtype = cfg.get("dtype")
        quantized = isinstance(dtype, dict) and "Quantized" in str(dtype.get("class_name"))
        if layer.custom or layer.class_name not in ALL_TRAINABLE_CLASSES or cfg.get("lora_rank"):
            raise _NotProvable(f"{where}: bnfreeze does not know which of its variables train")
        if quantized:
            raise _NotProvable(f"{where} is quantized")
        out.extend(datasets)
    if len(set(out)) != len(out):
        raise _NotProvable("a variable is shared between layers")
    return tuple(out)


def _shape(model: ModelFile, path: str) -> tuple[int, ...]:
    locations = model.weights.locations if model.weights is not None else {}
    pending = locations.get(path)
    # From the dataspace: any layout (chunked, compressed, compact) and any type (bfloat16).
    extent = pending.extent() if pending is not None else None
    if extent is None or extent[0] is None:
        raise _NotProvable(f"the shape of {path} cannot be read without h5py")
    return tuple(extent[0])


def plan_optimizer_state(
    model: ModelFile,
    before: Sequence[LayerState],
    after: Sequence[LayerState],
    mode: OptimizerStateMode,
    *,
    set_changed: bool,
) -> OptimizerPlan:
    """Decide what to write for the saved optimizer variables of ``model`` when the layers'
    states go from ``before`` to ``after`` (see the module docstring). ``set_changed`` says
    whether the set of trainable layers changed (what decides when no remap is possible)."""
    saved = model.optimizer_variables
    if not saved:
        return OptimizerPlan(OptimizerState.NONE, saved)
    layout: OptimizerLayout | None = None
    old: Sequence[str] = ()
    new: Sequence[str] = ()
    reason: str | None = None
    try:
        if model.format is not ModelFormat.KERAS:
            raise _NotProvable(
                f"bnfreeze remaps the optimizer state of .keras files, not of "
                f"{model.format.json_name} files"
            )
        layout = optimizer_layout(model.compile_config)
        old = trainable_variables(model, before)
        new = trainable_variables(model, after)
    except _NotProvable as exc:
        reason = str(exc)
    else:
        if old == new:
            return OptimizerPlan(OptimizerState.UNCHANGED, saved, expected=saved)
        if saved == len(layout.head):
            # Compiled but never trained: the optimizer was not built, so nothing saved
            # follows the trainable variables (Keras skips the two on load either way).
            return OptimizerPlan(
                OptimizerState.UNCHANGED,
                saved,
                reason="the optimizer was never built: only its iteration and learning rate "
                "are saved",
                expected=layout.count(len(new)),
            )
    if not set_changed and reason is not None:
        return OptimizerPlan(OptimizerState.UNCHANGED, saved)
    expected = layout.count(len(new)) if layout is not None else None
    if mode is OptimizerStateMode.KEEP:
        return OptimizerPlan(OptimizerState.KEPT, saved, expected=expected)
    if mode is OptimizerStateMode.DROP:
        return OptimizerPlan(OptimizerState.DROPPED, saved, slots=(), expected=expected)
    if reason is None:
        assert layout is not None
        try:
            return _remap(model, layout, old, new, saved)
        except _NotProvable as exc:
            reason = str(exc)
    return OptimizerPlan(OptimizerState.DROPPED, saved, slots=(), reason=reason, expected=expected)


def _remap(
    model: ModelFile,
    layout: OptimizerLayout,
    old: Sequence[str],
    new: Sequence[str],
    saved: int,
) -> OptimizerPlan:
    wanted = layout.count(len(old))
    if wanted != saved:
        raise _NotProvable(
            f"the file holds {saved} optimizer variables, but a {layout.class_name} with its "
            f"settings holds {wanted} for the {len(old)} variables that trained"
        )
    head = len(layout.head)
    for i in range(head):
        if _shape(model, f"{OPTIMIZER_VARS}/{i}") != ():
            raise _NotProvable(f"optimizer variable {i} is not a scalar (iteration, learning rate)")
    position = {path: j for j, path in enumerate(old)}
    slots = [OptimizerSlot(f"{OPTIMIZER_VARS}/{i}", "") for i in range(head)]
    start = head
    kept = created = 0
    for block in layout.blocks:
        width = len(block)
        for j, path in enumerate(old):
            shape = _shape(model, path)
            for k in range(width):
                slot = f"{OPTIMIZER_VARS}/{start + j * width + k}"
                if _shape(model, slot) != shape:
                    raise _NotProvable(
                        f"saved optimizer variable {start + j * width + k} does not have the "
                        f"shape of {path}, the variable it should follow"
                    )
        for path in new:
            old_at = position.get(path)
            for k in range(width):
                if old_at is None:
                    _shape(model, path)  # readable, so a zero slot can be shaped like it
                    slots.append(OptimizerSlot(None, path))
                    created += 1
                else:
                    slots.append(
                        OptimizerSlot(f"{OPTIMIZER_VARS}/{start + old_at * width + k}", path)
                    )
                    kept += 1
        start += width * len(old)
    return OptimizerPlan(
        OptimizerState.REMAPPED,
        saved,
        slots=tuple(slots),
        kept=kept,
        created=created,
        left_out=saved - head - kept,
        expected=len(slots),
    )


def trainable_layers(states: Sequence[LayerState]) -> frozenset[str]:
    """The layers whose variables ``fit()`` trains: the set the saved optimizer slots follow."""
    return frozenset(
        s.layer.path for s in states if s.in_fit.trains_weights and s.has_weights is not False
    )


def parse_mode(value: OptimizerStateMode | str | None) -> OptimizerStateMode:
    """The mode asked for: ``remap`` when none is given."""
    return OptimizerStateMode.REMAP if value is None else OptimizerStateMode(value)


def optimizer_decision(
    optimizer_variables: int | None, trainable_set_changed: bool, mode: OptimizerStateMode
) -> OptimizerState:
    """What the Keras engine and in-memory routes do with the optimizer variables (they do
    not remap): drop them when they exist and the set of trainable variables changed, unless
    ``mode`` keeps them."""
    if not optimizer_variables:
        return OptimizerState.NONE
    if not trainable_set_changed:
        return OptimizerState.UNCHANGED
    return OptimizerState.KEPT if mode is OptimizerStateMode.KEEP else OptimizerState.DROPPED
