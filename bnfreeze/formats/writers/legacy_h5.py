"""Writer for legacy HDF5 (`.h5`) models: new ``trainable`` flags without scrambling weights.

Why this is more than a config edit (docs/semantics.md, rule 6). Keras's legacy loader assigns
the values
of each top-level layer group **by position**: the group's ``weight_names`` attribute lists
datasets, and the i-th one goes to the i-th variable of
``layer.trainable_weights + layer.non_trainable_weights`` of the freshly built layer. For a
nested model that list depends on the flags: with the container trainable, every variable
whose own ``trainable`` is True comes first, in model order, then all the others. Freeze
``bn1`` inside a ``(bn1, bn2)`` sub-model and the loader hands bn2's gamma/beta to bn1's
moving statistics, silently.

So this writer rewrites the file consistently, without TensorFlow:

* ``model_config``: the new flags (``bnfreeze.model.assignments.apply_to_config``);
* each affected group's ``weight_names``: the order the Keras 3 loader will expect after the
  change. The datasets stay where they are; the loader looks them up by name, so only the
  list is permuted;
* ``optimizer_weights``: saved by position for the old trainable set. When the request says
  to drop them (the orchestration does when that set changes, unless
  ``--optimizer-state keep``), the group is left out. ``training_config`` is kept, so Keras
  compiles the loaded model with a fresh optimizer; legacy loading then passes silently.

The order Keras 3 expects, measured (Keras 3.15, ``keras/src/legacy/saving``):

* a layer's own variables: trainable-kind first, then non-trainable-kind (BN: gamma, beta,
  moving_mean, moving_variance), whatever its flag;
* a container's ``weights``: its layers' variables, depth first, in model order;
* ``trainable_weights + non_trainable_weights`` of a top-level layer: if the layer's own flag
  is False, its ``weights`` unchanged; otherwise the variables whose ``trainable`` is True
  (trainable-kind variables of leaves whose own flag is True), then the rest;
* on load a Functional keeps its stored flag and does not push it down to its layers; a
  Sequential drops its stored flag and is trainable.

Before trusting that model of the file, the writer replays it with the *old* flags and
requires it to reproduce each affected group's stored ``weight_names`` exactly. Anything it
cannot map (a custom layer, a wrapper, a layer whose variable kinds it does not know, names
it cannot attribute) is refused with :class:`H5RewriteError`, which names ``--engine keras``,
instead of guessing. :meth:`LegacyH5Writer.verify` re-reads the written file and compares
it with the input, group list by group list and dataset by dataset.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnfreeze.errors import BnfreezeError, ModelFormatError, OutputError
from bnfreeze.formats.readers.legacy_h5 import WeightOwners
from bnfreeze.formats.readers.legacy_h5 import names as attr_names
from bnfreeze.formats.writers import WriteOutcome, WriteRequest, verify_flags
from bnfreeze.model.assignments import Flags, current_flags
from bnfreeze.model.keras_classes import ALL_TRAINABLE_CLASSES, NON_TRAINABLE_VARIABLES
from bnfreeze.model.records import LayerKind, LayerRecord, ModelFile, ModelFormat


class H5RewriteError(BnfreezeError):
    """The legacy `.h5` cannot be rewritten consistently without Keras.

    Raised before anything is written; ``freezing.run`` with ``engine=auto`` then falls back
    to the Keras engine (``keras_engine_can_help``).
    """

    keras_engine_can_help = True

    def __init__(self, message: str) -> None:
        super().__init__(
            message,
            hint="Nothing was written. Use --engine keras (loads and saves through Keras), or "
            "re-save the model as .keras.",
        )


@dataclass(frozen=True)
class H5Plan:
    """What the rewrite changes besides ``model_config``."""

    weight_names: dict[str, tuple[str, ...]]  # group -> new order, only where it changes
    trainable_set_changed: bool
    optimizer_variables: int | None  # saved optimizer variables, None when there are none

    @property
    def regrouped(self) -> tuple[str, ...]:
        return tuple(self.weight_names)


# --------------------------------------------------------------------------------------------
# The pure part: which order Keras will expect.


@dataclass(frozen=True)
class _Var:
    name: str  # the weight_names entry
    leaf: str  # the layer path that owns it
    trainable_kind: bool  # created with trainable=True (tracked in _trainable_variables)


def _by_top_level(layers: Sequence[LayerRecord]) -> dict[str, list[LayerRecord]]:
    """Each top-level layer's own record and every record below it, in model order."""
    out: dict[str, list[LayerRecord]] = {}
    for record in layers:
        out.setdefault(record.path.split("/", 1)[0], []).append(record)
    return out


class _Owners:
    """The layer a ``weight_names`` entry belongs to (the reader's
    :class:`~bnfreeze.formats.readers.legacy_h5.WeightOwners`), or :class:`H5RewriteError`."""

    def __init__(self, group: str, candidates: Sequence[LayerRecord]) -> None:
        self.group = group
        self.owners = WeightOwners(group, candidates)

    def __call__(self, weight_name: str) -> LayerRecord:
        owner, why = self.owners.owner(weight_name)
        if owner is not None:
            return owner
        detail = f" ({why})" if why else ""
        raise H5RewriteError(
            f"cannot tell which layer of {self.group!r} owns weight {weight_name!r}{detail}."
        )


def _kind_known(record: LayerRecord, variable: str) -> bool | None:
    """True/False when the variable's kind is known (trainable-kind?), None when not."""
    if record.custom or record.kind in (LayerKind.UNKNOWN, LayerKind.WRAPPER):
        return None
    table = NON_TRAINABLE_VARIABLES.get(record.class_name)
    if table is not None:
        return variable not in table
    if record.class_name in ALL_TRAINABLE_CLASSES:
        return True
    return None


def _group_flag(record: LayerRecord, flags: Flags, *, on_load: bool) -> bool:
    """Whether the top-level layer partitions its list (its own flag, as Keras will see it)."""
    if on_load and record.class_name == "Sequential":
        return True  # Keras 3 drops a Sequential's own flag on load
    return flags.get(record.path) is not False


def _order(
    group: LayerRecord,
    variables: Sequence[_Var],
    leaf_order: Sequence[str],
    flags: Flags,
    *,
    on_load: bool,
) -> list[str]:
    rank = {path: i for i, path in enumerate(leaf_order)}
    weights = sorted(variables, key=lambda v: rank[v.leaf])  # stable: own order kept
    if not _group_flag(group, flags, on_load=on_load):
        return [v.name for v in weights]
    trainable = [v for v in weights if v.trainable_kind and flags.get(v.leaf) is not False]
    chosen = {v.name for v in trainable}
    return [v.name for v in trainable] + [v.name for v in weights if v.name not in chosen]


def plan(
    model: ModelFile,
    layers: Sequence[LayerRecord],
    old_flags: Flags,
    new_flags: Flags,
    *,
    model_trainable: bool = True,
) -> H5Plan:
    """Compute each affected group's new ``weight_names`` order. Reads HDF5 metadata only."""
    import h5py

    try:
        with h5py.File(model.path, "r") as h5:
            root = h5.get("model_weights")
            stored: dict[str, list[str]] = {}
            if isinstance(root, h5py.Group):
                for group in attr_names(root.attrs.get("layer_names")):
                    sub = root.get(group)
                    if isinstance(sub, h5py.Group):
                        stored[group] = read_weight_names(sub)
    except OSError as exc:
        raise ModelFormatError(f"{model.path}: cannot be read ({exc}).") from None
    return plan_from_names(
        stored,
        layers,
        old_flags,
        new_flags,
        model_trainable=model_trainable,
        optimizer_variables=model.optimizer_variables,
    )


def plan_from_names(
    stored: Mapping[str, Sequence[str]],
    layers: Sequence[LayerRecord],
    old_flags: Flags,
    new_flags: Flags,
    *,
    model_trainable: bool = True,
    optimizer_variables: int | None = None,
) -> H5Plan:
    """:func:`plan` on the stored ``weight_names`` lists (group name -> list)."""
    by_path = {r.path: r for r in layers}
    changed = {p for p in set(old_flags) | set(new_flags) if old_flags.get(p) != new_flags.get(p)}
    new_order: dict[str, tuple[str, ...]] = {}
    old_trainable: set[str] = set()
    new_trainable: set[str] = set()
    trees = _by_top_level(layers)
    for group_name, saved in stored.items():
        if not saved:
            continue
        group = by_path.get(group_name)
        if group is None or group.depth != 0:
            if group_name == "top_level_model_weights":
                continue  # the model's own variables: no layer flag orders them
            raise H5RewriteError(f"weight group {group_name!r} matches no top-level layer.")
        subtree = trees.get(group_name, [])
        candidates = [r for r in subtree if r.kind not in (LayerKind.CONTAINER, LayerKind.INPUT)]
        touched = any(r.path in changed for r in subtree)
        try:
            variables = _variables(saved, group_name, candidates)
        except H5RewriteError:
            if touched:
                raise
            continue  # an untouched group is copied as it is
        leaf_order = [r.path for r in candidates]
        for v in variables:
            if v.trainable_kind and old_flags.get(v.leaf) is not False:
                old_trainable.add(v.name + "@" + group_name)
            if v.trainable_kind and new_flags.get(v.leaf) is not False:
                new_trainable.add(v.name + "@" + group_name)
        if not touched:
            continue
        replay = _order(group, variables, leaf_order, old_flags, on_load=False)
        if replay != list(saved):
            raise H5RewriteError(
                f"the stored weight order of {group_name!r} does not follow the Keras 3 layout "
                "bnfreeze knows (saved by another Keras version?), so it cannot be reordered "
                "safely."
            )
        _check_kinds(group, variables, by_path, new_flags)
        order = _order(group, variables, leaf_order, new_flags, on_load=True)
        if order != list(saved):
            new_order[group_name] = tuple(order)
    if not model_trainable:
        old_trainable, new_trainable = set(), set()
    return H5Plan(
        weight_names=new_order,
        trainable_set_changed=old_trainable != new_trainable,
        optimizer_variables=optimizer_variables,
    )


def _variables(saved: Sequence[str], group: str, candidates: Sequence[LayerRecord]) -> list[_Var]:
    out = []
    owner_of = _Owners(group, candidates)
    for name in saved:
        owner = owner_of(name)
        kind = _kind_known(owner, name.rsplit("/", 1)[-1].split(":")[0])
        out.append(_Var(name=name, leaf=owner.path, trainable_kind=kind is not False))
    # A variable's kind only matters where its own layer trains; unknown kinds are checked
    # by _check_kinds against the flags that will be loaded.
    return out


def _check_kinds(
    group: LayerRecord, variables: Sequence[_Var], by_path: Mapping[str, LayerRecord], flags: Flags
) -> None:
    if not _group_flag(group, flags, on_load=True):
        return
    for v in variables:
        owner = by_path[v.leaf]
        if flags.get(v.leaf) is False:
            continue
        if _kind_known(owner, v.name.rsplit("/", 1)[-1].split(":")[0]) is None:
            raise H5RewriteError(
                f"{v.leaf} ({owner.class_name}) is trainable inside {group.path!r}, and bnfreeze "
                "does not know which of its variables Keras creates as non-trainable, so the "
                "weight order Keras will expect is unknown."
            )


# --------------------------------------------------------------------------------------------
# HDF5 attribute helpers, the way Keras reads and writes them.


def read_weight_names(group: Any) -> list[str]:
    """``weight_names`` of a group, joined from ``weight_names0..N`` chunks when split."""
    if "weight_names" in group.attrs:
        return attr_names(group.attrs["weight_names"])
    out: list[str] = []
    chunk = 0
    while f"weight_names{chunk}" in group.attrs:
        out += attr_names(group.attrs[f"weight_names{chunk}"])
        chunk += 1
    return out


def write_weight_names(group: Any, names: Sequence[str]) -> None:
    """Replace ``weight_names`` with a permutation of itself, in place.

    Same names, same count: each attribute (or each ``weight_namesN`` chunk, as Keras's
    ``save_attributes_to_hdf5_group`` split it) is overwritten with the same shape and, where
    the names fit, the same dtype, so the object header does not grow.
    """
    import numpy as np

    keys = ["weight_names"] if "weight_names" in group.attrs else []
    if not keys:
        while f"weight_names{len(keys)}" in group.attrs:
            keys.append(f"weight_names{len(keys)}")
    if not keys:
        raise OutputError(f"group {group.name} has no weight_names to reorder.")
    start = 0
    for key in keys:
        old = group.attrs.get_id(key)
        count = old.shape[0] if old.shape else 1
        part = [n.encode("utf8") for n in names[start : start + count]]
        start += count
        data = np.asarray(part)
        dtype = old.dtype
        if dtype.kind == "S" and data.dtype.itemsize <= dtype.itemsize:
            data = data.astype(dtype)
        group.attrs.modify(key, data)
    if start != len(names):
        raise OutputError(f"group {group.name}: weight_names count changed while writing.")


# --------------------------------------------------------------------------------------------
# Writing.


class LegacyH5Writer:
    """The :class:`~bnfreeze.formats.writers.Writer` for :attr:`ModelFormat.H5`."""

    format = ModelFormat.H5

    def write(self, request: WriteRequest, dest: Path) -> WriteOutcome:
        """Write the edited model at ``dest``.

        The output holds the same HDF5 objects as the input: every dataset is copied
        unchanged (HDF5 object copy), root attributes are kept except ``model_config``
        (``training_config`` included, so Keras still compiles the model), affected groups
        get a reordered ``weight_names``, and ``optimizer_weights`` is left out when
        ``request.drop_optimizer_state``.
        """
        layout = plan_request(request)
        drop = request.drop_optimizer_state and bool(request.model.optimizer_variables)
        with damaged_input(request.model.path):
            _write_copy(Path(request.model.path), dest, request.config, layout, drop_optimizer=drop)
        return WriteOutcome(
            optimizer_variables_dropped=(request.model.optimizer_variables or 0) if drop else 0
        )

    def prepare(self, request: WriteRequest) -> None:
        """Nothing to do early: verify() re-reads the whole file."""

    def verify(self, request: WriteRequest, written: Path) -> None:
        """Re-read ``written``: the flags, the config, the object list, every group's
        ``weight_names`` and every dataset's value."""
        verify_flags(request, written)
        drop = request.drop_optimizer_state and bool(request.model.optimizer_variables)
        with damaged_input(request.model.path):
            verify(
                Path(request.model.path),
                written,
                request.config,
                plan_request(request),
                drop_optimizer=drop,
            )


@contextlib.contextmanager
def damaged_input(path: str) -> Iterator[None]:
    """h5py's errors on objects the reader never looked at (a dataset's damaged header, say)
    become a ModelFormatError naming the input. An OSError with an errno (no space left, say)
    is about the output and goes on to the atomic write, which reports it."""
    try:
        yield
    except BnfreezeError:
        raise
    except OSError as exc:
        if exc.errno is not None:
            raise
        raise ModelFormatError(f"{path}: a damaged HDF5 file ({exc}).") from None
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise ModelFormatError(f"{path}: a damaged HDF5 file ({exc}).") from None


def plan_request(request: WriteRequest) -> H5Plan:
    """:func:`plan` for a :class:`~bnfreeze.formats.writers.WriteRequest`."""
    inner = request.model.config.get("config")
    model_trainable = not (isinstance(inner, dict) and inner.get("trainable") is False)
    return plan(
        request.model,
        request.layers,
        current_flags(request.layers),
        request.flags,
        model_trainable=model_trainable,
    )


WRITER = LegacyH5Writer()


def _write_copy(
    source: Path, target: Path, config: dict[str, Any], layout: H5Plan, *, drop_optimizer: bool
) -> None:
    import h5py

    with h5py.File(source, "r") as src, h5py.File(target, "w") as dst:
        for key in src.attrs:
            if key != "model_config":
                dst.attrs.create(key, src.attrs[key], dtype=src.attrs.get_id(key).dtype)
        text = json.dumps(config)
        # Keep the attribute's type: Keras writes bytes, which h5py reads back as str.
        dst.attrs["model_config"] = (
            text if isinstance(src.attrs["model_config"], str) else (text.encode("utf8"))
        )
        for key in src:
            if drop_optimizer and key == "optimizer_weights":
                continue
            src.copy(src[key], dst, name=key)  # H5Ocopy: datasets byte for byte
        for group, order in layout.weight_names.items():
            write_weight_names(dst["model_weights"][group], order)


def strip_optimizer(source: Path, target: Path) -> None:
    """Copy a legacy ``.h5`` without its ``optimizer_weights`` group (HDF5 object copy of
    everything else, root attributes included: ``training_config`` stays)."""
    import h5py

    with h5py.File(source, "r") as src, h5py.File(target, "w") as dst:
        for key in src.attrs:
            dst.attrs.create(key, src.attrs[key], dtype=src.attrs.get_id(key).dtype)
        for key in src:
            if key != "optimizer_weights":
                src.copy(src[key], dst, name=key)


def verify(
    source: Path, target: Path, config: dict[str, Any], layout: H5Plan, *, drop_optimizer: bool
) -> None:
    """Re-read the written file: config, every group's list and every dataset's value."""
    import h5py
    import numpy as np

    def objects(h5: Any) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def keep(name: str, obj: Any) -> None:
            found[name] = obj

        h5.visititems(keep)
        return found

    try:
        with h5py.File(source, "r") as src, h5py.File(target, "r") as dst:
            raw = dst.attrs.get("model_config")
            text = raw.decode("utf8") if isinstance(raw, bytes) else raw
            if not isinstance(text, str) or json.loads(text) != json.loads(json.dumps(config)):
                raise OutputError("the written model_config differs from the planned one.")
            before, after = objects(src), objects(dst)
            if drop_optimizer:
                before = {k: v for k, v in before.items() if k.split("/")[0] != "optimizer_weights"}
            if before.keys() != after.keys():
                raise OutputError("the written file does not hold the same objects as the input.")
            for name, a in before.items():
                b = after[name]
                if isinstance(a, h5py.Dataset):
                    if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a[()], b[()]):
                        raise OutputError(f"dataset {name} changed while writing.")
                elif name.startswith("model_weights/") and name.count("/") == 1:
                    group = name.split("/", 1)[1]
                    want = list(layout.weight_names.get(group, read_weight_names(a)))
                    if read_weight_names(b) != want:
                        raise OutputError(f"weight_names of {group} were not written as planned.")
    except OutputError:
        raise
    except Exception as exc:  # h5py raises OSError, KeyError, ValueError...
        raise OutputError(f"the written file does not read back ({exc}).") from None
