"""Measuring one training step: which branch each BN took, and which of each layer's own
variables moved.

Layers are found by path on the live model (:func:`layer_paths`), each layer's own variables
are snapshot before the step and compared after it, and every built-in BN's calls are
recorded during it (:class:`~bnfreeze.runtime.branches.BranchRecorder`) (:func:`measure`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bnfreeze.errors import DataError
from bnfreeze.model.measured import (
    CompileSource,
    DataSource,
    LayerMeasurement,
    Movement,
    TrainingSetup,
)
from bnfreeze.runtime import environment
from bnfreeze.runtime.batches import Batches, is_object_detector, loss_name, pack
from bnfreeze.runtime.branches import (
    Branch,
    BranchRecorder,
    is_builtin_batchnorm,
    is_frozen_stats_layer,
)

#: The optimizer used when the file has no compile config (or it cannot train).
DEFAULT_LEARNING_RATE = 0.01


def layer_children(keras: Any, layer: Any) -> list[Any]:
    """The layers bnfreeze's walk descends into: a nested model's layers, then the layers
    with variables it holds as attributes outside its graph (:func:`held_layers`); a
    wrapper's inner layer(s) (``Bidirectional.forward_layer``/``backward_layer``, else
    ``.layer``)."""
    if isinstance(layer, keras.Model):
        return list(layer.layers) + held_layers(keras, layer)
    children = [
        inner
        for attr in ("forward_layer", "backward_layer")
        if isinstance(inner := getattr(layer, attr, None), keras.layers.Layer)
    ]
    if not children and isinstance(inner := getattr(layer, "layer", None), keras.layers.Layer):
        children.append(inner)
    return children


def held_layers(keras: Any, model: Any) -> list[Any]:
    """The layers with variables that ``model`` holds as attributes but its graph does not
    call, so ``model.layers`` does not list them.

    keras-hub backbones keep the model they wrap (``self.image_encoder = image_encoder``) and
    call only a ``keras.Model`` cut from it at the feature levels they use: a ResNet's
    ``post_bn`` under ``DeepLabV3Backbone``, a ResNet stage above ``max_level`` under
    ``RetinaNetBackbone``. Keras tracks them all the same: it saves their variables (under the
    attribute's name, ``image_encoder/layers/...``), hands their trainable ones to the
    optimizer, and gives them back ``trainable=True`` on load; so a flag edit must reach them.
    Only a layer with a variable the graph's layers do not hold is one: the wrapped encoder
    whose every layer the graph calls adds nothing, and a layer without variables (an anchor
    generator, say) has no flag that decides anything. Walks that use this skip the layers
    below a held one that a graph already reaches (:func:`layer_paths`)."""
    if not isinstance(model, keras.Model):
        return []
    listed = {id(child) for child in model.layers}
    try:
        tracked = list(model._flatten_layers(include_self=False, recursive=False))
    except (AttributeError, TypeError):
        return []
    held = [child for child in tracked if id(child) not in listed and child.weights]
    if not held:
        return []
    in_graph = {id(v) for child in model.layers for v in child.weights}
    return [child for child in held if any(id(v) not in in_graph for v in child.weights)]


def graph_layers(
    keras: Any, model: Any, children: Callable[[Any], list[Any]] | None = None
) -> set[int]:
    """The ids of every layer reached through layer lists alone: a model's ``layers``, and
    for any other layer ``children(layer)`` (default :func:`layer_children`); no
    :func:`held_layers`."""
    below = children if children is not None else lambda layer: layer_children(keras, layer)
    reached: set[int] = set()

    def visit(layer: Any) -> None:
        graph = isinstance(layer, keras.Model)
        for child in list(layer.layers) if graph else below(layer):
            if id(child) not in reached:
                reached.add(id(child))
                visit(child)

    visit(model)
    return reached


def layer_paths(keras: Any, model: Any) -> dict[str, tuple[Any, bool]]:
    """Every layer below ``model`` by path (names joined by "/"), in model order, with
    whether the file's layer list shows it. BN layers hidden inside a custom layer's Python
    code get a path below that layer and ``False``. Layers a model holds outside its graph
    (:func:`held_layers`) come after its graph's, each layer once: one that a graph reaches
    keeps its path there."""
    out: dict[str, tuple[Any, bool]] = {}
    graph = graph_layers(keras, model)
    placed: set[int] = set()

    def visit(layer: Any, prefix: str, held: bool) -> None:
        listed = {id(c) for c in layer.layers} if isinstance(layer, keras.Model) else None
        for child in layer_children(keras, layer):
            inside = held or (listed is not None and id(child) not in listed)
            if inside and (id(child) in graph or id(child) in placed):
                continue
            placed.add(id(child))
            path = prefix + child.name
            out.setdefault(path, (child, True))
            if layer_children(keras, child):
                visit(child, path + "/", inside)
            elif not isinstance(child, keras.layers.BatchNormalization):
                for inner in _hidden_batchnorm(keras, child):
                    out.setdefault(f"{path}/{inner.name}", (inner, False))

    visit(model, "", False)
    return out


def _hidden_batchnorm(keras: Any, layer: Any) -> list[Any]:
    flatten = getattr(layer, "_flatten_layers", None)
    if flatten is None:
        return []
    try:
        inner = list(flatten(include_self=False, recursive=True))
    except TypeError:
        return []
    return [sub for sub in inner if isinstance(sub, keras.layers.BatchNormalization)]


def own_variables(layers: dict[str, tuple[Any, bool]]) -> dict[str, list[Any]]:
    """Each layer's variables less those of the layers listed below it (by identity)."""
    owned: dict[str, list[Any]] = {}
    for path, (layer, _) in layers.items():
        prefix = path + "/"
        below = {
            id(v)
            for other, (sub, _) in layers.items()
            if other.startswith(prefix)
            for v in sub.weights
        }
        seen: set[int] = set()
        own = []
        for v in layer.weights:
            if id(v) not in below and id(v) not in seen:
                seen.add(id(v))
                own.append(v)
        owned[path] = own
    return owned


def _is_builtin(layer: Any) -> bool:
    """A Keras class, or bnfreeze's FrozenStatsBatchNormalization (its call is known)."""
    module = type(layer).__module__ or ""
    if is_frozen_stats_layer(layer):
        return True
    return module.split(".")[0] in ("keras", "tf_keras", "tensorflow")


def _compile_default(keras: Any, model: Any) -> None:
    """SGD and MSE; a model whose own ``compile`` picks its losses (a keras-hub task such as
    ``RetinaNetObjectDetector``, whose ``compile`` takes ``box_loss`` and
    ``classification_loss`` and has no plain ``loss``) keeps its own losses."""
    try:
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=DEFAULT_LEARNING_RATE),
            loss="mse",
            run_eagerly=True,
            jit_compile=False,
        )
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception:
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=DEFAULT_LEARNING_RATE),
            run_eagerly=True,
            jit_compile=False,
        )


def _optimizer_name(model: Any) -> str:
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return "none"
    name = type(optimizer).__name__
    try:
        rate = float(optimizer.learning_rate)
        return f"{name}(learning_rate={rate:g})"
    except Exception:
        return name


def measure(
    keras: Any,
    model: Any,
    batches: Batches,
    steps: int,
    batch_size: int,
    load_reason: str | None,
) -> tuple[list[LayerMeasurement], TrainingSetup]:
    layers = layer_paths(keras, model)
    owned = own_variables(layers)
    every = {id(v): v for vs in owned.values() for v in vs}
    recorder = BranchRecorder(
        {p: layer for p, (layer, _) in layers.items() if is_builtin_batchnorm(keras, layer)}
    )
    source, reason = _compile_for_steps(keras, model, load_reason)
    detector = is_object_detector(model)

    def run(policy: str) -> tuple[dict[int, Any], dict[int, Any], set[int]]:
        return _run_steps(model, batches, batch_size, every, recorder, detector, policy)

    try:
        before, after, trained = run("model" if source is CompileSource.MODEL else "real")
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        if source is not CompileSource.MODEL:
            raise _step_failed(exc) from None
        reason = (
            f"training with its compile config ({loss_name(model.loss)}) failed on "
            f"{'the given' if batches.given_ys is not None else 'synthetic'} data: "
            f"{type(exc).__name__}: {environment.one_line(exc, 160)}"
        )
        source = CompileSource.FALLBACK
        _compile_default(keras, model)
        try:
            before, after, trained = run("real")
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc2:
            raise _step_failed(exc2) from None

    measured = measurements(keras, layers, owned, before, after, trained, recorder.branches())
    setup = TrainingSetup(
        compile_source=source,
        optimizer=_optimizer_name(model),
        loss=loss_name(getattr(model, "loss", None)),
        steps=steps,
        batch_size=batch_size,
        data_source=DataSource.SYNTHETIC,
        data_path=None,
        seed=None,
        input_shapes=batches.input_shapes,
        reason=reason,
    )
    return measured, setup


def _compile_for_steps(
    keras: Any, model: Any, load_reason: str | None
) -> tuple[CompileSource, str | None]:
    """Run the model's own compile eagerly, or compile it with the default loss and optimizer
    (the fallback when loading dropped its compile)."""
    if environment.is_compiled(model) and getattr(model, "optimizer", None) is not None:
        model.run_eagerly = True
        model.jit_compile = False
        return CompileSource.MODEL, None
    source = CompileSource.DEFAULT if load_reason is None else CompileSource.FALLBACK
    _compile_default(keras, model)
    return source, load_reason


def _run_steps(
    model: Any,
    batches: Batches,
    batch_size: int,
    every: dict[int, Any],
    recorder: BranchRecorder,
    detector: bool,
    policy: str,
) -> tuple[dict[int, Any], dict[int, Any], set[int]]:
    """Train on every batch with the BN calls recorded: the variables before and after, and
    the ids of those ``fit()`` hands to the optimizer."""
    import numpy as np

    ys = batches.given_ys if batches.given_ys is not None else batches.ys_for(policy)
    if batches.given_ys is not None:
        ys = [pack(model, y) for y in ys]
    trained = {id(v) for v in model.trainable_variables}
    before = {k: np.array(v.numpy(), copy=True) for k, v in every.items()}
    recorder.reset()
    with recorder.active():
        for x, y in zip(batches.xs, ys, strict=True):
            if detector:
                # keras-hub's train_on_batch turns the {"boxes", "labels"} target into one
                # tensor and fails; fit() runs the same train_step on it.
                model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
            else:
                model.train_on_batch(x, y)
    after = {k: np.asarray(v.numpy()) for k, v in every.items()}
    return before, after, trained


def _step_failed(exc: BaseException) -> DataError:
    return DataError(
        f"a training step failed: {type(exc).__name__}: {environment.one_line(exc)}",
        hint="Pass real data with --data FILE.npz.",
    )


def measurements(
    keras: Any,
    layers: dict[str, tuple[Any, bool]],
    owned: dict[str, list[Any]],
    before: dict[int, Any],
    after: dict[int, Any],
    trained: set[int],
    branches: dict[str, Branch],
) -> list[LayerMeasurement]:
    """One :class:`LayerMeasurement` per layer with its own variables (a container's layers are
    measured one by one): ``before`` / ``after`` map ``id(variable)`` to its values around the
    steps, ``trained`` holds the ids ``fit()`` handed to the optimizer, ``branches`` the
    recorded calls by layer path."""
    import numpy as np

    def movement(variables: list[Any]) -> Movement:
        if not variables:
            return Movement.NONE
        if any(not np.array_equal(before[id(v)], after[id(v)]) for v in variables):
            return Movement.MOVED
        if any(id(v) in trained for v in variables):
            return Movement.ZERO_UPDATE
        return Movement.UNCHANGED

    measured: list[LayerMeasurement] = []
    for path, (layer, in_file) in layers.items():
        own = owned[path]
        if layer_children(keras, layer) and not own:
            continue  # a container: its layers are measured one by one
        if isinstance(layer, keras.layers.BatchNormalization):
            measured.append(
                _batchnorm_measurement(path, layer, in_file, own, branches.get(path), movement)
            )
        elif own:
            measured.append(
                LayerMeasurement(
                    path=path,
                    class_name=type(layer).__name__,
                    is_batchnorm=False,
                    builtin=_is_builtin(layer),
                    in_file=in_file,
                    moving_stats=Movement.NONE,
                    gamma_beta=Movement.NONE,
                    other_weights=movement(own),
                )
            )
    return measured


def _batchnorm_measurement(
    path: str,
    layer: Any,
    in_file: bool,
    own: list[Any],
    branch: Branch | None,
    movement: Callable[[list[Any]], Movement],
) -> LayerMeasurement:
    """A BN layer: its moving statistics, gamma and beta, and other variables apart, and the
    branch its recorded calls took."""
    stats = [v for v in (layer.moving_mean, layer.moving_variance) if v is not None]
    gamma_beta = [v for v in (layer.gamma, layer.beta) if v is not None]
    special = {id(v) for v in stats + gamma_beta}
    other = [v for v in own if id(v) not in special]
    return LayerMeasurement(
        path=path,
        class_name=type(layer).__name__,
        is_batchnorm=True,
        builtin=_is_builtin(layer),
        in_file=in_file,
        moving_stats=movement(stats),
        gamma_beta=movement(gamma_beta),
        other_weights=movement(other),
        branch=branch.normalizes_with if branch is not None else None,
        called=branch.calls > 0 if branch is not None else None,
    )
