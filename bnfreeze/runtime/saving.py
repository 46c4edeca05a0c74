"""Saving a live model through Keras, checked: :func:`save` writes atomically, loads the
file back and compares it with the model before it replaces the output.

The optimizer (docs/semantics.md, rules 4-5). Loading a compiled model builds its optimizer;
saving it again writes that optimizer's slot variables, zero-filled when the file had none,
which tripled a ResNet50 file (103 MB -> 308 MB, measured). So the model is saved **without
optimizer variables** unless the input's saved state is still valid (the set of trainable
variables did not change) or the user keeps it (``--optimizer-state keep``). The compile
config is kept either way, so Keras compiles the loaded model with a fresh optimizer, as it
does for any compiled model saved before its first ``fit()``.

Keras does not store the flags of layers a model builds in code: a keras-hub backbone's or
task's, a custom layer's sublayers, a subclassed model's (measured: ``bn.trainable=False``
there loads back as True). For a ``.keras`` output, every flag is then recorded in the
archive's ``bnfreeze.json`` (:mod:`bnfreeze.formats.recorded_flags`), by the path Keras saves
each layer under (:func:`saved_paths`); :func:`apply_recorded` sets them again after
``keras.models.load_model``. A legacy ``.h5`` output cannot carry them and is refused.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnfreeze.errors import BnfreezeError, ModelFormatError, OutputError
from bnfreeze.formats.recorded_flags import MEMBER as RECORDED_MEMBER
from bnfreeze.formats.recorded_flags import RecordedFlags
from bnfreeze.model.records import Finding, ModelFormat, Runtime, WarningCode
from bnfreeze.runtime import environment
from bnfreeze.runtime.live import LiveModel, live_model

#: Output endings Keras 3 ``model.save`` understands, and the format each one writes.
SAVE_FORMATS: dict[str, ModelFormat] = {
    ".keras": ModelFormat.KERAS,
    ".h5": ModelFormat.H5,
    ".hdf5": ModelFormat.H5,
}


#: What to do when a legacy .h5 output cannot hold the edit.
H5_HINT = (
    "Nothing was written. Save as .keras instead (-o model.keras): for the layers a model "
    "builds in code, bnfreeze records their flags in it, and bnfreeze.load_model('model.keras') "
    "sets them again after loading."
)


def _keras() -> Any:
    return environment.keras_module(Runtime.KERAS3)


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
    progress: environment.ProgressFn = environment.no_progress,
) -> Saved:
    """Save ``model`` to ``output`` atomically.

    The file is written beside ``output``, loaded back with ``reload`` and compared with
    ``model`` (every flag and every variable, by path) before it replaces ``output``. The
    flags Keras does not save (see :func:`check_saved`) are recorded in a ``bnfreeze.json``
    member (:mod:`bnfreeze.formats.recorded_flags`), which :func:`bnfreeze.load_model` reads.
    """
    from bnfreeze.formats.atomic import atomic_file

    fmt = save_format(output)
    live = live if live is not None else live_model(model)
    with atomic_file(output) as tmp:
        recorded = _save_checked(model, tmp, output, fmt, keep_optimizer, reload, live, progress)
        _verify_saved(model, tmp, output, recorded)
    return Saved(size=Path(output).stat().st_size, recorded=recorded)


def _save_checked(
    model: Any,
    tmp: Path,
    output: str | os.PathLike[str],
    fmt: ModelFormat,
    keep_optimizer: bool,
    reload: Callable[[Path], Any],
    live: LiveModel,
    progress: environment.ProgressFn,
) -> RecordedFlags | None:
    """Save ``model`` at ``tmp`` through Keras, load it back and compare; return the flags
    recorded in it (None when Keras kept every flag)."""
    from bnfreeze.formats import recorded_flags

    suffix = Path(output).suffix.lower()
    scratch = tmp.with_name(tmp.name + suffix)  # Keras picks the format by the ending
    try:
        progress("saving the model")
        with _optimizer_for_saving(model, fmt, keep_optimizer):
            model.save(scratch)
        if fmt is ModelFormat.H5 and not keep_optimizer:
            _strip_optimizer(scratch, tmp.with_name(tmp.name + ".stripped" + suffix))
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
        recorded = check_saved(live, reloaded, str(output), fmt=fmt)
        if recorded is not None:
            recorded_flags.add(scratch, recorded)
        os.replace(scratch, tmp)
    finally:
        scratch.unlink(missing_ok=True)
    return recorded


def _strip_optimizer(saved: Path, stripped: Path) -> None:
    from bnfreeze.formats.writers.legacy_h5 import strip_optimizer

    try:
        strip_optimizer(saved, stripped)
        os.replace(stripped, saved)
    finally:
        stripped.unlink(missing_ok=True)


def _verify_saved(
    model: Any, tmp: Path, output: str | os.PathLike[str], recorded: RecordedFlags | None
) -> None:
    from bnfreeze.formats import recorded_flags
    from bnfreeze.formats.readers import read_model

    written = read_model(tmp, weights=False)
    if written.compiled != bool(getattr(model, "compiled", False)):
        raise OutputError(f"{output}: the saved file lost or gained its compile config.")
    if recorded is not None and recorded_flags.read(tmp) != recorded:
        raise OutputError(f"{output}: the recorded flags did not survive the write.")


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
