"""Reader for an unzipped `.keras` folder, which Keras 3 itself loads, and for folders that
are not models (a TensorFlow SavedModel, say), which get a specific error."""

from __future__ import annotations

from pathlib import Path

from bnfreeze.errors import ModelFormatError
from bnfreeze.formats.readers._keras_common import (
    CONFIG,
    METADATA,
    WEIGHTS,
    Member,
    check_model_config,
    index_member,
    keras_model_file,
    parse_json,
)
from bnfreeze.limits import MAX_CONFIG_BYTES
from bnfreeze.model.records import ModelFile, ModelFormat, WeightIndex


def _read_bounded(path: Path, source: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ModelFormatError(
                f"{source}: {path.name} is larger than the {MAX_CONFIG_BYTES // 2**20} MiB "
                "bnfreeze reads."
            )
        return path.read_bytes()
    except ModelFormatError:
        raise
    except OSError as exc:
        raise ModelFormatError(
            f"{source}: {path.name} cannot be read ({exc.strerror or exc})."
        ) from None


def read(path: Path, *, weights: bool = True) -> ModelFile:
    source = str(path)
    if (path / "saved_model.pb").exists() or (path / "saved_model.pbtxt").exists():
        raise ModelFormatError(
            f"{path}: a TensorFlow SavedModel folder, which Keras 3 cannot load as a model.",
            hint="Keras 3's TFSMLayer can wrap it for inference only (it resets trainable "
            "flags); to fine-tune, re-save the original Keras model with model.save('x.keras').",
        )
    if not (path / CONFIG).is_file():
        raise ModelFormatError(
            f"{path}: a directory, not a model.",
            hint="Pass a .keras or .h5 file, or an unzipped .keras folder with config.json.",
        )
    raw = _read_bounded(path / CONFIG, source)
    config = check_model_config(parse_json(raw, source, CONFIG), source)
    metadata = None
    if (path / METADATA).is_file():
        metadata = parse_json(_read_bounded(path / METADATA, source), source, METADATA)
    found, optimizer_variables = index(path) if weights else (None, None)
    return keras_model_file(
        source, ModelFormat.KERAS_DIR, config, metadata, found, optimizer_variables
    )


def index(path: Path) -> tuple[WeightIndex | None, int | None]:
    """Index the folder's ``model.weights.h5``, if it has one (see
    :func:`bnfreeze.formats.readers.with_weights`)."""
    weights_file = path / WEIGHTS
    if not weights_file.is_file():
        return None, None
    source = str(path)
    try:
        size = weights_file.stat().st_size
    except OSError as exc:
        reason = exc.strerror or exc
        raise ModelFormatError(f"{source}: {WEIGHTS} cannot be read ({reason}).") from None
    return index_member(Member(str(weights_file), 0, size), source)
