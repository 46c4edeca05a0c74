"""``bnfreeze recalibrate``: re-estimate a saved model's BatchNormalization moving statistics
from data, and write a copy that differs from the input only there.

The model is loaded with Keras (``compile=False``) and recalibrated in memory
(:mod:`bnfreeze.runtime.recalibrate`). The output is then **not** saved by Keras: it is the
input ``.keras`` archive copied member by member, raw, with the bytes of each recalibrated
``moving_mean`` / ``moving_variance`` dataset overwritten in place in ``model.weights.h5``
(same offsets, same size). Every other byte of every member is the input's; the weights
member's CRC-32 is worked out from the patches. The copy is written atomically and verified
(each patched dataset reads back the new values, every other member is the input's) before it
replaces anything: an interrupted run (Ctrl-C) leaves nothing written.

Data: a ``.npy`` array, one array of a ``.npz`` (``--key``; optional when it holds one), or a
folder of images read by ``keras.utils.image_dataset_from_directory`` (no labels, sorted file
order, resized to the model's input size), fed to the model as it is.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnfreeze.errors import DataError, ModelFormatError, OutputError

SCHEMA_VERSION = 1
WEIGHTS = "model.weights.h5"


@dataclass(frozen=True)
class RecalibrateRequest:
    """What ``bnfreeze recalibrate`` was asked to do."""

    model: str
    output: str | None
    data: str
    key: str | None = None
    batch_size: int = 32
    batches: int | None = None
    layers: tuple[str, ...] = ()
    up_to: str | None = None
    from_layer: str | None = None
    in_place: bool = False
    dry_run: bool = False
    custom_objects: str | None = None
    unsafe: bool = False


@dataclass(frozen=True)
class LayerStatistics:
    """One recalibrated layer: how many calls its new statistics average, and the largest
    change of any value of its moving mean and moving variance."""

    path: str
    calls: int
    mean_change: float
    variance_change: float


@dataclass(frozen=True)
class RecalibrateResult:
    source: str
    output: str | None
    dry_run: bool
    data: str
    layers: tuple[LayerStatistics, ...]
    not_called: tuple[str, ...]
    batches: int
    samples: int
    patched_datasets: int
    input_bytes: int
    output_bytes: int | None


# -- data --------------------------------------------------------------------------------------


def read_data(spec: str, key: str | None, model: Any, batch_size: int) -> Any:
    """The data named on the command line: an array, or a dataset of image batches."""
    import numpy as np

    p = Path(spec)
    if p.is_dir():
        return _image_folder(p, model, batch_size)
    if not p.is_file():
        raise DataError(f"--data {p}: no such file or folder.")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            if key is not None:
                raise DataError(f"--key applies to .npz archives; {p} is a .npy array.")
            return np.load(p, mmap_mode="r", allow_pickle=False)
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as archive:
                names = list(archive.files)
                if key is None:
                    if len(names) != 1:
                        raise DataError(
                            f"--data {p} holds {len(names)} arrays ({', '.join(names[:5])}); "
                            "name the inputs with --key."
                        )
                    key = names[0]
                if key not in names:
                    raise DataError(
                        f"--key {key!r}: {p} holds no such array (it holds {', '.join(names[:5])})."
                    )
                return archive[key]
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"--data {p}: not a readable NumPy file ({type(exc).__name__}).") from None
    raise DataError(f"--data {p}: give a .npy or .npz file, or a folder of images.")


def _image_folder(folder: Path, model: Any, batch_size: int) -> Any:
    import keras

    shape = getattr(model, "input_shape", None)
    if isinstance(shape, list):
        shape = shape[0]
    size = (256, 256)
    if isinstance(shape, tuple) and len(shape) == 4 and shape[1] and shape[2]:
        size = (int(shape[1]), int(shape[2]))
    try:
        dataset = keras.utils.image_dataset_from_directory(
            os.fspath(folder),
            labels=None,
            batch_size=batch_size,
            image_size=size,
            shuffle=False,
            verbose=False,
        )
    except Exception as exc:
        raise DataError(f"--data {folder}: cannot read images ({_short(exc)}).") from None
    return dataset


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- where each statistic is stored -------------------------------------------------------------


def _dataset_of(group: str, layer: Any, variable: Any) -> str:
    """Keras saves a layer's ``_trainable_variables + _non_trainable_variables`` as
    ``<group>/vars/0..N`` (``Layer.save_own_variables``)."""
    every = list(layer._trainable_variables) + list(layer._non_trainable_variables)
    for i, v in enumerate(every):
        if v is variable:
            return f"/{group}/vars/{i}"
    raise ModelFormatError(f"cannot find where {variable.path} is saved.")


def _patches(
    path: Path, info: zipfile.ZipInfo, targets: dict[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """One :class:`Patch` per dataset in ``targets`` (dataset path -> new value array)."""
    import numpy as np

    from bnfreeze.formats.readers import _hdf5
    from bnfreeze.formats.readers.keras_zip import stored_member
    from bnfreeze.formats.writers._hdf5_edit import Patch

    if info.compress_type != zipfile.ZIP_STORED:
        raise ModelFormatError(f"{path}: {WEIGHTS} is compressed; bnfreeze patches stored ones.")
    member = stored_member(path, info)
    out = []
    infos = {}
    with open(path, "rb") as fh:
        try:
            index = _hdf5.index_keras_weights(
                _hdf5.ByteSource(fh.fileno(), member.start, member.size)
            )
        except _hdf5.Unsupported as exc:
            raise ModelFormatError(f"{path}: {WEIGHTS} cannot be indexed ({exc}).") from None
        for dataset, value in targets.items():
            pending = index.datasets.get(dataset)
            found = pending.info() if pending is not None else None
            if found is None or found.offset is None or found.inline is not None:
                raise ModelFormatError(
                    f"{path}: {dataset} is not stored as contiguous data bnfreeze can patch."
                )
            dtype = np.dtype(found.typecode).newbyteorder(">" if found.big_endian else "<")
            new = np.ascontiguousarray(value, dtype=dtype).tobytes()
            if len(new) != found.nbytes or tuple(found.shape or ()) != tuple(np.shape(value)):
                raise ModelFormatError(f"{path}: {dataset} does not match the loaded variable.")
            offset = found.offset - member.start
            old = os.pread(fh.fileno(), found.nbytes, found.offset)
            out.append(Patch(offset, old, new))
            infos[dataset] = (found, dtype)
    return out, infos


# -- the command ---------------------------------------------------------------------------------


ProgressFn = Callable[[int, int | None, int], None]


def recalibrate_file(
    request: RecalibrateRequest,
    progress: ProgressFn | None = None,
    status: Callable[[str], None] | None = None,
) -> RecalibrateResult:
    """Carry out ``request`` (see the module doc)."""
    import numpy as np

    from bnfreeze.runtime import environment, loading
    from bnfreeze.runtime import recalibrate as runtime

    source = Path(request.model)
    output = _checked_output(request, source)
    if status:
        status("loading the model with Keras")
    with environment.quiet():
        model = loading.load_model(
            source, unsafe=request.unsafe, custom_objects=request.custom_objects, compile=False
        )
    data = read_data(request.data, request.key, model, request.batch_size)
    selected = runtime.select_batchnorm(
        model, request.layers, up_to=request.up_to, from_=request.from_layer
    )
    before = {
        p: (np.array(layer.moving_mean.numpy()), np.array(layer.moving_variance.numpy()))
        for p, layer in selected.items()
    }
    if status:
        status("running the batches")
    with environment.quiet():
        done = runtime.recalibrate(
            model,
            data,
            batch_size=request.batch_size,
            batches=request.batches,
            layers=request.layers,
            up_to=request.up_to,
            from_=request.from_layer,
            progress=progress,
        )
    stats, targets = _new_statistics(model, selected, before, done.layers)
    infos, weights_info = _members(source)
    patches, located = _patches(source, weights_info, targets)
    input_bytes = source.stat().st_size
    output_bytes = None
    if output is not None and not request.dry_run:
        if status:
            status("writing")
        output_bytes = _write(source, output, infos, weights_info, patches, targets, located)
    return RecalibrateResult(
        source=str(source),
        output=None if request.dry_run else output,
        dry_run=request.dry_run,
        data=request.data,
        layers=tuple(stats),
        not_called=done.not_called,
        batches=done.batches,
        samples=done.samples,
        patched_datasets=len(patches),
        input_bytes=input_bytes,
        output_bytes=output_bytes,
    )


def _members(source: Path) -> tuple[list[zipfile.ZipInfo], zipfile.ZipInfo]:
    """The archive's members, and its ``model.weights.h5``."""
    with zipfile.ZipFile(source) as archive:
        infos = archive.infolist()
    weights_info = next((i for i in infos if i.filename == WEIGHTS), None)
    if weights_info is None:
        raise ModelFormatError(f"{source}: the archive has no {WEIGHTS}.")
    return infos, weights_info


def _checked_output(request: RecalibrateRequest, source: Path) -> str | None:
    """Where the result goes (None: nowhere, a dry run), refused before any work when the
    options contradict each other, the input is not a ``.keras`` archive or the output cannot
    be written."""
    from bnfreeze.formats.readers import read_model
    from bnfreeze.model.records import ModelFormat
    from bnfreeze.ops.frozen_stats import check_keras_output

    output = request.model if request.in_place else request.output
    if output is None and not request.dry_run:
        raise OutputError("give -o OUTPUT, --in-place or --dry-run.")
    if request.in_place and request.output is not None:
        raise OutputError("--in-place and -o contradict each other; pick one.")
    model_file = read_model(source, weights=False)
    if model_file.format is not ModelFormat.KERAS:
        raise ModelFormatError(
            f"{source}: recalibrate writes .keras archives; this is a {model_file.format.value} "
            "model.",
            hint="Save it as .keras first (keras.models.load_model, then model.save).",
        )
    if output is not None:
        check_keras_output(source, Path(output), request.in_place)
    return output


def _new_statistics(
    model: Any, selected: dict[str, Any], before: dict[str, Any], layers: Any
) -> tuple[list[LayerStatistics], dict[str, Any]]:
    """How far each recalibrated layer's statistics moved, and the new value of each
    weights dataset to patch (its path in ``model.weights.h5`` -> the array)."""
    import numpy as np

    from bnfreeze.runtime.saving import saved_paths

    stats = []
    targets: dict[str, Any] = {}
    groups = {id(layer): group for group, layer in saved_paths(model).items()}
    for entry in layers:
        layer = selected[entry.path]
        mean, var = np.asarray(layer.moving_mean.numpy()), np.asarray(layer.moving_variance.numpy())
        old_mean, old_var = before[entry.path]
        stats.append(
            LayerStatistics(
                entry.path,
                entry.calls,
                float(np.max(np.abs(mean - old_mean))) if mean.size else 0.0,
                float(np.max(np.abs(var - old_var))) if var.size else 0.0,
            )
        )
        group = groups.get(id(layer))
        if group is None:
            raise ModelFormatError(f"cannot find where layer {entry.path} is saved.")
        targets[_dataset_of(group, layer, layer.moving_mean)] = mean
        targets[_dataset_of(group, layer, layer.moving_variance)] = var
    return stats, targets


def _write(
    source: Path,
    output: str,
    infos: list[zipfile.ZipInfo],
    weights_info: zipfile.ZipInfo,
    patches: list[Any],
    targets: dict[str, Any],
    located: dict[str, Any],
) -> int:
    """Copy ``source`` to ``output`` atomically, ``model.weights.h5`` patched, verified
    before it replaces anything; the size written."""
    from bnfreeze.formats.atomic import write_atomically
    from bnfreeze.formats.writers._hdf5_edit import Rewrite
    from bnfreeze.formats.writers.keras_zip import copy_patched, copy_raw

    plan = Rewrite(
        copy_bytes=weights_info.file_size,
        patches=tuple(patches),
        tail=(),
        size=weights_info.file_size,
        headers=(),
    )

    def produce(tmp: Path) -> None:
        with open(source, "rb") as src, zipfile.ZipFile(tmp, "w") as zout:
            for info in infos:
                if info.filename == WEIGHTS:
                    copy_patched(src, info, zout, plan)
                else:
                    copy_raw(src, info, zout)

    def verify(tmp: Path) -> None:
        _verify(source, tmp, infos, targets, located)

    return write_atomically(output, produce, verify)


def _verify(
    source: Path,
    written: Path,
    infos: list[zipfile.ZipInfo],
    targets: dict[str, Any],
    located: dict[str, Any],
) -> None:
    """Every member but the weights byte-identical (CRC-32 and size as the input's, read back
    by zipfile's own check); each patched dataset reads back its new value; the weights member
    the input's size."""
    import numpy as np

    from bnfreeze.formats.readers import _hdf5
    from bnfreeze.formats.readers.keras_zip import stored_member

    where = f"the written copy of {source}"
    with zipfile.ZipFile(written) as out:
        got = {i.filename: i for i in out.infolist()}
        if [i.filename for i in infos] != list(got):
            raise OutputError(f"{where} does not hold the input's members.")
        for info in infos:
            new = got[info.filename]
            if info.filename == WEIGHTS:
                if new.file_size != info.file_size:
                    raise OutputError(f"{where}: {WEIGHTS} changed size.")
                continue
            if (new.CRC, new.file_size, new.compress_type) != (
                info.CRC,
                info.file_size,
                info.compress_type,
            ):
                raise OutputError(f"{where}: {info.filename} differs from the input.")
        if out.testzip() is not None:
            raise OutputError(f"{where} fails its CRC check.")
        member = stored_member(written, got[WEIGHTS])
    with open(written, "rb") as fh:
        index = _hdf5.index_keras_weights(_hdf5.ByteSource(fh.fileno(), member.start, member.size))
        for dataset, value in targets.items():
            pending = index.datasets.get(dataset)
            found = pending.info() if pending is not None else None
            if found is None or found.offset is None:
                raise OutputError(f"{where}: {dataset} cannot be read back.")
            _, dtype = located[dataset]
            raw = os.pread(fh.fileno(), found.nbytes, found.offset)
            if raw != np.ascontiguousarray(value, dtype=dtype).tobytes():
                raise OutputError(f"{where}: {dataset} does not hold the new statistics.")
