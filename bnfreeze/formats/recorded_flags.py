"""The ``bnfreeze.json`` member of a ``.keras`` archive: trainable flags Keras does not save.

Keras saves a layer's ``trainable`` flag only where its config lists the layer. A keras-hub
backbone or task saves constructor arguments, a custom layer does not list the layers it holds
as attributes (``self.bn1 = BatchNormalization()``), and a subclassed model lists none: on
load, ``__init__`` builds those layers again and every one of them reads ``trainable=True``
(README, "keras-hub and code-built models").

When ``--engine keras`` (or ``bnfreeze.freeze(model, output=...)``) saves such a model, it
records the flags Keras lost in one extra archive member, ``bnfreeze.json``::

    {"format": "bnfreeze-recorded-flags", "version": 1, "keras_version": "3.15.1",
     "flags": {"layers/res_net_backbone/layers/batch_normalization": false, ...}}

Keys are the paths Keras itself stores the layers' variables under in ``model.weights.h5``
(its group paths: attribute names and class-based names, never the layer names Keras
generates, which differ from one process to the next). :func:`bnfreeze.load_model` loads the
archive with ``keras.models.load_model`` and sets these flags again. Keras ignores the
member: the archive loads, with no warning, like the one Keras wrote; but a plain
``keras.models.load_model`` then gives the layers ``trainable=True`` again.

This module reads and writes the member without Keras; :mod:`bnfreeze.runtime.saving`
computes the paths on a live model.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnfreeze.errors import ModelFormatError

#: The archive member that holds the recorded flags.
MEMBER = "bnfreeze.json"
FORMAT = "bnfreeze-recorded-flags"
VERSION = 1
#: Far more than any model's layer paths need; a larger member is refused as damaged.
MAX_MEMBER_BYTES = 16 * 2**20


@dataclass(frozen=True)
class RecordedFlags:
    """The ``trainable`` flags a saved model needs set again after ``keras.models.load_model``:
    saved variable path -> flag, in model order."""

    flags: dict[str, bool]
    keras_version: str | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "keras_version": self.keras_version,
                "flags": self.flags,
            },
            indent=1,
        )


def parse(raw: bytes, source: str) -> RecordedFlags:
    """Parse a ``bnfreeze.json`` member; anything else is a :class:`ModelFormatError`."""
    if len(raw) > MAX_MEMBER_BYTES:
        raise ModelFormatError(f"{source}: {MEMBER} is larger than any bnfreeze writes.")
    try:
        data: Any = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelFormatError(f"{source}: {MEMBER} is not valid JSON ({exc}).") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelFormatError(f"{source}: {MEMBER} is not a bnfreeze recorded-flags member.")
    if data.get("version") != VERSION:
        raise ModelFormatError(
            f"{source}: {MEMBER} has version {data.get('version')!r}; this bnfreeze reads "
            f"version {VERSION}.",
            hint="Upgrade bnfreeze to load this file.",
        )
    flags = data.get("flags")
    if not isinstance(flags, dict) or not all(
        isinstance(k, str) and isinstance(v, bool) for k, v in flags.items()
    ):
        raise ModelFormatError(f"{source}: {MEMBER} 'flags' is not a map of path to true/false.")
    version = data.get("keras_version")
    return RecordedFlags(
        flags=dict(flags), keras_version=version if isinstance(version, str) else None
    )


def read(path: str | os.PathLike[str]) -> RecordedFlags | None:
    """The recorded flags of the model at ``path``, or None when it has none (it is not a
    ``.keras`` archive, or bnfreeze did not record any)."""
    p = Path(path)
    if not p.is_file() or not zipfile.is_zipfile(p):
        return None
    with zipfile.ZipFile(p) as archive:
        try:
            info = archive.getinfo(MEMBER)
        except KeyError:
            return None
        if info.file_size > MAX_MEMBER_BYTES:
            raise ModelFormatError(f"{path}: {MEMBER} is larger than any bnfreeze writes.")
        try:
            raw = archive.read(info)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise ModelFormatError(f"{path}: {MEMBER} is damaged ({exc}).") from None
    return parse(raw, os.fspath(path))


def has_member(path: str | os.PathLike[str]) -> bool:
    """Whether the archive at ``path`` holds a ``bnfreeze.json`` member (reads only the zip's
    directory)."""
    p = Path(path)
    if not p.is_file() or not zipfile.is_zipfile(p):
        return False
    with zipfile.ZipFile(p) as archive:
        return MEMBER in archive.namelist()


def add(archive_path: str | os.PathLike[str], recorded: RecordedFlags) -> None:
    """Append the member to a ``.keras`` archive that has none (one Keras just wrote), stored
    uncompressed like Keras's own members."""
    with zipfile.ZipFile(archive_path, "a", compression=zipfile.ZIP_STORED) as archive:
        if MEMBER in archive.namelist():
            raise ModelFormatError(f"{archive_path}: already holds a {MEMBER} member.")
        archive.writestr(MEMBER, recorded.to_json())
