"""The Keras engine route: set ``trainable`` flags on a loaded (or in-memory) ``keras.Model``.

The config route (:mod:`bnfreeze.ops.edit`) edits saved files without TensorFlow. This module
does what only a live model can:

* **subclassed models** whose config does not list their layers: the layers are found on the
  live object (``model.layers``);
* **custom BatchNormalization subclasses**: recognised with
  ``isinstance(layer, keras.layers.BatchNormalization)``, which a config cannot show
  (docs/semantics.md, rule 7);
* **formats the readers do not rewrite**, and in-memory models (the Python API,
  :mod:`bnfreeze.api`).

Layer paths follow the walk's scheme (:mod:`bnfreeze.model.walk`): names joined by ``/`` from the
outermost container down, through nested models, wrappers (``TimeDistributed.layer``,
``Bidirectional.forward_layer`` / ``backward_layer``) and the sublayers of custom layers.

Loading goes through :func:`bnfreeze.runtime.loading.load_model`: ``safe_mode=True``, custom objects
only from an explicit ``--custom-objects`` module or file, a ``Lambda`` refused unless
``--unsafe``. Flags are applied the way Keras's own setter would leave them: a container's
flag first (``container.trainable = X`` reaches every layer below it), then every leaf's own
flag, because on Keras 3 the last assignment that reaches a layer wins (docs/semantics.md, rule 3).

Saving, and the optimizer (docs/semantics.md, rules 4-5). Loading a compiled model builds its
optimizer;
saving it again writes that optimizer's slot variables, zero-filled when the file had none,
which tripled a ResNet50 file (103 MB -> 308 MB, measured). So the model is saved **without
optimizer variables** unless the input's saved state is still valid (the set of trainable
variables did not change) or the user keeps it (``--keep-optimizer-state``). The compile
config is kept either way, so Keras compiles the loaded model with a fresh optimizer, as it
does for any compiled model saved before its first ``fit()``.

A save is written to a temporary file in the destination folder, loaded back with Keras and
compared with the edited model (every flag and every variable, by the path Keras saves it
under, :func:`saved_paths`) before it replaces the output. Keras does not store the flags of
layers a model builds in code: a keras-hub backbone's or task's, a custom layer's sublayers, a
subclassed model's (measured: ``bn.trainable=False`` there loads back as True). For a ``.keras``
output, every flag is then recorded in the archive's ``bnfreeze.json``
(:mod:`bnfreeze.formats.recorded_flags`), which :func:`bnfreeze.load_model` applies after
``keras.models.load_model``; a legacy ``.h5`` output cannot carry them and is refused.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bnfreeze.errors import BnfreezeError, ModelFormatError, OutputError, SelectionError
from bnfreeze.formats.recorded_flags import MEMBER as RECORDED_MEMBER
from bnfreeze.formats.recorded_flags import RecordedFlags
from bnfreeze.model import diagnostics, modes
from bnfreeze.model.assignments import Assignment, Change, Flags, assign, changes, current_flags
from bnfreeze.model.records import (
    Finding,
    LayerKind,
    LayerRecord,
    ModelFile,
    ModelFormat,
    Report,
    Runtime,
    WarningCode,
    WeightIndex,
)
from bnfreeze.model.walk import OTHER_NORMALIZATION_CLASSES, walk
from bnfreeze.runtime import loading
from bnfreeze.runtime.branches import is_frozen_stats_layer

#: Output endings Keras 3 ``model.save`` understands, and the format each one writes.
SAVE_FORMATS: dict[str, ModelFormat] = {
    ".keras": ModelFormat.KERAS,
    ".h5": ModelFormat.H5,
    ".hdf5": ModelFormat.H5,
}

_BUILTIN_PREFIXES = ("keras", "tf_keras", "tensorflow")

#: What to do when a legacy .h5 output cannot hold the edit.
H5_HINT = (
    "Nothing was written. Save as .keras instead (-o model.keras): for the layers a model "
    "builds in code, bnfreeze records their flags in it, and bnfreeze.load_model('model.keras') "
    "sets them again after loading."
)


# -------------------------------------------------------------------------- live layers


def _keras() -> Any:
    return loading.keras_module(Runtime.KERAS3)


def runtime_of(obj: Any) -> Runtime:
    """The Keras a live layer or model belongs to: ``tf_keras`` (Keras 2) or Keras 3. Never
    imports tf_keras: an object of it exists only if the caller imported it."""
    tf_keras = sys.modules.get("tf_keras")
    if tf_keras is not None and isinstance(obj, tf_keras.layers.Layer):
        return Runtime.TF_KERAS
    return Runtime.KERAS3


def _keras_of(obj: Any) -> Any:
    return loading.keras_module(runtime_of(obj))


def _is_builtin(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] in _BUILTIN_PREFIXES


def children(layer: Any) -> list[Any]:
    """The layers directly below ``layer`` in bnfreeze's path scheme.

    A model's ``layers``; a wrapper's wrapped layer(s); the sublayers of a custom layer. A
    built-in layer made of sublayers (``MultiHeadAttention``, say) is one leaf, as in the
    saved config.
    """
    keras = _keras_of(layer)
    if isinstance(layer, keras.Model):
        return list(layer.layers)
    inner = [
        getattr(layer, attr)
        for attr in ("forward_layer", "backward_layer")
        if isinstance(getattr(layer, attr, None), keras.layers.Layer)
    ]
    if not inner and isinstance(getattr(layer, "layer", None), keras.layers.Layer):
        inner = [layer.layer]
    if inner or _is_builtin(layer):
        return inner
    return list(layer._flatten_layers(include_self=False, recursive=False))


def live_layers(model: Any) -> dict[str, Any]:
    """Every layer below ``model``, by path, in model order."""
    out: dict[str, Any] = {}

    def visit(layer: Any, prefix: str, depth: int) -> None:
        if depth > 64:
            raise ModelFormatError("the model nests layers more than 64 deep.")
        for child in children(layer):
            path = prefix + child.name
            if path in out:
                raise ModelFormatError(
                    f"two layers share the path {path!r}; bnfreeze cannot address them apart."
                )
            out[path] = child
            visit(child, path + "/", depth + 1)

    visit(model, "", 0)
    return out


def _live_kind(layer: Any, has_children: bool) -> LayerKind:
    keras = _keras_of(layer)
    if isinstance(layer, keras.layers.InputLayer):
        return LayerKind.INPUT
    if isinstance(layer, keras.layers.BatchNormalization):
        return LayerKind.BATCHNORM
    if isinstance(layer, keras.Model):
        return LayerKind.CONTAINER
    if has_children:
        wrapper = any(hasattr(layer, a) for a in ("layer", "forward_layer"))
        return LayerKind.WRAPPER if wrapper else LayerKind.CONTAINER
    if not _is_builtin(layer):
        return LayerKind.UNKNOWN
    if type(layer).__name__ in OTHER_NORMALIZATION_CLASSES:
        return LayerKind.NORMALIZATION
    return LayerKind.LAYER


def serialized_config(model: Any) -> dict[str, Any]:
    """The model's config as Keras saves it (``serialize_keras_object``); a minimal one for a
    subclassed model whose ``get_config`` cannot serialize it. A tf_keras model's config has
    the Keras 2 layout, the one legacy ``.h5`` files hold, which the walk reads too."""
    keras = _keras_of(model)
    try:
        config = keras.saving.serialize_keras_object(model)
    except Exception:
        config = None
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        config = {
            "class_name": type(model).__name__,
            "config": {"name": model.name, "trainable": bool(model.trainable)},
        }
    return config


@dataclass(frozen=True)
class LiveModel:
    """A live model seen through bnfreeze's records."""

    model: Any
    config: dict[str, Any]
    records: tuple[LayerRecord, ...]
    layers: dict[str, Any]  # path -> live layer, for the records that have one

    def flags(self) -> Flags:
        return {r.path: r.trainable for r in self.records}


def live_model(model: Any) -> LiveModel:
    """Records for a live model, the same as :func:`bnfreeze.model.walk.walk` gives for its saved
    config, with two corrections only a live model allows: a custom BN subclass is a BN
    (``isinstance``), and layers the config does not list (a subclassed model's, a custom
    layer's sublayers) are found on the object."""
    config = serialized_config(model)
    live = live_layers(model)
    try:
        walked = walk(config, f"model {model.name!r}")
        walked_records: tuple[LayerRecord, ...] = walked.layers
    except ModelFormatError:
        walked_records = ()
    by_path = {r.path: r for r in walked_records}
    if walked_records and set(live) <= set(by_path):
        records = tuple(_corrected(r, live.get(r.path)) for r in walked_records)
    else:
        records = tuple(_from_live(live, by_path))
    return LiveModel(model=model, config=config, records=records, layers=live)


def _corrected(record: LayerRecord, layer: Any) -> LayerRecord:
    if layer is None:
        return record
    keras = _keras_of(layer)
    updates: dict[str, Any] = {}
    is_bn = isinstance(layer, keras.layers.BatchNormalization)
    if is_bn and record.kind is not LayerKind.BATCHNORM:
        updates["kind"] = LayerKind.BATCHNORM
    if record.kind is not LayerKind.INPUT and record.trainable is not bool(layer.trainable):
        updates["trainable"] = bool(layer.trainable)
    if is_frozen_stats_layer(layer) is not record.frozen_stats:
        updates["frozen_stats"] = is_frozen_stats_layer(layer)
    return replace(record, **updates) if updates else record


def _from_live(live: Mapping[str, Any], walked: Mapping[str, LayerRecord]) -> Iterator[LayerRecord]:
    paths = list(live)
    for path, layer in live.items():
        parent = path.rsplit("/", 1)[0] if "/" in path else None
        has_children = any(p.startswith(path + "/") for p in paths)
        kind = _live_kind(layer, has_children)
        known = walked.get(path)
        yield LayerRecord(
            path=path,
            name=layer.name,
            class_name=type(layer).__name__,
            kind=kind,
            depth=path.count("/"),
            parent=parent,
            trainable=None if kind is LayerKind.INPUT else bool(layer.trainable),
            call_kwargs=known.call_kwargs if known is not None else (),
            config_path=known.config_path if known is not None else (),
            synchronized=bool(getattr(layer, "synchronized", False)),
            module=type(layer).__module__,
            custom=not _is_builtin(layer) and not is_frozen_stats_layer(layer),
            frozen_stats=is_frozen_stats_layer(layer),
        )


def _has_own_weights(live: LiveModel, record: LayerRecord) -> bool | None:
    layer = live.layers.get(record.path)
    if layer is None:
        return modes.has_weights_by_class(record)
    if record.kind in (LayerKind.CONTAINER, LayerKind.WRAPPER, LayerKind.INPUT):
        return False
    return bool(layer.weights)


def live_report(
    model: Any,
    *,
    path: str | None = None,
    fmt: ModelFormat = ModelFormat.MEMORY,
    optimizer_variables: int | None = None,
    runtime: Runtime | None = None,
    live: LiveModel | None = None,
) -> Report:
    """The inspect :class:`~bnfreeze.model.records.Report` of a live model.

    The same walk, rules and warnings as for a saved file; ``has_weights`` comes from the live
    layers. ``path`` defaults to ``<in-memory model 'name'>``. ``runtime`` defaults to the
    model's own (:func:`runtime_of`); its rules are applied to the live flags
    (``loaded=False``: on tf_keras a frozen container freezes what is below it in memory).
    """
    runtime = runtime_of(model) if runtime is None else runtime
    keras = _keras_of(model)
    live = live if live is not None else live_model(model)
    compiled = loading.is_compiled(model)
    compile_config = None
    if compiled:
        with contextlib.suppress(Exception):
            compile_config = model.get_compile_config()
    # Each layer's own variables, named "<path>/<variable name>", so that the same checks
    # as for a file (untrained BN statistics) read them off the live model.
    variables: dict[str, Any] = {}
    index: dict[str, tuple[str, ...]] = {}
    for record in live.records:
        layer = live.layers.get(record.path)
        if layer is None or _has_own_weights(live, record) is not True:
            continue
        names = []
        for variable in layer.weights:
            name = f"{record.path}/{variable.name}"
            variables[name] = variable
            names.append(name)
        index[record.path] = tuple(names)
    model_file = ModelFile(
        path=path or f"<in-memory model {model.name!r}>",
        format=fmt,
        config=live.config,
        keras_version=str(getattr(keras, "__version__", "")) or None,
        compiled=compiled,
        compile_config=compile_config,
        optimizer_variables=optimizer_variables,
        weights=WeightIndex(variables=index),
    )
    model_trainable = bool(model.trainable)
    states = modes.resolve(
        live.records,
        model_trainable=model_trainable,
        has_weights={r.path: _has_own_weights(live, r) for r in live.records},
        runtime=runtime,
    )
    findings = diagnostics.find(
        model_file,
        states,
        model_trainable=model_trainable,
        read_values=lambda names: {n: variables[n].numpy() for n in names if n in variables},
        runtime=runtime,
    )
    return Report(
        model=model_file,
        runtime=runtime,
        model_trainable=model_trainable,
        layers=states,
        warnings=findings,
    )


# -------------------------------------------------------------------------- editing


@dataclass(frozen=True)
class LiveEdit:
    """What :func:`edit_live` did (or would do) to a live model."""

    selected: tuple[str, ...]
    changes: tuple[Change, ...]
    flags: Flags  # every layer's flag after the edit
    trainable_set_changed: bool  # Keras's own model.trainable_variables changed
    gained_trainable: bool = False  # some variable became trainable (an optimizer built
    # before the edit does not know it: fit() raises "Unknown variable")


def trainable_ids(model: Any) -> frozenset[int]:
    """The variables ``fit()`` would hand to a new optimizer: ``model.trainable_variables``."""
    return frozenset(id(v) for v in model.trainable_variables)


def edit_live(
    live: LiveModel,
    assignment: Assignment,
    select_fn: Callable[[Sequence[LayerRecord]], Sequence[LayerRecord]],
    *,
    dry_run: bool = False,
) -> LiveEdit:
    """Apply ``assignment`` to the layers ``select_fn`` picks, on the live model.

    ``select_fn`` is a selection (:meth:`bnfreeze.ops.edit.LayerSelection.apply`). Records with
    no live layer (operations a Functional records as layers, ``keras.ops.add``, say) carry no
    flag and are skipped. With ``dry_run`` nothing is changed.
    """
    records = live.records
    selected = tuple(r for r in select_fn(records) if r.path in live.layers)
    if not selected:
        raise SelectionError(
            "the selection matches no layer whose flag can be set (only operations or inputs)."
        )
    without_flag = [
        r.path for r in records if r.path not in live.layers or r.kind is LayerKind.INPUT
    ]
    before = current_flags(records)
    after = assign(records, before, selected, assignment, without_flag=without_flag)
    changed = changes(records, before, after)
    old_ids = new_ids = trainable_ids(live.model)
    if changed and not dry_run:
        apply_flags(live, after)
        new_ids = trainable_ids(live.model)
    elif changed:
        new_ids = _trainable_ids_with(live, after)
    return LiveEdit(
        selected=tuple(r.path for r in selected),
        changes=changed,
        flags=after,
        trainable_set_changed=new_ids != old_ids,
        gained_trainable=bool(new_ids - old_ids),
    )


def apply_flags(live: LiveModel, flags: Flags) -> None:
    """Set ``flags`` on the live layers: changed containers first, outermost first (their
    setter reaches every layer below), then every leaf's own flag."""
    containers = [
        r
        for r in live.records
        if r.kind in (LayerKind.CONTAINER, LayerKind.WRAPPER) and r.path in live.layers
    ]
    for record in sorted(containers, key=lambda r: r.depth):
        value = flags.get(record.path)
        if value is not None and bool(live.layers[record.path].trainable) is not value:
            live.layers[record.path].trainable = value
    for record in live.records:
        if record.kind in (LayerKind.CONTAINER, LayerKind.WRAPPER, LayerKind.INPUT):
            continue
        value = flags.get(record.path)
        layer = live.layers.get(record.path)
        if value is not None and layer is not None:
            layer.trainable = value


def _trainable_ids_with(live: LiveModel, flags: Flags) -> frozenset[int]:
    """For a dry run: ``model.trainable_variables`` as it would be with ``flags``. Applies
    them, then puts every flag back the same way (containers, then leaves)."""
    before: Flags = {path: bool(layer.trainable) for path, layer in live.layers.items()}
    try:
        apply_flags(live, flags)
        return trainable_ids(live.model)
    finally:
        apply_flags(live, before)


def values_by_path(live: Mapping[str, Any]) -> dict[str, Any]:
    """Every leaf's own variables as numpy arrays: ``{path:index:name: value}``."""
    import numpy as np

    out: dict[str, Any] = {}
    for path, layer in live.items():
        if any(p.startswith(path + "/") for p in live):
            continue  # a container: its variables are its leaves'
        for i, variable in enumerate(layer.weights):
            out[f"{path}:{i}:{variable.name}"] = np.asarray(variable.numpy())
    return out


# -------------------------------------------------------------------------- saving


def save_format(output: str | os.PathLike[str]) -> ModelFormat:
    """The format ``model.save`` writes for ``output`` (by its ending, as Keras decides)."""
    suffix = Path(output).suffix.lower()
    if suffix not in SAVE_FORMATS:
        raise OutputError(
            f"-o {output}: Keras saves models under a name ending in .keras (or .h5 for the "
            "legacy format).",
            hint="Pick an output name ending in .keras.",
        )
    return SAVE_FORMATS[suffix]


@contextlib.contextmanager
def _optimizer_for_saving(model: Any, fmt: ModelFormat, keep: bool) -> Iterator[None]:
    """Save without optimizer variables unless ``keep``; the compile config stays.

    ``.keras``: the optimizer is detached for the save (Keras writes its compile config from
    the arguments of ``compile()``). Legacy ``.h5``: its ``training_config`` needs an
    optimizer, so an unbuilt one of the same class and settings stands in; its two counters
    are removed afterwards (:func:`bnfreeze.formats.writers.legacy_h5.strip_optimizer`).
    """
    optimizer = getattr(model, "optimizer", None)
    if keep or optimizer is None:
        yield
        return
    stand_in = None
    if fmt is ModelFormat.H5:
        stand_in = optimizer.__class__.from_config(optimizer.get_config())
    model.optimizer = stand_in
    try:
        yield
    finally:
        model.optimizer = optimizer


@dataclass(frozen=True)
class Saved:
    """What :func:`save` wrote."""

    size: int
    #: The flags recorded in the archive's ``bnfreeze.json`` because Keras does not save
    #: them; None when Keras kept every flag.
    recorded: RecordedFlags | None = None


def save(
    model: Any,
    output: str | os.PathLike[str],
    *,
    keep_optimizer: bool,
    reload: Callable[[Path], Any],
    live: LiveModel | None = None,
    progress: loading.ProgressFn = loading.no_progress,
) -> Saved:
    """Save ``model`` to ``output`` atomically.

    The file is written beside ``output``, loaded back with ``reload`` and compared with
    ``model`` (every flag and every variable, by path) before it replaces ``output``. The
    flags Keras does not save (see :func:`check_saved`) are recorded in a ``bnfreeze.json``
    member (:mod:`bnfreeze.formats.recorded_flags`), which :func:`bnfreeze.load_model` reads.
    """
    from bnfreeze.formats import recorded_flags
    from bnfreeze.formats.atomic import write_atomically

    fmt = save_format(output)
    suffix = Path(output).suffix.lower()
    live = live if live is not None else live_model(model)
    recorded: list[RecordedFlags | None] = [None]

    def produce(tmp: Path) -> None:
        scratch = tmp.with_name(tmp.name + suffix)  # Keras picks the format by the ending
        try:
            progress("saving the model")
            with _optimizer_for_saving(model, fmt, keep_optimizer):
                model.save(scratch)
            if fmt is ModelFormat.H5 and not keep_optimizer:
                from bnfreeze.formats.writers.legacy_h5 import strip_optimizer

                stripped = tmp.with_name(tmp.name + ".stripped" + suffix)
                try:
                    strip_optimizer(scratch, stripped)
                    os.replace(stripped, scratch)
                finally:
                    stripped.unlink(missing_ok=True)
            progress("loading the saved model back to check it")
            try:
                reloaded = reload(scratch)
            except BnfreezeError as exc:
                if fmt is not ModelFormat.H5:
                    raise
                # Measured: with flags set inside a custom layer, Keras's legacy .h5 writer
                # stores that layer's weights in an order its reader does not expect.
                raise OutputError(
                    f"{output}: Keras cannot load the legacy .h5 file it just wrote for this "
                    f"model ({exc.message})",
                    hint=H5_HINT,
                ) from None
            recorded[0] = check_saved(live, reloaded, str(output), fmt=fmt)
            if recorded[0] is not None:
                recorded_flags.add(scratch, recorded[0])
            os.replace(scratch, tmp)
        finally:
            scratch.unlink(missing_ok=True)

    def verify(tmp: Path) -> None:
        from bnfreeze.formats.readers import read_model

        written = read_model(tmp, weights=False)
        if written.compiled != bool(getattr(model, "compiled", False)):
            raise OutputError(f"{output}: the saved file lost or gained its compile config.")
        if recorded[0] is not None and recorded_flags.read(tmp) != recorded[0]:
            raise OutputError(f"{output}: the recorded flags did not survive the write.")

    size = write_atomically(output, produce, verify)
    return Saved(size=size, recorded=recorded[0])


def check_saved(
    live: LiveModel, reloaded: Any, output: str, *, fmt: ModelFormat = ModelFormat.KERAS
) -> RecordedFlags | None:
    """Compare a reloaded model with the edited one: every flag and every variable, by the
    path Keras saves it under (:func:`saved_paths`).

    When Keras lost flags (a layer that code builds: a keras-hub model's, a custom layer's
    sublayers, a subclassed model's), returns the :class:`RecordedFlags` that set them again,
    already applied to ``reloaded`` (for a ``.keras`` output, which can carry them); a legacy
    ``.h5`` output cannot, and is refused. Returns None when Keras kept every flag.
    """
    import numpy as np

    want_layers, got_layers = saved_paths(live.model), saved_paths(reloaded)
    if want_layers.keys() != got_layers.keys():
        raise OutputError(f"{output}: the saved model does not hold the same layers.")
    # Leaves only: a container's own flag does not decide what trains on Keras 3 (each
    # variable's layer does), and Keras drops a nested Sequential's own flag on load.
    leaves = [p for p in want_layers if not any(q.startswith(p + "/") for q in want_layers)]
    lost = [
        path
        for path in leaves
        if bool(got_layers[path].trainable) is not bool(want_layers[path].trainable)
    ]
    recorded = None
    if lost:
        shown = ", ".join(lost[:3]) + (f" and {len(lost) - 3} more" if len(lost) > 3 else "")
        if fmt is not ModelFormat.KERAS:
            raise BnfreezeError(
                f"{output}: Keras does not save the trainable flag of {shown}: the file would "
                "load with the old flag again. Keras stores only what a model's config lists, "
                f"and {type(live.model).__name__} builds these layers in code.",
                hint=H5_HINT,
            )
        recorded = record_flags(live.model)
        apply_recorded(reloaded, recorded, output)
        still = [p for p in leaves if got_layers[p].trainable != want_layers[p].trainable]
        if still:
            raise OutputError(
                f"{output}: could not set the flag of {still[0]} again after loading."
            )
    want, got = values_by_path(want_layers), values_by_path(got_layers)
    if want.keys() != got.keys():
        raise OutputError(f"{output}: the saved model does not hold the same variables.")
    for key, value in want.items():
        if value.shape != got[key].shape or not np.array_equal(value, got[key]):
            raise OutputError(
                f"{output}: Keras saved {key.rsplit(':', 2)[0]} with different values than the "
                "model holds (its legacy .h5 writer misorders weights in some nested models).",
                hint="Nothing was written. Save as .keras instead.",
            )
    return recorded


# -------------------------------------------------------------------------- recorded flags


def saved_paths(model: Any) -> dict[str, Any]:
    """Every layer below ``model`` by the path Keras saves its variables under in
    ``model.weights.h5`` (``layers/res_net_backbone/layers/batch_normalization``,
    ``layers/functional/layers/res_block/bn1``), in the order Keras walks them: a container
    before the layers it holds.

    Layer *names* cannot address these layers across a reload: Keras generates them
    (``batch_normalization_7``) and they differ from one process to the next. These paths
    are what Keras itself loads the weights by: attribute names, and class-based names by
    position in a list. The walk is Keras's own (``keras.src.saving.saving_lib``), so the
    paths are the weights file's group paths.
    """
    keras = _keras()
    try:
        from keras.src.saving import saving_lib
        from keras.src.saving.keras_saveable import KerasSaveable
        from keras.src.utils import naming
    except ImportError as exc:  # pragma: no cover - a Keras without the walk
        raise BnfreezeError(
            f"this Keras ({keras.__version__}) does not expose the saving walk bnfreeze uses to "
            f"address layers that code builds ({exc})."
        ) from None
    out: dict[str, Any] = {}
    visited: set[int] = set()

    def join(path: str, name: str) -> str:
        return f"{path}/{name}" if path else name

    def visit(obj: Any, path: str) -> None:
        if id(obj) in visited:
            return
        visited.add(id(obj))
        if path and isinstance(obj, keras.layers.Layer):
            out[path] = obj
        for attr, child in saving_lib._walk_saveable(obj):
            if isinstance(child, KerasSaveable):
                visit(child, join(path, attr))
            elif isinstance(child, (list, dict, tuple)):
                container(child, join(path, attr), set())

    def container(items: Any, path: str, seen: set[int]) -> None:
        if id(items) in seen:
            return
        seen.add(id(items))
        used: dict[str, int] = {}
        for item in list(items.values()) if isinstance(items, dict) else items:
            if isinstance(item, KerasSaveable):
                visit(item, join(path, _unique(naming.to_snake_case(type(item).__name__), used)))
            elif isinstance(item, (list, dict, tuple)):
                container(item, join(path, _unique("container", used)), seen)

    visit(model, "")
    return out


def _unique(name: str, used: dict[str, int]) -> str:
    """Keras's names for the saveables of one list: ``conv2d``, ``conv2d_1``, ..."""
    if name in used:
        used[name] += 1
        return f"{name}_{used[name]}"
    used[name] = 0
    return name


def record_flags(model: Any) -> RecordedFlags:
    """Every layer's ``trainable`` flag by saved path (:func:`saved_paths`), for the
    ``bnfreeze.json`` member. All of them, not only those Keras loses: set again in this
    order (a container before its layers), they leave each layer with its own flag."""
    keras = _keras()
    return RecordedFlags(
        flags={path: bool(layer.trainable) for path, layer in saved_paths(model).items()},
        keras_version=str(keras.__version__),
    )


def apply_recorded(model: Any, recorded: RecordedFlags, source: str) -> int:
    """Set the recorded flags on a model Keras just loaded; returns how many changed.

    A recorded path the model does not have means the file and the code that rebuilt it
    disagree: refused, with nothing changed.
    """
    layers = saved_paths(model)
    missing = [p for p in recorded.flags if p not in layers]
    if missing:
        raise ModelFormatError(
            f"{source}: its {RECORDED_MEMBER} records the trainable flag of {len(missing)} "
            f"layer(s) the loaded model does not have, such as {missing[0]!r}: the model was "
            "rebuilt by other code than the one that saved it.",
            hint="Load it with the same classes (and keras-hub version) that saved it.",
        )
    before = {path: bool(layer.trainable) for path, layer in layers.items()}
    for path, value in recorded.flags.items():
        layers[path].trainable = value
    return sum(bool(layer.trainable) is not before[path] for path, layer in layers.items())


# -------------------------------------------------------------------------- the file route


def edit(request: Any, progress: loading.ProgressFn | None = None) -> Any:
    """The Keras engine route for :func:`bnfreeze.ops.edit.run`: an
    :class:`~bnfreeze.ops.edit.EditRequest` in, an :class:`~bnfreeze.ops.edit.EditResult` out.

    Loads the model with Keras (see :func:`bnfreeze.runtime.loading.load_model`), applies the
    request's assignment to the selected live layers, and saves it (see :func:`save`). ``progress``
    defaults to a spinner or progress lines on stderr (:func:`loading.progress_on_stderr`);
    nothing goes to stdout.
    """
    if progress is None:
        with loading.progress_on_stderr() as shown:
            return edit(request, shown)
    from bnfreeze.formats.readers import read_model
    from bnfreeze.ops import edit as file_edit

    source = request.model
    out_fmt = save_format(request.output) if request.output is not None else None
    saved = read_model(source)  # bad files get the readers' errors, before TensorFlow
    loading.refuse_unsafe(saved.config, source, unsafe=request.unsafe)
    if saved.format is ModelFormat.KERAS_DIR and str(source).rstrip("/").endswith(".keras"):
        # Keras 3 opens any path ending in .keras as a zip file: IsADirectoryError.
        raise ModelFormatError(
            f"{source}: Keras 3 cannot load a folder whose name ends in .keras (it opens the "
            "path as a zip file).",
            hint="Use --engine config (the default), which edits the folder without Keras and "
            "writes a .keras file, or rename the folder.",
        )
    loading.require_runtime(Runtime.KERAS3)  # one line naming the extra, before any progress

    with loading.quiet():
        progress(loading.loading_message(Runtime.KERAS3))
        _keras()  # first, so that a --custom-objects module importing keras stays quiet too
        objects = None
        if request.custom_objects:
            objects = loading.load_custom_objects(request.custom_objects)

        def load(path: str | os.PathLike[str], compile: bool, recorded: bool = False) -> Any:
            return loading.load_model(
                path,
                unsafe=request.unsafe,
                custom_objects=objects,
                compile=compile,
                recorded_flags=recorded,
            )

        progress(f"loading {source}")
        uncompiled: str | None = None
        try:
            model = load(source, True, recorded=True)
        except BnfreezeError as exc:
            if not saved.compiled:
                raise
            # A compile config Keras 3 cannot rebuild (a Keras 2 training_config with "lr",
            # a loss it cannot deserialize) must not stop a flag edit: the model itself loads.
            model = load(source, False, recorded=True)
            uncompiled = exc.message
            progress("Keras could not rebuild the saved compile config; loaded with compile=False")
        live = live_model(model)
        done = edit_live(live, request.assignment, request.selection.apply, dry_run=request.dry_run)
        optimizer = file_edit.optimizer_decision(
            saved.optimizer_variables, done.trainable_set_changed, request.keep_optimizer_state
        )
        keep = optimizer in (file_edit.OptimizerState.UNCHANGED, file_edit.OptimizerState.KEPT)
        write = (
            not request.dry_run
            and request.output is not None
            and not (request.in_place and not done.changes)
        )
        output_bytes = None
        recorded = None
        if write:
            saved_file = save(
                model,
                request.output,
                keep_optimizer=keep,
                reload=lambda p: load(p, False),
                live=live,
                progress=progress,
            )
            output_bytes, recorded = saved_file.size, saved_file.recorded
        report = live_report(
            model,
            path=request.output if write else source,
            fmt=out_fmt if write and out_fmt is not None else saved.format,
            optimizer_variables=saved.optimizer_variables if keep else None,
            live=live_model(model),
        )
    dropped = 0
    if optimizer is file_edit.OptimizerState.DROPPED:
        dropped = saved.optimizer_variables or 0
    return file_edit.EditResult(
        source=source,
        output=request.output if write else None,
        dry_run=request.dry_run,
        engine=file_edit.Engine.KERAS,
        selected=done.selected,
        changes=done.changes,
        report=report,
        warnings=file_edit.edit_warnings(
            done.changes,
            optimizer,
            saved.optimizer_variables,
            output=request.output,
            dry_run=request.dry_run,
            loader="bnfreeze.load_model" if recorded is not None else "keras.models.load_model",
        )
        + recorded_flags_findings(recorded, request.output)
        + _uncompiled_warning(uncompiled, request.output if write else None),
        optimizer_state=optimizer,
        optimizer_variables=saved.optimizer_variables,
        optimizer_variables_dropped=dropped,
        input_bytes=_size(source),
        output_bytes=output_bytes,
        assignment=request.assignment,
    )


def recorded_flags_findings(
    recorded: RecordedFlags | None, output: str | None
) -> tuple[Finding, ...]:
    """The warning an output with recorded flags carries: load it with bnfreeze.load_model."""
    if recorded is None or output is None:
        return ()
    return (Finding(WarningCode.RECORDED_FLAGS, None, recorded_flags_message(output)),)


def recorded_flags_message(output: str) -> str:
    return (
        f"Keras does not save the trainable flags of the layers this model builds in code, so "
        f"bnfreeze recorded them in {output} ({RECORDED_MEMBER}). Load it with "
        f"bnfreeze.load_model({output!r}): it calls keras.models.load_model and sets them "
        "again. A plain keras.models.load_model ignores them: those layers load with "
        "trainable=True and train (BatchNormalization in training mode). See the README, "
        "'keras-hub and code-built models'."
    )


def _size(path: str) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def _uncompiled_warning(reason: str | None, output: str | None) -> tuple[Finding, ...]:
    """Say that the model was loaded with ``compile=False``, and what that means for OUT."""
    if reason is None:
        return ()
    saved = f"{output} is saved without a compile config" if output else "nothing is written"
    return (
        Finding(
            WarningCode.RECOMPILE_REQUIRED,
            None,
            f"Keras 3 cannot rebuild the saved compile config ({reason}), so the model was "
            f"loaded with compile=False and {saved}: call compile() with your optimizer and "
            "loss before fit().",
        ),
    )
