"""Batches for a measured training step: the user's ``.npz`` arrays checked against the model's
inputs, or synthetic inputs and targets that fit every input and output.

Synthetic inputs are standard-normal values scaled to :data:`SYNTHETIC_MEAN` and
:data:`SYNTHETIC_STD`, far from freshly initialised moving statistics (0, 1), as real data is.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnfreeze.errors import DataError

#: Synthetic inputs are standard-normal values scaled to this mean and standard deviation:
#: far from freshly initialised moving statistics (0, 1), as real image or feature data is.
SYNTHETIC_MEAN = 5.0


SYNTHETIC_STD = 2.0


SYNTHETIC_SEED = 0


#: Used for input dimensions the model leaves open (besides the batch).
OPEN_DIMENSION = 32


@dataclass
class Batches:
    xs: list[Any]  # one input structure per step
    ys_for: Callable[[str], list[Any]]  # targets per step, for a target kind policy
    input_shapes: tuple[tuple[int, ...], ...]
    notes: list[str]
    given_ys: list[Any] | None


def read_npz(data: str | os.PathLike[str]) -> dict[str, Any]:
    import numpy as np

    p = Path(data)
    if not p.is_file():
        raise DataError(f"--data {p}: no such file.")
    try:
        with np.load(p, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except Exception as exc:
        raise DataError(
            f"--data {p}: not a readable .npz archive ({type(exc).__name__}: {exc}).",
            hint="Save inputs with numpy.savez(path, x=inputs, y=targets).",
        ) from None
    if not arrays:
        raise DataError(f"--data {p}: the archive holds no arrays.")
    return arrays


def _input_specs(
    model: Any, file_config: Any = None
) -> list[tuple[str, tuple[int | None, ...], str]]:
    try:
        tensors = list(model.inputs or [])
    except Exception:
        tensors = []
    if not tensors:
        built = _built_shapes(file_config)
        if built:
            return [(f"input_{i}", shape, "float32") for i, shape in enumerate(built)]
        raise DataError(
            "the model does not declare its inputs (a subclassed model?), so bnfreeze cannot "
            "build a batch for it.",
            hint="Pass one with --data FILE.npz (arrays x, and optionally y).",
        )
    specs = []
    for index, t in enumerate(tensors):
        name = getattr(t, "name", None) or f"input_{index}"
        shape = tuple(None if d is None else int(d) for d in tuple(t.shape)[1:])
        specs.append((str(name).split(":")[0], shape, _dtype_name(t.dtype)))
    return specs


def _built_shapes(file_config: Any) -> list[tuple[int | None, ...]]:
    """A subclassed model declares no inputs, but its saved ``build_config`` records the
    shape it was built with: ``[1, 3]``, or a list of shapes for several inputs."""
    build = file_config.get("build_config") if isinstance(file_config, dict) else None
    shape = build.get("input_shape") if isinstance(build, dict) else None

    def one(value: Any) -> tuple[int | None, ...] | None:
        if (
            isinstance(value, list)
            and value
            and all(d is None or isinstance(d, int) for d in value)
        ):
            return tuple(value[1:])
        return None

    if one(shape) is not None:
        return [one(shape)]  # type: ignore[list-item]
    if isinstance(shape, list) and shape and all(one(s) is not None for s in shape):
        return [one(s) for s in shape]  # type: ignore[misc]
    return []


def _dtype_name(dtype: Any) -> str:
    name = getattr(dtype, "name", dtype)
    return str(name)


def _structure(model: Any, arrays: list[Any]) -> Any:
    """Arrays in the structure the model was built with: one array, a list or a dict."""
    struct = getattr(model, "_inputs_struct", None)
    if isinstance(struct, dict):
        return dict(zip(struct.keys(), arrays, strict=True))
    return arrays[0] if len(arrays) == 1 else list(arrays)


def _pick(arrays: Mapping[str, Any], prefix: str, names: Sequence[str]) -> list[Any] | None:
    """``x`` (one tensor), ``x0``, ``x1``... or the model's tensor names, else None."""
    if len(names) == 1 and prefix in arrays:
        return [arrays[prefix]]
    numbered = [f"{prefix}{i}" for i in range(len(names))]
    if all(k in arrays for k in numbered):
        return [arrays[k] for k in numbered]
    if all(n in arrays for n in names):
        return [arrays[n] for n in names]
    return None


def build_batches(
    keras: Any,
    model: Any,
    arrays: Mapping[str, Any] | None,
    data: Any,
    steps: int,
    batch_size: int,
    seed: int,
    file_config: Any = None,
) -> Batches:
    import numpy as np

    specs = _input_specs(model, file_config)
    notes: list[str] = []
    given_ys: list[Any] | None = None
    if arrays is not None:
        xs, given_ys = _given_batches(model, arrays, data, specs, steps, batch_size)
    else:
        rng = np.random.default_rng(seed)
        xs = [
            _structure(model, [_synthetic(rng, spec, batch_size) for spec in specs])
            for _ in range(steps)
        ]
        if any(d is None for _, shape, _ in specs for d in shape):
            notes.append(f"input dimensions the model leaves open were set to {OPEN_DIMENSION}.")
    first = xs[0]
    flat = (
        list(first.values())
        if isinstance(first, dict)
        else (first if isinstance(first, list) else [first])
    )
    input_shapes = tuple(tuple(int(d) for d in a.shape) for a in flat)
    ys_for = _targets(keras, model, first, input_shapes, steps, np.random.default_rng(seed + 1))
    return Batches(xs, ys_for, input_shapes, notes, given_ys)


def _given_batches(
    model: Any,
    arrays: Mapping[str, Any],
    data: Any,
    specs: Sequence[Any],
    steps: int,
    batch_size: int,
) -> tuple[list[Any], list[Any] | None]:
    """The batches cut from ``--data`` (cycling over its samples), and its targets when it
    holds them (``y``, ``y0``... or the model's output names)."""
    import numpy as np

    names = [n for n, _, _ in specs]
    inputs = _pick(arrays, "x", names)
    if inputs is None:
        wanted = "x" if len(names) == 1 else f"x0..x{len(names) - 1} or {', '.join(names)}"
        raise DataError(
            f"--data {data}: no inputs found; it holds {', '.join(sorted(arrays))}, "
            f"the model needs {wanted}."
        )
    inputs = [_check_array(a, spec, data) for a, spec in zip(inputs, specs, strict=True)]
    count = min(len(a) for a in inputs)
    if count == 0:
        raise DataError(f"--data {data}: the inputs hold no samples.")
    rows = [np.arange(i * batch_size, (i + 1) * batch_size) % count for i in range(steps)]
    xs = [_structure(model, [a[r] for a in inputs]) for r in rows]
    targets = _pick(arrays, "y", _output_names(model))
    given_ys = [[t[r] for t in targets] for r in rows] if targets is not None else None
    return xs, given_ys


def _targets(
    keras: Any, model: Any, first: Any, input_shapes: Any, steps: int, target_rng: Any
) -> Callable[[str], list[Any]]:
    """``ys_for(policy)``: synthetic targets for every step, made once per policy (``model``:
    of the kinds the model's loss expects; ``real``: real-valued)."""
    cache: dict[str, list[Any]] = {}

    def ys_for(policy: str) -> list[Any]:
        if policy not in cache and is_object_detector(model):
            cache[policy] = [
                _detector_targets(keras, model, target_rng, input_shapes[0]) for _ in range(steps)
            ]
        if policy not in cache:
            shapes = _output_shapes(model, first)
            kinds = (
                _target_kinds(model, len(shapes)) if policy == "model" else ["real"] * len(shapes)
            )
            cache[policy] = [
                pack(
                    model,
                    [
                        _target(target_rng, kind, shape)
                        for kind, shape in zip(kinds, shapes, strict=True)
                    ],
                )
                for _ in range(steps)
            ]
        return cache[policy]

    return ys_for


def is_object_detector(model: Any) -> bool:
    """A keras-hub object detector (``RetinaNetObjectDetector``): its ``compute_loss`` takes
    ground-truth boxes and classes (``{"boxes", "labels"}``), which its label encoder turns
    into per-anchor targets; the model's outputs are not the targets."""
    return hasattr(model, "label_encoder") and isinstance(
        getattr(model, "bounding_box_format", None), str
    )


def _detector_targets(
    keras: Any, model: Any, rng: Any, image_shape: tuple[int, ...]
) -> dict[str, Any]:
    """One ground-truth box of class 0 per image, in the detector's ``bounding_box_format``."""
    import numpy as np

    batch, height, width = image_shape[0], image_shape[1], image_shape[2]
    corner = rng.uniform(0.1, 0.4, size=(batch, 1, 2))
    boxes = np.concatenate([corner, corner + 0.5], axis=-1).astype("float32")
    converted = keras.utils.bounding_boxes.convert_format(
        boxes, source="rel_yxyx", target=model.bounding_box_format, height=height, width=width
    )
    return {"boxes": np.asarray(converted), "labels": np.zeros((batch, 1), "int32")}


def _check_array(array: Any, spec: tuple[str, tuple[int | None, ...], str], data: Any) -> Any:
    import numpy as np

    name, shape, dtype = spec
    if array.ndim != len(shape) + 1 or any(
        want is not None and got != want for got, want in zip(array.shape[1:], shape, strict=False)
    ):
        expected = "(N, " + ", ".join("?" if d is None else str(d) for d in shape) + ")"
        raise DataError(
            f"--data {data}: input {name!r} has shape {tuple(array.shape)}, the model expects "
            f"{expected}."
        )
    try:
        return np.asarray(array).astype(dtype if dtype != "string" else object)
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"--data {data}: input {name!r} cannot be cast to {dtype} ({exc})."
        ) from None


def _synthetic(rng: Any, spec: tuple[str, tuple[int | None, ...], str], batch: int) -> Any:
    name, shape, dtype = spec
    full = (batch, *(OPEN_DIMENSION if d is None else d for d in shape))
    if "int" in dtype:
        return rng.integers(0, 2, size=full).astype(dtype)
    if dtype == "bool":
        return rng.integers(0, 2, size=full).astype(bool)
    if "float" not in dtype:
        raise DataError(
            f"input {name!r} has dtype {dtype}; bnfreeze can only make up numeric inputs.",
            hint="Pass real inputs with --data FILE.npz.",
        )
    return (rng.standard_normal(full) * SYNTHETIC_STD + SYNTHETIC_MEAN).astype(dtype)


def _output_names(model: Any) -> list[str]:
    names = getattr(model, "output_names", None)
    if names:
        return [str(n) for n in names]
    return [f"output_{i}" for i in range(len(model.outputs))]


def _output_shapes(model: Any, x: Any) -> list[tuple[int, ...]]:
    batch = _batch_of(x)
    try:
        tensors = list(model.outputs or [])
    except Exception:
        tensors = []
    shapes = [tuple(t.shape)[1:] for t in tensors]
    if tensors and all(d is not None for s in shapes for d in s):
        return [(batch, *(int(d) for d in s)) for s in shapes]
    # Open output dimensions: ask the model (inference mode: nothing is updated).
    import numpy as np

    out = model(x, training=False)
    flat = (
        [out[key] for key in sorted(out)]  # model.outputs' order (keras.tree.flatten)
        if isinstance(out, dict)
        else (list(out) if isinstance(out, list | tuple) else [out])
    )
    return [tuple(int(d) for d in np.shape(o)) for o in flat]


def _batch_of(x: Any) -> int:
    if isinstance(x, dict):
        x = next(iter(x.values()))
    elif isinstance(x, list):
        x = x[0]
    return int(x.shape[0])


def pack(model: Any, arrays: list[Any]) -> Any:
    """One target per output, in ``model.outputs``' order, in the structure the model
    returns. A dict of outputs (a keras-hub backbone's feature maps) is flattened by Keras with
    its keys sorted (``keras.tree.flatten``), not in the order the dict was built."""
    struct = getattr(model, "_outputs_struct", None)
    if isinstance(struct, dict):
        return dict(zip(sorted(struct), arrays, strict=True))
    return arrays[0] if len(arrays) == 1 else list(arrays)


def loss_name(loss: Any) -> str:
    if loss is None:
        return "none"
    if isinstance(loss, str):
        return loss
    if isinstance(loss, dict):
        return "{" + ", ".join(f"{k}: {loss_name(v)}" for k, v in loss.items()) + "}"
    if isinstance(loss, list | tuple):
        return "[" + ", ".join(loss_name(v) for v in loss) + "]"
    name = getattr(loss, "name", None) or getattr(loss, "__name__", None)
    return str(name or type(loss).__name__)


def _target_kinds(model: Any, count: int) -> list[str]:
    """For each output, the kind of target its compiled loss wants."""
    loss = getattr(model, "loss", None)
    if isinstance(loss, dict):
        losses = [loss.get(n) for n in _output_names(model)]
    elif isinstance(loss, list | tuple):
        losses = list(loss)
    else:
        losses = [loss] * count
    losses = (losses + [None] * count)[:count]
    return [_kind_of(loss_name(item)) for item in losses]


def _kind_of(name: str) -> str:
    key = name.lower().replace("_", "")
    if "sparsecategorical" in key:
        return "sparse"
    if "categorical" in key or "kld" in key or "kullback" in key:
        return "one-hot"
    if "binary" in key or "hinge" in key or "poisson" in key:
        return "binary"
    return "real"


def _target(rng: Any, kind: str, shape: tuple[int, ...]) -> Any:
    import numpy as np

    if kind == "sparse":
        classes = max(shape[-1], 1) if len(shape) > 1 else 2
        return rng.integers(0, classes, size=shape[:-1] if len(shape) > 1 else shape)
    if kind == "one-hot":
        classes = shape[-1]
        labels = rng.integers(0, classes, size=shape[:-1])
        return np.eye(classes, dtype="float32")[labels]
    if kind == "binary":
        return rng.integers(0, 2, size=shape).astype("float32")
    return rng.standard_normal(shape).astype("float32")
