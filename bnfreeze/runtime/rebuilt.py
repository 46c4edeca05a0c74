"""Ask Keras how a code-built model loads: the layers ``keras.models.load_model`` rebuilds.

A keras-hub backbone or task, a custom layer that holds layers as attributes and a subclassed
model save constructor arguments, not their layers: Keras rebuilds those layers by running
code when it loads the file, and what flags they then carry depends on that code (measured:
ResNet-style keras-hub backbones come back with every inner layer trainable, while an
``HGNetV2ImageClassifier`` keeps 16 of its 17 BN layers frozen; ``docs/semantics.md``). The
file cannot tell which: only Keras can. :func:`rebuild` loads the file the way ``verify``
does (``safe_mode=True``, in memory, without compiling it: the file is only read) and returns
one :class:`~bnfreeze.model.records.LayerRecord` per layer the config does not list, with
``source=KERAS``, the flag the loaded layer carries, and the path ``verify`` measures it under
(:func:`bnfreeze.runtime.measure.layer_paths`).

The flags are those of a plain ``keras.models.load_model``, which ``verify`` measures; the
flags bnfreeze records in a ``bnfreeze.json`` member (:mod:`bnfreeze.formats.recorded_flags`),
which :func:`bnfreeze.load_model` sets again, are matched to these rows by the path Keras saves
each layer under (``Rebuilt.saved``) and reported by the ``recorded-flags`` warning
(:mod:`bnfreeze.ops.recorded_view`).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from bnfreeze.model.code_built import Rebuilt
from bnfreeze.model.records import LayerKind, LayerRecord, LayerSource, ModelFile, Runtime


def unavailable(needs_keras_hub: bool) -> str | None:
    """Why Keras cannot be asked (it, its backend or keras-hub is not installed), or None.
    Imports nothing."""
    from bnfreeze.errors import RuntimeUnavailableError
    from bnfreeze.runtime import environment

    try:
        environment.require_runtime(Runtime.KERAS3)
    except RuntimeUnavailableError as exc:
        return str(exc)
    if needs_keras_hub and not environment._installed("keras_hub"):
        return "the file holds keras-hub classes and keras_hub is not installed"
    return None


def rebuild(
    path: str | os.PathLike[str],
    listed: set[str],
    *,
    custom_objects: str | dict[str, Any] | None = None,
    unsafe: bool = False,
) -> Rebuilt:
    """Load ``path`` with Keras and return the layers it rebuilt that ``listed`` (the paths
    the config lists) does not hold. Raises :class:`~bnfreeze.errors.BnfreezeError` when Keras
    cannot load the file."""
    from bnfreeze.runtime import environment, loading
    from bnfreeze.runtime.measure import layer_paths, own_variables
    from bnfreeze.runtime.saving import saved_paths

    with environment.quiet():
        keras = environment.keras_module(Runtime.KERAS3)
        with environment.keras_warnings():
            model = loading.load_model(
                path,
                compile=False,
                fresh_names=True,
                custom_objects=custom_objects,
                unsafe=unsafe,
            )
        layers = layer_paths(keras, model)
        owned = own_variables(layers)
        rows = _Rows()
        for layer_path, (layer, _) in layers.items():
            if layer_path not in listed:
                rows.add(keras, layer_path, layer, owned.get(layer_path, []))
        by_layer = {id(layer): group for group, layer in saved_paths(model).items()}
        saved = {
            path: by_layer[id(layer)]
            for path, (layer, _) in layers.items()
            if id(layer) in by_layer
        }
        # After reading the values: the call below updates the moving statistics in memory.
        called = _called(keras, model, layers)
    records = [
        replace(r, called_in_fit=called[r.path])
        if r.kind is LayerKind.BATCHNORM and r.path in called
        else r
        for r in rows.records
    ]
    return Rebuilt(
        tuple(records), rows.has_weights, rows.datasets, rows.values, str(keras.__version__), saved
    )


class _Rows:
    """The rows of the layers Keras rebuilt, and the variables of their BN layers."""

    def __init__(self) -> None:
        self.records: list[LayerRecord] = []
        self.has_weights: dict[str, bool] = {}
        self.datasets: dict[str, tuple[str, ...]] = {}
        self.values: dict[str, Any] = {}

    def add(self, keras: Any, layer_path: str, layer: Any, own: list[Any]) -> None:
        import numpy as np

        from bnfreeze.runtime.measure import layer_children

        children = bool(layer_children(keras, layer))
        kind = _kind(keras, layer, children)
        self.records.append(_record(layer_path, layer, kind))
        self.has_weights[layer_path] = bool(own) and not children
        if kind is LayerKind.BATCHNORM:
            names = tuple(f"{layer_path}/{i}" for i in range(len(own)))
            self.datasets[layer_path] = names
            for name, variable in zip(names, own, strict=True):
                self.values[name] = np.asarray(variable.numpy())


def _kind(keras: Any, layer: Any, children: bool) -> LayerKind:
    from bnfreeze.runtime.branches import is_builtin_batchnorm

    if isinstance(layer, keras.layers.BatchNormalization):
        return LayerKind.BATCHNORM if is_builtin_batchnorm(keras, layer) else LayerKind.UNKNOWN
    if isinstance(layer, keras.layers.InputLayer):
        return LayerKind.INPUT
    if children:
        return LayerKind.CONTAINER
    # A custom layer too: Keras shows its flag and variables, and the BN layers its code holds
    # are rows of their own.
    return LayerKind.LAYER


def _record(layer_path: str, layer: Any, kind: LayerKind) -> LayerRecord:
    return LayerRecord(
        path=layer_path,
        name=layer.name,
        class_name=type(layer).__name__,
        kind=kind,
        depth=layer_path.count("/"),
        parent=layer_path.rpartition("/")[0] or None,
        trainable=None if kind is LayerKind.INPUT else bool(layer.trainable),
        module=type(layer).__module__,
        custom=(type(layer).__module__ or "").split(".")[0] != "keras",
        scale=getattr(layer, "scale", True) is not False,
        center=getattr(layer, "center", True) is not False,
        renorm=bool(getattr(layer, "renorm", False)),
        momentum=_momentum(layer),
        source=LayerSource.KERAS,
    )


def _called(keras: Any, model: Any, layers: dict[str, tuple[Any, bool]]) -> dict[str, bool]:
    """Which built-in BN layers a forward call of ``model`` in training mode calls, as the
    one ``fit()``'s step makes: one synthetic sample, each BN's ``call`` recorded on the
    instance (:class:`~bnfreeze.runtime.branches.BranchRecorder`). A layer the model holds but
    never calls (RetinaNet's FPN output norms) takes no branch in ``fit()``. Empty when the
    model cannot be called so (its inputs are not known): nothing is claimed then. A symbolic
    call (``keras.KerasTensor`` inputs) cannot tell: with each BN's ``call`` and
    ``compute_output_spec`` wrapped, it reached 0 of RetinaNet's 16 BN on TensorFlow and JAX
    (measured), so the call is a real one."""
    from bnfreeze.runtime.batches import SYNTHETIC_SEED, build_batches
    from bnfreeze.runtime.branches import BranchRecorder, is_builtin_batchnorm

    bns = {p: layer for p, (layer, _) in layers.items() if is_builtin_batchnorm(keras, layer)}
    if not bns:
        return {}
    recorder = BranchRecorder(bns)
    try:
        batches = build_batches(keras, model, None, None, 1, 1, SYNTHETIC_SEED)
        with recorder.active():
            model(batches.xs[0], training=True)
    except Exception:  # a model bnfreeze cannot feed: leave the rows as they are
        return {}
    # A layer shared by two paths is recorded under its first path only.
    return {path: branch.calls > 0 for path, branch in recorder.branches().items()}


def _momentum(layer: Any) -> float | None:
    value = getattr(layer, "momentum", None)
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def ask(
    model: ModelFile,
    listed: set[str],
    *,
    custom_objects: str | dict[str, Any] | None = None,
    unsafe: bool = False,
) -> tuple[Rebuilt | None, str | None]:
    """What :func:`bnfreeze.ops.inspect.inspect_model_file` calls with ``ask_keras``: the
    layers Keras rebuilds, or None and why Keras could not be asked. ``verify`` passes its
    ``--custom-objects`` and ``--unsafe`` so that both loads see the same classes."""
    from bnfreeze.errors import BnfreezeError
    from bnfreeze.model.hub import keras_hub

    reason = unavailable(keras_hub(model) is not None)
    if reason is not None:
        return None, reason
    try:
        return rebuild(model.path, listed, custom_objects=custom_objects, unsafe=unsafe), None
    except BnfreezeError as exc:
        return None, f"Keras could not load it: {exc}"
