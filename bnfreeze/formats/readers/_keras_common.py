"""What the `.keras` zip and the unzipped `.keras` folder share: the same three members."""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from typing import IO, Any

from bnfreeze.errors import ModelFormatError
from bnfreeze.formats.readers.self_contained import refusal, refuse_outside
from bnfreeze.limits import MAX_CONFIG_BYTES, MAX_JSON_DEPTH, json_depth_exceeds
from bnfreeze.model.records import ModelFile, ModelFormat, WeightIndex

CONFIG = "config.json"
METADATA = "metadata.json"
WEIGHTS = "model.weights.h5"

# Groups below a layer's weights group that hold a wrapped layer, not the layer's own state.
_INNER_LAYER_GROUPS = ("layer", "forward_layer", "backward_layer")


def parse_json(raw: bytes, source: str, member: str) -> Any:
    """Parse a JSON member, turning every way it can be broken into one clear error."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise ModelFormatError(
            f"{source}: {member} is larger than the {MAX_CONFIG_BYTES // 2**20} MiB "
            "bnfreeze reads.",
            hint="The file is probably corrupt or not a Keras model.",
        )
    if json_depth_exceeds(raw):
        raise ModelFormatError(
            f"{source}: {member} nests more than {MAX_JSON_DEPTH} levels deep; no Keras model "
            "config does.",
            hint="The file is probably corrupt or crafted.",
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


def keras_hub_version(metadata: Any) -> str | None:
    if isinstance(metadata, dict) and isinstance(metadata.get("keras_hub_version"), str):
        return metadata["keras_hub_version"]
    return None


def keras_model_file(
    source: str,
    fmt: ModelFormat,
    config: dict[str, Any],
    metadata: Any,
    index: WeightIndex | None,
    optimizer_variables: int | None,
) -> ModelFile:
    """The :class:`ModelFile` of a `.keras` archive or folder (the same three members)."""
    # Keras writes "compile_config": {} for a model that was never compiled.
    compile_config = config.get("compile_config")
    if not isinstance(compile_config, dict) or not compile_config:
        compile_config = None
    if index is not None:
        index = as_keras_loads_it(index, config, keras_version(metadata))
    return ModelFile(
        path=source,
        format=fmt,
        config=config,
        keras_version=keras_version(metadata),
        compiled=compile_config is not None,
        compile_config=compile_config,
        optimizer_variables=optimizer_variables,
        weights=index,
        keras_hub_version=keras_hub_version(metadata),
    )


def as_keras_loads_it(
    index: WeightIndex, config: dict[str, Any], version: str | None
) -> WeightIndex:
    """``index`` keyed by the layers the way the Keras that wrote the file (``version``) maps
    weights to them: by position for Keras 3.0 to 3.5 (:func:`by_position`)."""
    return by_position(index, config) if _names_groups_by_position(version) else index


def _names_groups_by_position(version: str | None) -> bool:
    """Keras 3.0 to 3.5 record no layer name in ``model.weights.h5`` (its ``vars`` groups have
    no ``name`` attribute, added in 3.6): a layer's group is named only by its class and its
    position in the layer list."""
    match = re.match(r"^3\.(\d+)\.", version or "")
    return match is not None and int(match.group(1)) <= 5


def _snake_case(name: str) -> str:
    """``keras.src.utils.naming.to_snake_case``, which names the groups."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def by_position(index: WeightIndex, config: dict[str, Any]) -> WeightIndex:
    """The index of a Keras 3.0-3.5 weights file keyed by layer path, as those versions load
    it: ``saving_lib._save_container_state`` names the groups of a layer list by the snake_case
    class name of each layer in ``model.layers`` order, ``_1``, ``_2``... for repeats (a
    Sequential's list leaves out its InputLayer), and loads them back by the same walk.
    Groups the config does not list (layers that code builds) keep their own keys."""
    mapping: dict[str, str] = {}

    def visit(node: Any, key_prefix: str, path_prefix: str, depth: int) -> None:
        inner = node.get("config") if isinstance(node, dict) else None
        layers = inner.get("layers") if isinstance(inner, dict) else None
        if not isinstance(layers, list) or depth > 64:
            return
        sequential = node.get("class_name") == "Sequential"
        used: dict[str, int] = {}
        for layer in layers:
            if not isinstance(layer, dict) or not isinstance(layer.get("class_name"), str):
                continue
            if sequential and layer["class_name"] == "InputLayer":
                continue
            key = _snake_case(layer["class_name"])
            if key in used:
                used[key] += 1
                key = f"{key}_{used[key]}"
            else:
                used[key] = 0
            layer_config = layer.get("config")
            name = layer_config.get("name") if isinstance(layer_config, dict) else None
            if not isinstance(name, str):
                continue
            mapping[key_prefix + key] = path_prefix + name
            visit(layer, f"{key_prefix}{key}/", f"{path_prefix}{name}/", depth + 1)

    visit(config, "", "", 0)
    if not mapping:
        return index
    variables = {mapping.get(key, key): datasets for key, datasets in index.variables.items()}
    return WeightIndex(variables=variables, locations=index.locations, names=index.names)


@dataclass(frozen=True)
class Member:
    """Where a ``model.weights.h5`` is: ``size`` bytes at ``start`` of ``file`` (a stored,
    uncompressed zip member, or a whole file in an unzipped ``.keras`` folder)."""

    file: str
    start: int
    size: int


class MemberFile(io.RawIOBase):
    """A seekable, read-only file object bounded to a :class:`Member`, for h5py.

    ``zipfile``'s own member objects re-read the member from its start on every backward
    seek, and HDF5 seeks backwards all the time; this one reads with ``os.pread``.
    """

    def __init__(self, fd: int, member: Member) -> None:
        super().__init__()
        self._fd, self._start, self._size, self._pos = fd, member.start, member.size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise OSError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        data = os.pread(self._fd, n, self._start + self._pos) if n else b""
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


def index_member(member: Member, source: str) -> tuple[WeightIndex, int | None]:
    """Index the ``model.weights.h5`` at ``member`` (see :func:`index_weights`).

    A small pure-Python HDF5 reader does it when it can, without importing h5py or numpy, and
    records where each dataset's bytes are so :func:`bnfreeze.formats.readers.read_values` can
    read BN statistics directly. Files it does not understand go to h5py, so the result is the
    same either way.
    """
    from bnfreeze.formats.readers import _hdf5

    try:
        with open(member.file, "rb") as fh:
            try:
                found = _hdf5.index_keras_weights(
                    _hdf5.ByteSource(fh.fileno(), member.start, member.size)
                )
            except _hdf5.Malformed as exc:  # cyclic or bloated: h5py's walk would not end
                raise ModelFormatError(
                    f"{source}: {WEIGHTS} is a damaged HDF5 file ({exc})."
                ) from None
            except _hdf5.OutsideReference as exc:  # h5py would open the other file
                raise refusal(source, WEIGHTS, exc.where, exc.what) from None
            except Exception:  # Unsupported, or a damaged file: h5py decides
                if member.start == 0 and os.fstat(fh.fileno()).st_size == member.size:
                    return index_weights(member.file, source)  # a whole file (a folder's)
                return index_weights(MemberFile(fh.fileno(), member), source)
    except OSError as exc:
        reason = exc.strerror or exc
        raise ModelFormatError(f"{source}: {WEIGHTS} cannot be read ({reason}).") from None
    index = WeightIndex(variables=found.variables, locations=found.datasets, names=found.names)
    return index, found.optimizer_variables


def index_weights(
    fileobj: IO[bytes] | io.RawIOBase | str, source: str
) -> tuple[WeightIndex, int | None]:
    """Index a Keras 3 ``model.weights.h5`` with h5py: each layer path's variable datasets.

    Returns the index and the number of saved optimizer variables (None when the file holds
    no optimizer state). Reads HDF5 metadata only.

    A file object is first copied, streaming, to a temporary file that h5py opens by name.
    When h5py fails to open a *Python file object* (a damaged file), HDF5 keeps the file
    driver's settings until the process exits, and freeing them then crashes the interpreter
    (SIGSEGV in h5py's fileobj driver, after ``main`` returned: exit 139 instead of 2). Only
    files the pure-Python reader cannot index come here, so the copy is rare.
    """
    if isinstance(fileobj, str):
        return _index_weights_file(fileobj, source)
    import shutil
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(prefix="bnfreeze-weights-", suffix=".h5") as tmp:
            shutil.copyfileobj(fileobj, tmp, 1 << 20)
            tmp.flush()
            return _index_weights_file(tmp.name, source)
    except OSError as exc:
        raise ModelFormatError(
            f"{source}: {WEIGHTS} cannot be read ({exc.strerror or exc})."
        ) from None


def _index_weights_file(path: str, source: str) -> tuple[WeightIndex, int | None]:
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            refuse_outside(h5, source, WEIGHTS)
            variables: dict[str, tuple[str, ...]] = {}
            names: dict[str, str] = {}
            _index_layers(h5, "", variables, names)
            for key in sorted(h5, key=_natural):  # a subclassed model's attribute layers
                child = h5[key]
                if key not in ("layers", "vars", "optimizer") and isinstance(child, h5py.Group):
                    _index_layer(child, _group_name(child, key), variables, names)
            opt = h5.get("optimizer/vars")
            optimizer_variables = (len(opt) or None) if isinstance(opt, h5py.Group) else None
    except ModelFormatError:
        raise
    except Exception as exc:  # h5py raises OSError, KeyError, ValueError, RuntimeError...
        raise ModelFormatError(
            f"{source}: {WEIGHTS} is not a readable HDF5 file ({exc})."
        ) from None
    return WeightIndex(variables=variables, names=names), optimizer_variables


def _group_name(group: Any, fallback: str) -> str:
    vars_group = group.get("vars")
    name = vars_group.attrs.get("name") if vars_group is not None else None
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return name if isinstance(name, str) and name else fallback


def _datasets(group: Any, skip: tuple[str, ...], names: dict[str, str]) -> list[str]:
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
                if key != "vars":
                    name = _group_name(child, "")
                    if name:
                        names[child.name] = name
                visit(child)

    visit(group)
    return found


def _natural(key: str) -> tuple[int, int | str]:
    return (0, int(key)) if key.isdigit() else (1, key)


def _index_layers(
    group: Any, prefix: str, out: dict[str, tuple[str, ...]], names: dict[str, str]
) -> None:
    layers = group.get("layers")
    if layers is None:
        return
    for key in layers:
        child = layers[key]
        _index_layer(child, prefix + _group_name(child, key), out, names)


def _index_layer(
    group: Any, path: str, out: dict[str, tuple[str, ...]], names: dict[str, str]
) -> None:
    own = _datasets(group, ("layers", *_INNER_LAYER_GROUPS), names)
    out[path] = tuple(own)
    _index_layers(group, path + "/", out, names)
    for inner in _INNER_LAYER_GROUPS:
        sub = group.get(inner)
        if sub is not None:
            _index_layer(sub, f"{path}/{_group_name(sub, inner)}", out, names)
