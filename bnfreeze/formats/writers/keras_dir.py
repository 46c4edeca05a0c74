"""Writer for an unzipped `.keras` folder: the result is a `.keras` zip archive.

A folder in, a `.keras` file out: the format ``model.save("x.keras")`` writes and every Keras
3 tool loads, with the folder's members (``metadata.json``, ``config.json``,
``model.weights.h5``, ``assets/...``) stored uncompressed, as Keras stores them. Only
``config.json`` is new; every other file is copied byte for byte, except that
``model.weights.h5`` loses its top-level optimizer group when the edit drops the optimizer
state (as :mod:`bnfreeze.formats.writers.keras_zip` does). The input folder is never touched.
"""

from __future__ import annotations

import contextlib
import zipfile
import zlib
from pathlib import Path

from bnfreeze.errors import OutputError
from bnfreeze.formats.atomic import scratch_file
from bnfreeze.formats.readers._keras_common import CONFIG, METADATA, WEIGHTS
from bnfreeze.formats.writers import WriteOutcome, WriteRequest, verify_config_bytes
from bnfreeze.formats.writers.keras_zip import drop_optimizer, serialize_config
from bnfreeze.formats.writers.weights_check import OPTIMIZER_GROUP, compare_weights
from bnfreeze.model.records import ModelFormat

#: The order Keras 3's ``saving_lib`` writes its members in.
_FIRST = (METADATA, CONFIG, WEIGHTS)


def _members(folder: Path) -> list[str]:
    """The folder's files as archive member names, in Keras's order, then the rest sorted."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return [m for m in _FIRST if m in files] + [m for m in files if m not in _FIRST]


class KerasDirWriter:
    """Writes an edited unzipped `.keras` folder as a `.keras` archive."""

    format = ModelFormat.KERAS_DIR

    def prepare(self, request: WriteRequest) -> None:
        verify_config_bytes(request, serialize_config(request.config))

    def write(self, request: WriteRequest, dest: Path) -> WriteOutcome:
        import h5py

        folder = Path(request.model.path)
        dropped = 0
        with contextlib.ExitStack() as stack:
            weights: Path = folder / WEIGHTS
            if request.drop_optimizer_state and weights.is_file():
                rewritten = stack.enter_context(scratch_file(dest.parent, "model.weights.h5"))
                with h5py.File(weights, "r") as h5_in:
                    dropped = drop_optimizer(h5_in, rewritten)
                weights = rewritten
            with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED, allowZip64=True) as zout:
                for member in _members(folder):
                    if member == CONFIG:
                        zout.writestr(CONFIG, serialize_config(request.config))
                    elif member == WEIGHTS:
                        zout.write(weights, WEIGHTS)
                    else:
                        zout.write(folder / member, member)
        return WriteOutcome(optimizer_variables_dropped=dropped)

    def verify(self, request: WriteRequest, written: Path) -> None:
        import h5py

        self.prepare(request)
        folder = Path(request.model.path)
        where = f"the file written for {folder}"
        rewritten = request.drop_optimizer_state and (folder / WEIGHTS).is_file()
        with zipfile.ZipFile(written) as zout:
            if zout.namelist() != _members(folder):
                raise OutputError(f"{where} does not hold the folder's files.")
            if zout.read(CONFIG) != serialize_config(request.config):
                raise OutputError(f"{where}: config.json does not read back as written.")
            for info in zout.infolist():
                if info.filename == CONFIG or (rewritten and info.filename == WEIGHTS):
                    continue
                if (info.CRC, info.file_size) != _crc(folder / info.filename):
                    raise OutputError(f"{where}: {info.filename} was not copied exactly.")
            if rewritten:
                with contextlib.ExitStack() as stack:
                    tmp = stack.enter_context(scratch_file(written.parent, "verify.weights.h5"))
                    with zout.open(WEIGHTS) as src, open(tmp, "wb") as dst:
                        while chunk := src.read(_CHUNK):
                            dst.write(chunk)
                    h5_in = stack.enter_context(h5py.File(folder / WEIGHTS, "r"))
                    h5_out = stack.enter_context(h5py.File(tmp, "r"))
                    if OPTIMIZER_GROUP in h5_out:
                        raise OutputError(f"{where}: the optimizer state was not dropped.")
                    compare_weights(h5_in, h5_out, where)


_CHUNK = 1 << 20


def _crc(path: Path) -> tuple[int, int]:
    crc, size = 0, 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return crc, size


WRITER = KerasDirWriter()
