"""The effective-mode model: what each layer does in ``fit()`` and ``predict()``.

Keras's own rule, from the ``BatchNormalization`` docstring, section "About setting
``layer.trainable = False`` on a ``BatchNormalization`` layer":

    "the meaning of setting ``layer.trainable = False`` is to freeze the layer, i.e. its
    internal state will not change during training: its trainable weights will not be updated
    during ``fit()`` or ``train_on_batch()``, and its state updates will not be run. [...]
    However, in the case of the ``BatchNormalization`` layer, setting ``trainable = False`` on
    the layer means that the layer will be subsequently run in inference mode (meaning that it
    will use the moving mean and the moving variance to normalize the current batch, rather
    than using the mean and variance of the current batch)."

What Keras 3 adds, measured (docs/semantics.md, rules 1-3):

* A BN layer normalizes with batch statistics and updates its moving statistics if and only
  if **its own** ``trainable`` is True and its resolved ``training`` argument is True.
* In ``fit()`` the resolved ``training`` is True. A call-site ``training=False`` recorded in
  a Functional or Sequential graph is overridden by the outer value (keras-team/keras#20285);
  only explicit Python code in a subclassed ``call`` can force it, which a config cannot show.
* Trainability is per variable: the flags of intermediate containers are ignored, only the
  layer's own flag and the model's top-level flag count. A model whose own ``trainable`` is
  False trains no weights in ``fit()``, but its BN layers still follow their own flags for
  their moving statistics.

What tf_keras 2.21 does differently, measured (docs/semantics.md, rules 2-3;
``tests/model/test_modes_tf_keras.py``):

* A call-site ``training=`` recorded in the graph **wins**, in ``fit()`` and ``predict()``: on
  the BN's own call or on the call of any enclosing sub-model. The nearest recorded value
  counts (an inner ``training=True`` beats an outer ``training=False``). A layer called at
  several sites with different values runs in both modes: its moving statistics move.
* Trainability is hierarchical in memory: a frozen ancestor freezes gamma/beta. But
  ``tf_keras.models.load_model`` drops the own ``trainable`` flag of every Functional and
  Sequential model, nested or top-level, in ``.h5`` and ``.keras`` alike (leaves keep theirs),
  so a model read from a file has no frozen containers left. A wrapper (``TimeDistributed``)
  keeps its flag, so there the hierarchy still counts.

Rule sets are values keyed by :class:`Runtime`; each sees a layer's ancestors (nearest first)
as :func:`resolve` finds them from ``LayerRecord.parent``, so the walk's output never changes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

from bnfreeze.model.records import (
    FitBehaviour,
    LayerKind,
    LayerRecord,
    LayerState,
    Normalization,
    Runtime,
)
from bnfreeze.model.walk import OPERATION_MODULE_PREFIXES

NOT_APPLICABLE = FitBehaviour(trains_weights=None, normalizes_with=None, updates_moving_stats=None)

#: Built-in layers that never hold variables: used when the weights file is not readable.
WEIGHTLESS_CLASSES = frozenset(
    {
        "InputLayer",
        "Activation",
        "ReLU",
        "LeakyReLU",
        "ELU",
        "Softmax",
        "Add",
        "Subtract",
        "Multiply",
        "Average",
        "Maximum",
        "Minimum",
        "Concatenate",
        "Dot",
        "Flatten",
        "Reshape",
        "Permute",
        "RepeatVector",
        "Dropout",
        "SpatialDropout1D",
        "SpatialDropout2D",
        "SpatialDropout3D",
        "GaussianNoise",
        "GaussianDropout",
        "AlphaDropout",
        "MaxPooling1D",
        "MaxPooling2D",
        "MaxPooling3D",
        "AveragePooling1D",
        "AveragePooling2D",
        "AveragePooling3D",
        "GlobalAveragePooling1D",
        "GlobalAveragePooling2D",
        "GlobalAveragePooling3D",
        "GlobalMaxPooling1D",
        "GlobalMaxPooling2D",
        "GlobalMaxPooling3D",
        "ZeroPadding1D",
        "ZeroPadding2D",
        "ZeroPadding3D",
        "Cropping1D",
        "Cropping2D",
        "Cropping3D",
        "UpSampling1D",
        "UpSampling2D",
        "UpSampling3D",
        "Rescaling",
        "Resizing",
        "CenterCrop",
        "Identity",
        "Masking",
        "ActivityRegularization",
        "UnitNormalization",
    }
)


#: Built-in layers whose variables are all non-trainable state, never trained by ``fit()``:
#: the preprocessing ``Normalization`` keeps the mean and variance that ``adapt()`` computed.
UNTRAINABLE_STATE_CLASSES = frozenset({"Normalization"})


def is_operation(record: LayerRecord) -> bool:
    """Whether the config entry is a Keras operation applied to tensors (``x + 3`` is saved as
    an ``Add`` from ``keras.src.ops.numpy``), which never holds variables."""
    return record.module is not None and record.module.startswith(OPERATION_MODULE_PREFIXES)


def has_weights_by_class(record: LayerRecord) -> bool | None:
    """Whether a layer holds variables, judged by its class alone (None: cannot tell)."""
    if record.kind in (LayerKind.INPUT, LayerKind.CONTAINER, LayerKind.WRAPPER):
        return False
    if record.kind is LayerKind.BATCHNORM:
        return True
    if is_operation(record):
        return False
    if not record.custom and record.class_name in WEIGHTLESS_CLASSES:
        return False
    return None


class RuleSet(Protocol):
    """How one runtime resolves a layer's effective behaviour."""

    runtime: Runtime

    def loaded_model_trainable(self, class_name: str, stored: bool) -> bool:
        """The model's own ``trainable`` once the runtime has loaded it from a file whose
        top-level config is ``class_name`` with the flag ``stored``."""
        ...

    def loaded_container_trainable(self, record: LayerRecord) -> bool:
        """A nested container's (or wrapper's) own ``trainable`` once loaded from a file."""
        ...

    def in_fit(
        self,
        record: LayerRecord,
        *,
        ancestors: tuple[LayerRecord, ...],
        model_trainable: bool,
        has_weights: bool | None,
    ) -> FitBehaviour:
        """``ancestors`` are the containers and wrappers above ``record``, nearest first, with
        the ``trainable`` flags the runtime sees (after loading, for a file)."""
        ...

    def in_predict(
        self,
        record: LayerRecord,
        *,
        ancestors: tuple[LayerRecord, ...],
        has_weights: bool | None,
    ) -> FitBehaviour: ...


class Keras3Rules:
    """Keras 3 (TensorFlow and JAX backends), per docs/semantics.md, rules 1-3."""

    runtime = Runtime.KERAS3

    def loaded_model_trainable(self, class_name: str, stored: bool) -> bool:
        # Measured: Keras 3's ``Sequential.from_config`` never passes the saved flag on, so a
        # Sequential saved with trainable=False loads trainable (its leaves keep their own
        # flags). A Functional model's flag is restored.
        if class_name == "Sequential":
            return True
        return stored

    def loaded_container_trainable(self, record: LayerRecord) -> bool:
        # Keras 3 ignores the flags of intermediate containers, so this never decides anything.
        return record.trainable is not False

    def in_fit(
        self,
        record: LayerRecord,
        *,
        ancestors: tuple[LayerRecord, ...] = (),
        model_trainable: bool,
        has_weights: bool | None,
    ) -> FitBehaviour:
        own = record.trainable is not False
        if record.kind in (LayerKind.INPUT, LayerKind.CONTAINER, LayerKind.WRAPPER):
            return NOT_APPLICABLE
        if record.kind is LayerKind.BATCHNORM:
            # Gamma and beta are the trainable weights; the moving statistics never are. A BN
            # with scale=False and center=False has neither, so it trains no weights. A
            # FrozenStatsBatchNormalization always takes the inference branch.
            batch = own and not record.frozen_stats
            return FitBehaviour(
                trains_weights=own and model_trainable and (record.scale or record.center),
                normalizes_with=Normalization.BATCH if batch else Normalization.MOVING,
                updates_moving_stats=batch,
            )
        return _weights_in_fit(record, has_weights, trainable=own and model_trainable)

    def in_predict(
        self,
        record: LayerRecord,
        *,
        ancestors: tuple[LayerRecord, ...] = (),
        has_weights: bool | None,
    ) -> FitBehaviour:
        if record.kind is LayerKind.BATCHNORM:
            return FitBehaviour(
                trains_weights=False,
                normalizes_with=Normalization.MOVING,
                updates_moving_stats=False,
            )
        if record.kind is LayerKind.UNKNOWN:
            return FitBehaviour(
                trains_weights=False if has_weights else None,
                normalizes_with=None,
                updates_moving_stats=None,
            )
        if has_weights and record.kind not in (LayerKind.CONTAINER, LayerKind.WRAPPER):
            return FitBehaviour(
                trains_weights=False, normalizes_with=None, updates_moving_stats=None
            )
        return NOT_APPLICABLE


def _weights_in_fit(
    record: LayerRecord, has_weights: bool | None, *, trainable: bool
) -> FitBehaviour:
    """A layer that is not BN: its weights train in ``fit()`` when the runtime's rule says
    ``trainable``, unless it holds none (unknown when it cannot be told) or only untrainable
    state (the preprocessing ``Normalization``)."""
    if not has_weights:
        trains = None
    elif not record.custom and record.class_name in UNTRAINABLE_STATE_CLASSES:
        trains = False
    else:
        trains = trainable
    return FitBehaviour(trains_weights=trains, normalizes_with=None, updates_moving_stats=None)


def call_site_training(
    record: LayerRecord, ancestors: tuple[LayerRecord, ...], outer: bool
) -> frozenset[bool]:
    """The ``training`` values ``record`` runs with on tf_keras, where a recorded call-site
    value wins: walk from the outermost container in, and at each level every call site either
    sets its recorded True/False or passes on what the level above resolved. ``outer`` is what
    ``fit()`` (True) or ``predict()`` (False) passes. Two values: called both ways."""
    resolved = frozenset({outer})
    for level in (*reversed(ancestors), record):
        sites = [kwargs.get("training") for kwargs in level.call_kwargs] or [None]
        values: set[bool] = set()
        for site in sites:
            values |= {site} if isinstance(site, bool) else resolved
        resolved = frozenset(values)
    return resolved


class TfKerasRules:
    """tf_keras 2 (Keras 2), per docs/semantics.md, rules 1-3, and the measurements in the
    module doc."""

    runtime = Runtime.TF_KERAS

    def loaded_model_trainable(self, class_name: str, stored: bool) -> bool:
        # Measured on tf_keras 2.21: load_model restores neither a Functional's nor a
        # Sequential's own trainable=False (.h5 and .keras); the leaves keep their own flags.
        return True

    def loaded_container_trainable(self, record: LayerRecord) -> bool:
        # Measured: a nested Functional/Sequential loses its own flag on load, like the top
        # level. A wrapper (TimeDistributed) keeps its stored flag, and freezes the gamma/beta
        # of the BN it wraps even when that BN's own flag is True.
        if record.kind is LayerKind.CONTAINER:
            return True
        return record.trainable is not False

    def in_fit(
        self,
        record: LayerRecord,
        *,
        ancestors: tuple[LayerRecord, ...] = (),
        model_trainable: bool,
        has_weights: bool | None,
    ) -> FitBehaviour:
        if record.kind in (LayerKind.INPUT, LayerKind.CONTAINER, LayerKind.WRAPPER):
            return NOT_APPLICABLE
        own = record.trainable is not False
        # Hierarchical: any frozen ancestor, or the frozen model, freezes the weights.
        reachable = own and model_trainable and all(a.trainable is not False for a in ancestors)
        if record.kind is LayerKind.BATCHNORM:
            return _bn_mode(
                reachable and (record.scale or record.center),
                own and not record.frozen_stats,
                call_site_training(record, ancestors, outer=True),
            )
        return _weights_in_fit(record, has_weights, trainable=reachable)

    def in_predict(
        self,
        record: LayerRecord,
        *,
        ancestors: tuple[LayerRecord, ...] = (),
        has_weights: bool | None,
    ) -> FitBehaviour:
        if record.kind is LayerKind.BATCHNORM:
            # Measured: a recorded training=True makes predict() normalize with the batch's
            # statistics and move the moving ones.
            return _bn_mode(
                False,
                record.trainable is not False,
                call_site_training(record, ancestors, outer=False),
            )
        return Keras3Rules().in_predict(record, ancestors=ancestors, has_weights=has_weights)


def _bn_mode(trains_weights: bool, own: bool, training: frozenset[bool]) -> FitBehaviour:
    """A BN's mode from its own flag and the ``training`` values it is called with: batch
    statistics only if both are True; called both ways, its statistics move but no single
    mode describes it."""
    if not own or training == {False}:
        return FitBehaviour(trains_weights, Normalization.MOVING, updates_moving_stats=False)
    if training == {True}:
        return FitBehaviour(trains_weights, Normalization.BATCH, updates_moving_stats=True)
    return FitBehaviour(trains_weights, None, updates_moving_stats=True)


RULES: dict[Runtime, RuleSet] = {Runtime.KERAS3: Keras3Rules(), Runtime.TF_KERAS: TfKerasRules()}


def rules_for(runtime: Runtime) -> RuleSet:
    try:
        return RULES[runtime]
    except KeyError:
        from bnfreeze.errors import RuntimeUnavailableError

        raise RuntimeUnavailableError(
            f"no rule set for runtime {runtime.value!r}; bnfreeze predicts for "
            + ", ".join(r.value for r in RULES)
            + "."
        ) from None


def loaded_model_trainable(
    class_name: str, stored: bool, runtime: Runtime = Runtime.KERAS3
) -> bool:
    """The model's own ``trainable`` after ``runtime`` loads a file whose top-level config is
    ``class_name`` with the flag ``stored`` (a Keras 3 Sequential loads trainable whatever was
    saved). Pass the result to :func:`resolve` for a file; an in-memory model's live flag is
    already the truth."""
    return rules_for(runtime).loaded_model_trainable(class_name, stored)


def resolve(
    layers: tuple[LayerRecord, ...],
    *,
    model_trainable: bool,
    has_weights: dict[str, bool | None],
    runtime: Runtime = Runtime.KERAS3,
    loaded: bool = False,
) -> tuple[LayerState, ...]:
    """Attach each layer's effective behaviour in ``fit()`` and ``predict()``.

    ``loaded``: the layers come from a file, so each container's flag is the one the runtime
    restores on load (:meth:`RuleSet.loaded_container_trainable`), not the stored one; pass
    ``model_trainable`` through :func:`loaded_model_trainable` likewise. For an in-memory
    model the live flags are the truth.
    """
    rules = rules_for(runtime)
    by_path: dict[str, LayerRecord] = {}
    for record in layers:
        if record.is_container and loaded:
            flag = rules.loaded_container_trainable(record)
            if flag != (record.trainable is not False):
                record = replace(record, trainable=flag)
        by_path[record.path] = record
    states = []
    for record in layers:
        weights = has_weights.get(record.path)
        above = tuple(_ancestors(by_path, record))
        states.append(
            LayerState(
                layer=record,
                has_weights=weights,
                in_fit=_still_statistics(
                    record,
                    rules.in_fit(
                        record,
                        ancestors=above,
                        model_trainable=model_trainable,
                        has_weights=weights,
                    ),
                ),
                in_predict=_still_statistics(
                    record, rules.in_predict(record, ancestors=above, has_weights=weights)
                ),
            )
        )
    return tuple(states)


def _still_statistics(record: LayerRecord, behaviour: FitBehaviour) -> FitBehaviour:
    """A BN with ``momentum=1.0`` takes the batch branch in training mode, but its update
    ``moving = moving * momentum + batch * (1 - momentum)`` leaves the moving statistics
    bit-identical (measured, docs/semantics.md): they never move. A BN the model never calls
    (:attr:`LayerRecord.called_in_fit` False) takes no branch and updates nothing."""
    if record.call_decided_by is not None and record.is_batchnorm:
        # Called by a custom wrapper's call(): the training it passes is its code's choice.
        return replace(behaviour, normalizes_with=None, updates_moving_stats=None)
    if record.called_in_fit is False and record.is_batchnorm:
        # Never called by the model's forward pass: no branch, nothing updated.
        return replace(behaviour, normalizes_with=None, updates_moving_stats=False)
    if record.momentum == 1.0 and behaviour.updates_moving_stats:
        return replace(behaviour, updates_moving_stats=False)
    return behaviour


def _ancestors(by_path: dict[str, LayerRecord], record: LayerRecord) -> list[LayerRecord]:
    """The containers and wrappers above ``record``, nearest first (a parent the layers do
    not list ends the chain)."""
    out = []
    parent = record.parent
    while parent is not None and parent in by_path:
        node = by_path[parent]
        out.append(node)
        parent = node.parent
    return out
