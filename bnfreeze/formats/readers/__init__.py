"""Readers: turn a path into a :class:`~bnfreeze.model.records.ModelFile`.

One module per format, one entry point here. Reading never imports TensorFlow or Keras: a
`.keras` archive is a zip of JSON and HDF5, and a legacy `.h5` keeps its architecture as a
JSON attribute. Anything that is not a model bnfreeze can read raises
:class:`~bnfreeze.errors.ModelFormatError` with a sentence that says what the file is and what
to do.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from bnfreeze.errors import ModelFormatError
from bnfreeze.model.records import ModelFile

ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def read_model(path: str | os.PathLike[str], *, weights: bool = True) -> ModelFile:
    """Read a saved model's architecture and metadata, without Keras.

    With ``weights=True`` the weights file's layout is indexed too (HDF5 metadata only, no
    values), so callers can tell which layers hold variables and read BN statistics.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ModelFormatError(f"{p}: no such file.", hint="Check the path.") from None
    except PermissionError:
        raise ModelFormatError(f"{p}: permission denied.") from None
    except OSError as exc:  # a symlink loop, a name too long, ...
        raise ModelFormatError(f"{p}: cannot be opened ({exc.strerror or exc}).") from None

    if stat.S_ISDIR(st.st_mode):
        from bnfreeze.formats.readers import keras_dir

        return keras_dir.read(p, weights=weights)
    if not stat.S_ISREG(st.st_mode):
        raise ModelFormatError(f"{p}: not a regular file.")
    if st.st_size == 0:
        raise ModelFormatError(
            f"{p}: the file is empty.", hint="It may have been interrupted while saving."
        )
    try:
        with open(p, "rb") as fh:
            head = fh.read(8)
    except PermissionError:
        raise ModelFormatError(f"{p}: permission denied.") from None
    except OSError as exc:
        raise ModelFormatError(f"{p}: cannot be read ({exc.strerror or exc}).") from None

    if head.startswith(ZIP_MAGIC) or head.startswith(EMPTY_ZIP_MAGIC):
        from bnfreeze.formats.readers import keras_zip

        return keras_zip.read(p, weights=weights)
    if head == HDF5_MAGIC:
        from bnfreeze.formats.readers import legacy_h5

        return legacy_h5.read(p, weights=weights)
    # Bytes before the model, as Keras accepts them: an HDF5 user block (the superblock at
    # 512, 1024, 2048, ... bytes) or data before a zip archive (zipfile finds the archive from
    # its end, as keras.models.load_model does).
    if hdf5_superblock_offset(p, st.st_size):
        from bnfreeze.formats.readers import legacy_h5

        return legacy_h5.read(p, weights=weights)
    if _zip_from_its_end(p):
        from bnfreeze.formats.readers import keras_zip

        return keras_zip.read(p, weights=weights)
    raise ModelFormatError(
        f"{p}: not a Keras model file (neither a .keras zip archive nor an HDF5 file).",
        hint="bnfreeze reads models saved with model.save('x.keras') or model.save('x.h5').",
    )


def hdf5_superblock_offset(path: Path, size: int) -> int:
    """Where the HDF5 superblock is, when the file starts with a user block: HDF5 looks for
    its signature at 0, 512, 1024, 2048, ... (powers of two); 0 when it is not found past 0."""
    at = 512
    try:
        with open(path, "rb") as fh:
            while at + 8 <= size:
                if os.pread(fh.fileno(), 8, at) == HDF5_MAGIC:
                    return at
                at *= 2
    except OSError:
        return 0
    return 0


def _zip_from_its_end(path: Path) -> bool:
    import zipfile

    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def with_weights(model: ModelFile) -> ModelFile:
    """``model``, read with ``weights=False``, with its weights file indexed: what
    ``read_model(model.path)`` returns. A model that already has its index is returned as is.
    """
    from dataclasses import replace

    from bnfreeze.model.records import ModelFormat

    if model.weights is not None:
        return model
    if model.format in (ModelFormat.KERAS, ModelFormat.KERAS_DIR):
        from bnfreeze.formats.readers import keras_dir, keras_zip
        from bnfreeze.formats.readers._keras_common import as_keras_loads_it

        if model.format is ModelFormat.KERAS:
            index, optimizer_variables = keras_zip.index(Path(model.path))
        else:  # a task preset's index covers task.weights.h5 too
            task = model.config if model.preset_task is not None else None
            index, optimizer_variables = keras_dir.index(Path(model.path), task)
        # Files from Keras 3.0 to 3.5 name their weights' groups by position only.
        if index is not None:
            index = as_keras_loads_it(index, model.config, model.keras_version)
        return replace(model, weights=index, optimizer_variables=optimizer_variables)
    if model.format is ModelFormat.H5:
        from bnfreeze.formats.readers import legacy_h5

        # The optimizer variables are counted by read(..., weights=False) already.
        return replace(model, weights=legacy_h5.index(Path(model.path)))
    return read_model(model.path)


def read_values(model: ModelFile, datasets: list[str]) -> dict[str, object]:
    """Read the values of the named HDF5 datasets from the model's weights.

    Each value is array-like. Where the reader recorded where a dataset's bytes are
    (``WeightIndex.locations``) it is a flat ``collections.abc.Sequence`` of Python numbers in
    C order (``readers._hdf5.Numbers``), read without h5py or numpy; otherwise it is the numpy
    array h5py returns. ``numpy.asarray`` accepts both. Datasets that are missing or
    unreadable are left out; callers treat them as unknown.
    """
    if not datasets:
        return {}
    found: dict[str, object] = {}
    locations = model.weights.locations if model.weights is not None else {}
    if locations:
        for weights_file, names in _by_file(model, datasets):
            found.update(_read_located(weights_file, locations, names))
        datasets = [name for name in datasets if name not in found]
        if not datasets:
            return found
    found.update(_read_values_h5py(model, datasets))
    return found


def _read_located(weights_file: str, locations: dict[str, Any], names: list[str]) -> dict:
    """The named datasets of ``weights_file``, read where the index located them; nothing
    when the file cannot be read."""
    from bnfreeze.formats.readers import _hdf5

    try:
        with open(weights_file, "rb") as fh:
            fd = fh.fileno()
            return dict(_hdf5.read_datasets(locations, names, lambda at, n: os.pread(fd, n, at)))
    except Exception:
        return {}


def _by_file(model: ModelFile, datasets: list[str]) -> list[tuple[str, list[str]]]:
    """Which file holds each dataset: the model file, or in a folder ``model.weights.h5``,
    and for a task preset ``task.weights.h5`` for the datasets named below its group."""
    from bnfreeze.model.records import ModelFormat

    if model.format is not ModelFormat.KERAS_DIR:
        return [(model.path, datasets)]
    from bnfreeze.formats.readers.keras_dir import TASK_GROUP, TASK_WEIGHTS

    folder = Path(model.path)
    head = [d for d in datasets if d.startswith(TASK_GROUP + "/")]
    rest = [d for d in datasets if not d.startswith(TASK_GROUP + "/")]
    return [
        (str(folder / name), group)
        for name, group in (("model.weights.h5", rest), (TASK_WEIGHTS, head))
        if group
    ]


def read_shapes(model: ModelFile, datasets: list[str]) -> dict[str, tuple[int, ...]]:
    """The shapes of the named HDF5 datasets of the model's weights, from HDF5 metadata only
    (no values are read). Missing or unreadable datasets are left out."""
    if not datasets:
        return {}
    found: dict[str, tuple[int, ...]] = {}
    locations = model.weights.locations if model.weights is not None else {}
    for name in datasets:
        pending = locations.get(name)
        info = pending.info() if pending is not None else None
        if info is not None and info.shape is not None:
            found[name] = tuple(info.shape)
    rest = [name for name in datasets if name not in found]
    if rest:
        found.update(_read_values_h5py(model, rest, shapes=True))  # type: ignore[arg-type]
    return found


def _read_values_h5py(
    model: ModelFile, datasets: list[str], *, shapes: bool = False
) -> dict[str, object]:
    import h5py

    from bnfreeze.model.records import ModelFormat

    def pull(h5: h5py.File, names: list[str] = datasets, strip: int = 0) -> dict[str, object]:
        out: dict[str, object] = {}
        for name in names:
            try:
                obj = h5.get(name[strip:])
                if isinstance(obj, h5py.Dataset):
                    out[name] = tuple(obj.shape) if shapes else _numbers(obj)
                    if out[name] is None:
                        del out[name]  # not numbers: unknown
            except Exception:  # a damaged dataset: unknown, not fatal for inspection
                continue
        return out

    try:
        if model.format is ModelFormat.KERAS:
            import zipfile

            from bnfreeze.formats.readers._keras_common import MemberFile
            from bnfreeze.formats.readers.keras_zip import stored_member

            with zipfile.ZipFile(model.path) as archive:
                info = archive.getinfo("model.weights.h5")
                if info.compress_type != zipfile.ZIP_STORED:
                    with archive.open(info) as fh, h5py.File(fh, "r") as h5:
                        return pull(h5)
            member = stored_member(Path(model.path), info)
            with (
                open(member.file, "rb") as raw,
                h5py.File(MemberFile(raw.fileno(), member), "r") as h5,
            ):
                return pull(h5)
        if model.format is ModelFormat.KERAS_DIR:
            from bnfreeze.formats.readers.keras_dir import TASK_GROUP

            out: dict[str, object] = {}
            for weights_file, names in _by_file(model, datasets):
                strip = len(TASK_GROUP) if weights_file.endswith(TASK_GROUP) else 0
                with h5py.File(weights_file, "r") as h5:
                    out.update(pull(h5, names, strip))
            return out
        if model.format is ModelFormat.H5:
            with h5py.File(model.path, "r") as h5:
                return pull(h5)
    except Exception:
        return {}
    return {}


def _numbers(dataset: Any) -> Any:
    """A dataset's values as numbers, or None when they are not numbers. Keras stores
    ``bfloat16`` as a 2-byte opaque type with a ``dtype`` attribute: those are widened to
    float32 (they are its top half); other opaque types (float8, ...) are left out."""
    import numpy as np

    raw = dataset[()]
    kind = getattr(raw, "dtype", np.dtype(type(raw))).kind
    if kind in "biuf":
        return raw
    tag = dataset.attrs.get("dtype")
    tag = tag.decode() if isinstance(tag, bytes) else tag
    if kind == "V" and dataset.dtype.itemsize == 2 and tag == "bfloat16":
        wide = np.frombuffer(np.ascontiguousarray(raw).tobytes(), "<u2").astype("<u4") << 16
        return wide.view("<f4").reshape(np.shape(raw))
    return None
