"""Reader for legacy HDF5 models (``model.save('x.h5')``): the architecture is the JSON root
attribute ``model_config``; a compiled model also has ``training_config`` and an
``optimizer_weights`` group. Weights live under ``model_weights/<top-level layer>`` in the order
of each group's ``weight_names`` attribute (see docs/semantics.md, rule 6, for why that order
matters)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bnfreeze.errors import ModelFormatError
from bnfreeze.formats.readers._keras_common import check_model_config, parse_json
from bnfreeze.model.records import ModelFile, ModelFormat, WeightIndex


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    return None


def names(value: Any) -> list[str]:
    """An HDF5 string-array attribute as a list of str."""
    if value is None:
        return []
    return [_text(v) or str(v) for v in list(value)]


def layer_path_of(group: str, weight_name: str) -> str:
    """The layer path a ``weight_names`` entry of top-level group ``group`` belongs to."""
    layer = weight_name.rsplit("/", 1)[0] if "/" in weight_name else group
    if layer == group or layer.startswith(group + "/"):
        return layer
    return f"{group}/{layer}"


def read(path: Path, *, weights: bool = True) -> ModelFile:
    with _opened(path) as h5:
        return _read_open(h5, path, str(path), weights)


def index(path: Path) -> WeightIndex | None:
    """Index the weights of a file already read with ``weights=False`` (see
    :func:`bnfreeze.formats.readers.with_weights`)."""
    with _opened(path) as h5:
        return _index(h5)


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """The open HDF5 file; h5py's failures, opening it or reading it, become
    :class:`ModelFormatError`."""
    import h5py

    try:
        h5 = h5py.File(path, "r")
    except Exception as exc:
        raise ModelFormatError(
            f"{path}: a damaged or truncated HDF5 file ({exc}).",
            hint="Re-save the model, or restore it from a backup.",
        ) from None
    try:
        with h5:
            yield h5
    except ModelFormatError:
        raise
    except Exception as exc:
        raise ModelFormatError(f"{path}: a damaged HDF5 file ({exc}).") from None


def _read_open(h5: Any, path: Path, source: str, weights: bool) -> ModelFile:
    raw = h5.attrs.get("model_config")
    if raw is None:
        if ("layers" in h5 and "vars" in h5) or "layer_names" in h5.attrs:
            raise ModelFormatError(
                f"{path}: a weights-only file (saved with save_weights), with no architecture.",
                hint="Load it into the model in Python and save a full model with "
                "model.save('x.keras'), or use the bnfreeze Python API on the in-memory model.",
            )
        raise ModelFormatError(
            f"{path}: an HDF5 file without a Keras model_config attribute, not a Keras model."
        )
    text = _text(raw)
    if text is None:
        raise ModelFormatError(f"{path}: its model_config attribute is not text.")
    parsed = parse_json(text.encode("utf-8"), source, "model_config")
    config = check_model_config(parsed, source, "model_config")
    training_raw = _text(h5.attrs.get("training_config"))
    training_config = None
    if training_raw is not None:
        parsed = parse_json(training_raw.encode("utf-8"), source, "training_config")
        training_config = parsed if isinstance(parsed, dict) else None
    optimizer_variables = None
    opt = h5.get("optimizer_weights")
    if isinstance(opt, h5py_group_type()):
        optimizer_variables = _attribute_length(opt, "weight_names")
    index = _index(h5) if weights else None
    return ModelFile(
        path=source,
        format=ModelFormat.H5,
        config=config,
        keras_version=_text(h5.attrs.get("keras_version")),
        compiled=training_config is not None,
        compile_config=training_config,
        optimizer_variables=optimizer_variables,
        weights=index,
    )


def _attribute_length(obj: Any, name: str) -> int:
    """How many entries an array attribute has, from its dataspace: its values are not read.
    (A damaged variable-length string can make HDF5 allocate gigabytes while reading it.)"""
    if name not in obj.attrs:
        return 0
    shape = obj.attrs.get_id(name).shape
    return int(shape[0]) if shape else 1


def h5py_group_type() -> type:
    import h5py

    return h5py.Group


def _index(h5: Any) -> WeightIndex | None:
    root = h5.get("model_weights")
    if root is None:
        return None
    variables: dict[str, list[str]] = {}
    for group in names(root.attrs.get("layer_names")):
        variables.setdefault(group, [])
        layer_group = root.get(group)
        if layer_group is None:
            continue
        for weight_name in names(layer_group.attrs.get("weight_names")):
            variables.setdefault(layer_path_of(group, weight_name), []).append(
                f"/model_weights/{group}/{weight_name}"
            )
    return WeightIndex(variables={k: tuple(v) for k, v in variables.items()})
