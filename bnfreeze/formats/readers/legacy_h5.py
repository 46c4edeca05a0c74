"""Reader for legacy HDF5 models (``model.save('x.h5')``): the architecture is the JSON root
attribute ``model_config``; a compiled model also has ``training_config`` and an
``optimizer_weights`` group. Weights live under ``model_weights/<top-level layer>`` in the order
of each group's ``weight_names`` attribute (see docs/semantics.md, rule 6, for why that order
matters)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bnfreeze.errors import BnfreezeError, ModelFormatError
from bnfreeze.formats.readers._keras_common import check_model_config, parse_json
from bnfreeze.formats.readers.self_contained import refuse_outside
from bnfreeze.model.records import LayerRecord, ModelFile, ModelFormat, WeightIndex


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


class WeightOwners:
    """Finds the layer a ``weight_names`` entry of one top-level group belongs to.

    ``candidates`` are the group's own record and every record below it. The schemes found in
    files, each measured or taken from a real file:

    * ``bn/gamma:0``, ``group/inner/kernel:0``: the path itself, or the path below the group;
    * ``deep/kernel:0`` in group ``mid`` for layer ``mid/inner/deep`` (tf_keras leaves out
      the nested model's name), ``bn_bn/bn1/gamma`` (Keras 3 names a variable after the name
      scope it was built in), ``lstm/lstm_cell/kernel`` (an inner cell): the layer whose path
      ends with the longest prefix of the scope, which must be unique;
    * ``seq/dense/kernel:0``: the same after leading names that are no layer (a model-name
      prefix);
    * ``bil/forward_lstm/lstm_cell/kernel:0``: Bidirectional names its two copies of the
      wrapped layer ``forward_<name>`` and ``backward_<name>``; both are the config's
      ``layer`` unless it records a ``backward_layer``;
    * ``batch_normalization_1_1/gamma:0`` in group ``batch_normalization_1`` (Keras 2.0-era
      files: TensorFlow uniquified the name scope with a ``_N`` suffix): the group's layer.
    """

    def __init__(self, group: str, candidates: Sequence[LayerRecord]) -> None:
        self.group = group
        self.by_path = {r.path: r for r in candidates}
        self.by_suffix: dict[str, list[LayerRecord]] = {}
        for record in candidates:
            parts = record.path.split("/")
            for i in range(1, len(parts)):
                self.by_suffix.setdefault("/".join(parts[i:]), []).append(record)
        for record in candidates:
            if record.class_name != "Bidirectional":
                continue
            inner = [r for r in candidates if r.parent == record.path]
            if not inner:
                continue
            forward, backward = inner[0], inner[-1]
            for alias, target in (
                (f"forward_{forward.name}", forward),
                (f"backward_{forward.name}", backward),
                (f"backward_{backward.name}", backward),
            ):
                self.by_path.setdefault(f"{record.path}/{alias}", target)
                self.by_suffix.setdefault(f"{record.name}/{alias}", []).append(target)

    def owner(self, weight_name: str) -> tuple[LayerRecord | None, str]:
        """The owning record, or None and why not (no match, or several)."""
        scope = weight_name.split("/")[:-1] or [self.group]
        found, why = self._match(scope)
        if found is not None or why:
            return found, why
        first = scope[0]
        stem = first.rsplit("_", 1)[0]
        if first != self.group and first.rsplit("_", 1)[-1].isdigit() and stem == self.group:
            found, why = self._match([self.group, *scope[1:]])
            if found is not None or why:
                return found, why
        for start in range(1, len(scope)):
            found, why = self._match(scope[start:])
            if found is not None or why:
                return found, why
        return None, ""

    def _match(self, scope: list[str]) -> tuple[LayerRecord | None, str]:
        for k in range(len(scope), 0, -1):
            ref = "/".join(scope[:k])
            exact = {
                id(self.by_path[p]): self.by_path[p]
                for p in (ref, f"{self.group}/{ref}")
                if p in self.by_path
            }
            if len(exact) == 1:
                return next(iter(exact.values())), ""
            suffix = {id(r): r for r in self.by_suffix.get(ref, [])}
            if len(suffix) == 1:
                return next(iter(suffix.values())), ""
            if len(suffix) > 1:
                paths = ", ".join(r.path for r in list(suffix.values())[:4])
                return None, f"candidates: {paths}"
        return None, ""


def read(path: Path, *, weights: bool = True) -> ModelFile:
    with _opened(path) as h5:
        return _read_open(h5, path, str(path), weights)


def index(path: Path) -> WeightIndex | None:
    """Index the weights of a file already read with ``weights=False`` (see
    :func:`bnfreeze.formats.readers.with_weights`)."""
    with _opened(path) as h5:
        return _index(h5, _read_open(h5, path, str(path), weights=False).config)


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
            refuse_outside(h5, str(path))  # before anything is read through a link
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
    index = _index(h5, config) if weights else None
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


def _records(config: dict[str, Any] | None) -> tuple[LayerRecord, ...]:
    """The walked layers, or none when the config cannot be walked (the index then falls
    back to the names alone; inspect reports the config's problem itself)."""
    from bnfreeze.model.walk import walk

    if config is None:
        return ()
    try:
        return walk(config).layers
    except BnfreezeError:
        return ()


def _index(h5: Any, config: dict[str, Any] | None = None) -> WeightIndex | None:
    root = h5.get("model_weights")
    if root is None:
        return None
    records = _records(config)
    variables: dict[str, list[str]] = {}
    for group in names(root.attrs.get("layer_names")):
        variables.setdefault(group, [])
        layer_group = root.get(group)
        if layer_group is None:
            continue
        below = [r for r in records if r.path == group or r.path.startswith(group + "/")]
        owners = WeightOwners(group, below)
        for weight_name in names(layer_group.attrs.get("weight_names")):
            owner, _ = owners.owner(weight_name)
            path = owner.path if owner is not None else layer_path_of(group, weight_name)
            variables.setdefault(path, []).append(f"/model_weights/{group}/{weight_name}")
    return WeightIndex(variables={k: tuple(v) for k, v in variables.items()})
