"""Reader for the Keras 3 `.keras` zip archive (config.json, metadata.json, model.weights.h5)."""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

from bnfreeze.errors import ModelFormatError
from bnfreeze.formats.readers._keras_common import (
    CONFIG,
    METADATA,
    WEIGHTS,
    Member,
    check_model_config,
    index_member,
    index_weights,
    keras_model_file,
    parse_json,
)
from bnfreeze.limits import MAX_CONFIG_BYTES, MAX_EXPANSION_RATIO
from bnfreeze.model.records import ModelFile, ModelFormat, WeightIndex


def open_archive(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ModelFormatError(
            f"{path}: a damaged or truncated zip archive ({exc}).",
            hint="Re-save the model, or restore it from a backup.",
        ) from None
    except OSError as exc:
        raise ModelFormatError(f"{path}: cannot be read ({exc.strerror or exc}).") from None


def read_member(archive: zipfile.ZipFile, path: Path, member: str, limit: int) -> bytes:
    """Read one member, refusing oversized or bomb-like members before inflating them."""
    info = archive.getinfo(member)
    if info.file_size > limit:
        raise ModelFormatError(
            f"{path}: {member} claims {info.file_size} bytes, more than the "
            f"{limit // 2**20} MiB bnfreeze reads."
        )
    check_ratio(info, path, member)
    try:
        with archive.open(member) as fh:
            # At most what the archive claims (already within ``limit``): a member whose data
            # inflates past its claim costs no more than the claim.
            data = fh.read(info.file_size + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise ModelFormatError(f"{path}: {member} is damaged ({exc}).") from None
    except Exception as exc:  # zlib.error and friends
        raise ModelFormatError(f"{path}: {member} is damaged ({exc}).") from None
    if len(data) > limit:
        raise ModelFormatError(f"{path}: {member} is larger than it claims; refusing it.")
    return data


def check_ratio(info: zipfile.ZipInfo, path: Path, member: str) -> None:
    """Refuse a member over 1 MiB that claims to inflate more than MAX_EXPANSION_RATIO times."""
    ratio = info.file_size / info.compress_size if info.compress_size else 0
    if ratio > MAX_EXPANSION_RATIO and info.file_size > 2**20:
        raise ModelFormatError(
            f"{path}: {member} expands {int(ratio)}x, "
            "more than a model file does; refusing it as a possible zip bomb."
        )


def stored_member(path: Path, info: zipfile.ZipInfo) -> Member:
    """Where a stored (uncompressed) member's bytes start in the archive file.

    The central directory gives the local header's offset; the data follows the local header,
    whose name and extra field lengths may differ from the central directory's.
    """
    try:
        with open(path, "rb") as fh:
            fh.seek(info.header_offset)
            header = fh.read(30)
            file_size = os.fstat(fh.fileno()).st_size
            if len(header) < 30 or not header.startswith(b"PK\x03\x04"):
                raise ModelFormatError(f"{path}: {info.filename} is damaged (bad local header).")
            (flags,) = struct.unpack_from("<H", header, 6)
            name_len, extra_len = struct.unpack_from("<HH", header, 26)
            name = fh.read(name_len).decode("utf-8" if flags & 0x800 else "cp437", "replace")
    except OSError as exc:
        raise ModelFormatError(f"{path}: cannot be read ({exc.strerror or exc}).") from None
    if info.flag_bits & 0x1:
        raise ModelFormatError(f"{path}: {info.filename} is encrypted; bnfreeze cannot read it.")
    if name != info.orig_filename:  # zipfile's own check when it opens a member
        raise ModelFormatError(
            f"{path}: {info.filename} is damaged (its local header names {name!r})."
        )
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > file_size:
        raise ModelFormatError(
            f"{path}: {info.filename} is damaged (it extends past the end of the archive)."
        )
    return Member(str(path), start, info.file_size)


def read(path: Path, *, weights: bool = True) -> ModelFile:
    with open_archive(path) as archive:
        names = set(archive.namelist())
        if CONFIG not in names:
            if any(n.endswith("saved_model.pb") for n in names):
                what = "a zipped TensorFlow SavedModel"
            else:
                what = "a zip archive without config.json"
            raise ModelFormatError(
                f"{path}: {what}, not a Keras model.",
                hint="bnfreeze reads models saved with model.save('x.keras').",
            )
        source = str(path)
        config = check_model_config(
            parse_json(read_member(archive, path, CONFIG, MAX_CONFIG_BYTES), source, CONFIG),
            source,
        )
        metadata = None
        if METADATA in names:
            metadata = parse_json(
                read_member(archive, path, METADATA, MAX_CONFIG_BYTES), source, METADATA
            )
        index, optimizer_variables = _index(archive, path) if weights else (None, None)
    return keras_model_file(source, ModelFormat.KERAS, config, metadata, index, optimizer_variables)


def config_may_hold(path: Path, text: bytes) -> bool:
    """Whether the archive's ``config.json`` may hold ``text`` (ASCII): False only when its
    bytes do not contain it and escape nothing, so that a caller can skip parsing and walking
    a config of megabytes; True when the file cannot be read this way (not a regular file:
    opening a FIFO would block)."""
    if not path.is_file():
        return True
    try:
        with open_archive(path) as archive:
            raw = read_member(archive, path, CONFIG, MAX_CONFIG_BYTES)
    except (ModelFormatError, KeyError):
        return True
    return text in raw or b"\\u" in raw


def index(path: Path) -> tuple[WeightIndex | None, int | None]:
    """Index the weights of an archive already read with ``weights=False`` (see
    :func:`bnfreeze.formats.readers.with_weights`)."""
    with open_archive(path) as archive:
        return _index(archive, path)


def _index(archive: zipfile.ZipFile, path: Path) -> tuple[WeightIndex | None, int | None]:
    if WEIGHTS not in archive.namelist():
        return None, None
    source = str(path)
    info = archive.getinfo(WEIGHTS)
    if info.compress_type != zipfile.ZIP_STORED:
        # Not what Keras writes. Inflated a piece at a time to a temporary file that h5py
        # opens by name: memory stays flat whatever the member's size or ratio.
        import tempfile

        from bnfreeze.formats.integrity import inflate_to

        check_ratio(info, path, WEIGHTS)
        with tempfile.NamedTemporaryFile(prefix="bnfreeze-weights-", suffix=".h5") as tmp:
            inflate_to(archive, info, tmp, source, 2**40)
            tmp.flush()
            return index_weights(tmp.name, source)
    # Stored, as Keras writes it: read it in place, at its offset in the archive.
    return index_member(stored_member(path, info), source)
