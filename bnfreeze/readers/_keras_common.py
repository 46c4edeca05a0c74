"""What the `.keras` zip and the unzipped `.keras` folder share: the same three members."""

from __future__ import annotations

import json
from typing import IO, Any

from bnfreeze.errors import ModelFormatError
from bnfreeze.limits import MAX_CONFIG_BYTES
from bnfreeze.records import WeightIndex

CONFIG = "config.json"
METADATA = "metadata.json"
WEIGHTS = "model.weights.h5"

# Groups below a layer's weights group that hold a wrapped layer, not the layer's own state.
_INNER_LAYER_GROUPS = ("layer", "forward_layer", "backward_layer")


def parse_json(raw: bytes, source: str, member: str) -> Any:
    """Parse a JSON member, turning every way it can be broken into one clear error."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise ModelFormatError(
            f"{source}: {member} is larger than the {MAX_CONFIG_BYTES // 2**20} MiB bnfreeze reads.",
            hint="The file is probably corrupt or not a Keras model.",
        )
    try:
        return json.loads(raw)
    except RecursionError:
        raise ModelFormatError(
            f"{source}: {member} is nested too deeply to be a Keras model config."
        ) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelFormatError(f"{source}: {member} is not valid JSON ({exc}).") from None


def check_model_config(config: Any, source: str, member: str = CONFIG) -> dict[str, Any]:
    """The top-level config must be a layer dict: ``{"class_name": ..., "config": {...}}``."""
    if not isinstance(config, dict) or not isinstance(config.get("class_name"), str):
        raise ModelFormatError(
            f"{source}: {member} does not describe a Keras model (no top-level class_name)."
        )
    if not isinstance(config.get("config"), dict):
        raise ModelFormatError(
            f"{source}: {member} does not describe a Keras model (its 'config' is not an object)."
        )
    return config


def keras_version(metadata: Any) -> str | None:
    if isinstance(metadata, dict) and isinstance(metadata.get("keras_version"), str):
        return metadata["keras_version"]
    return None


def index_weights(fileobj: IO[bytes] | str, source: str) -> tuple[WeightIndex, int | None]:
    """Index a Keras 3 ``model.weights.h5``: each layer path's variable datasets.

    Returns the index and the number of saved optimizer variables (None when the file holds
    no optimizer state). Reads HDF5 metadata only.
    """
    import h5py

    try:
        with h5py.File(fileobj, "r") as h5:
            variables: dict[str, tuple[str, ...]] = {}
            _index_layers(h5, "", variables)
            opt = h5.get("optimizer/vars")
            optimizer_variables = len(opt) if isinstance(opt, h5py.Group) else None
    except ModelFormatError:
        raise
    except Exception as exc:  # h5py raises OSError, KeyError, ValueError, RuntimeError...
        raise ModelFormatError(f"{source}: {WEIGHTS} is not a readable HDF5 file ({exc}).") from None
    return WeightIndex(variables=variables), optimizer_variables


def _group_name(group: Any, fallback: str) -> str:
    vars_group = group.get("vars")
    name = vars_group.attrs.get("name") if vars_group is not None else None
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return name if isinstance(name, str) and name else fallback


def _datasets(group: Any, skip: tuple[str, ...]) -> list[str]:
    import h5py

    found: list[str] = []

    def visit(g: Any) -> None:
        for key in sorted(g, key=_natural):
            if key in skip and g is group:
                continue
            child = g[key]
            if isinstance(child, h5py.Dataset):
                found.append(child.name)
            else:
                visit(child)

    visit(group)
    return found


def _natural(key: str) -> tuple[int, int | str]:
    return (0, int(key)) if key.isdigit() else (1, key)


def _index_layers(group: Any, prefix: str, out: dict[str, tuple[str, ...]]) -> None:
    layers = group.get("layers")
    if layers is None:
        return
    for key in layers:
        child = layers[key]
        _index_layer(child, prefix + _group_name(child, key), out)


def _index_layer(group: Any, path: str, out: dict[str, tuple[str, ...]]) -> None:
    own = _datasets(group, skip=("layers", *_INNER_LAYER_GROUPS))
    out[path] = tuple(own)
    _index_layers(group, path + "/", out)
    for inner in _INNER_LAYER_GROUPS:
        sub = group.get(inner)
        if sub is not None:
            _index_layer(sub, f"{path}/{_group_name(sub, inner)}", out)
