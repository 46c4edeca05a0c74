"""Checksums of every weight dataset in a saved model, for ``bnfreeze diff``.

Each dataset is hashed (BLAKE2b) over its dtype, its shape and its raw values, read in slices
of at most :data:`SLICE_BYTES` so memory stays flat however large a layer is. Datasets are
keyed by their HDF5 path, which is the same for a model and its re-flagged copy. Optimizer
state (``optimizer/`` in a ``.keras`` weights file, ``optimizer_weights/`` in a legacy
``.h5``) is kept apart: it is not the model's weights, and freezing drops it on purpose.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnfreeze.errors import ModelFormatError
from bnfreeze.model.records import ModelFile, ModelFormat

#: At most this many bytes of one dataset are in memory at a time.
SLICE_BYTES = 8 * 2**20

#: Top-level HDF5 groups that hold optimizer state, not model weights.
OPTIMIZER_GROUPS = ("optimizer", "optimizer_weights")


@dataclass(frozen=True)
class Checksums:
    """``weights``: model weight dataset path -> hex digest; ``optimizer``: the same for
    optimizer state."""

    weights: dict[str, str]
    optimizer: dict[str, str]


@contextmanager
def open_weights(model: ModelFile) -> Iterator[Any]:
    """The model's weights as an open ``h5py.File`` (read-only)."""
    import h5py

    if model.format is ModelFormat.KERAS:
        # h5py never opens the zip member as a Python file object: when that fails (a damaged
        # member), HDF5 keeps the driver's state until exit and the interpreter crashes there
        # (SIGSEGV, see bnfreeze.formats.readers._keras_common.index_weights). The member is copied,
        # streaming, to a temporary file opened by name; diff reads every byte of it anyway.
        with (
            zipfile.ZipFile(model.path) as archive,
            archive.open("model.weights.h5") as fh,
            tempfile.NamedTemporaryFile(prefix="bnfreeze-weights-", suffix=".h5") as tmp,
        ):
            shutil.copyfileobj(fh, tmp, 1 << 20)
            tmp.flush()
            with h5py.File(tmp.name, "r") as h5:
                yield h5
    elif model.format is ModelFormat.KERAS_DIR:
        with h5py.File(Path(model.path) / "model.weights.h5", "r") as h5:
            yield h5
    elif model.format is ModelFormat.H5:
        with h5py.File(model.path, "r") as h5:
            yield h5
    else:
        raise ModelFormatError(f"{model.path}: no weights file to read.")


def dataset_digest(dataset: Any) -> str:
    """BLAKE2b over dtype, shape and the values, streamed along the first axis."""
    import numpy as np

    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{dataset.dtype.str}{dataset.shape}".encode())
    shape = dataset.shape
    if shape is None:  # a null dataspace
        return digest.hexdigest()
    if len(shape) == 0 or dataset.size == 0:
        digest.update(np.ascontiguousarray(dataset[()]).tobytes())
        return digest.hexdigest()
    row_bytes = max(1, dataset.dtype.itemsize * (dataset.size // shape[0]))
    step = max(1, SLICE_BYTES // row_bytes)
    for start in range(0, shape[0], step):
        digest.update(np.ascontiguousarray(dataset[start : start + step]).tobytes())
    return digest.hexdigest()


def checksums(model: ModelFile) -> Checksums:
    """Hash every dataset of the model's weights file. Raises :class:`ModelFormatError` when
    the weights cannot be read."""
    import h5py

    weights: dict[str, str] = {}
    optimizer: dict[str, str] = {}

    def hash_all(h5: Any, prefix: str) -> None:
        def visit(name: str, obj: Any) -> None:
            if not isinstance(obj, h5py.Dataset):
                return
            top = name.split("/", 1)[0]
            target = optimizer if top in OPTIMIZER_GROUPS else weights
            target[prefix + "/" + name] = dataset_digest(obj)

        h5.visititems(visit)

    try:
        with open_weights(model) as h5:
            hash_all(h5, "")
        if model.preset_task is not None:  # the task's own layers, as the index names them
            from bnfreeze.formats.readers.keras_dir import TASK_GROUP, TASK_WEIGHTS

            head = Path(model.path) / TASK_WEIGHTS
            if head.is_file():
                with h5py.File(head, "r") as h5:
                    hash_all(h5, TASK_GROUP)
    except ModelFormatError:
        raise
    except KeyError:
        raise ModelFormatError(f"{model.path}: has no model.weights.h5 to compare.") from None
    except Exception as exc:  # h5py raises OSError, ValueError, RuntimeError...
        raise ModelFormatError(f"{model.path}: its weights cannot be read ({exc}).") from None
    return Checksums(weights=weights, optimizer=optimizer)
