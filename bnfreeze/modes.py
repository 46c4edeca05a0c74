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

What Keras 3 adds, measured (SEMANTICS §1–§3):

* A BN layer normalizes with batch statistics and updates its moving statistics if and only
  if **its own** ``trainable`` is True and its resolved ``training`` argument is True.
* In ``fit()`` the resolved ``training`` is True. A call-site ``training=False`` recorded in
  a Functional or Sequential graph is overridden by the outer value (keras-team/keras#20285);
  only explicit Python code in a subclassed ``call`` can force it, which a config cannot show.
* Trainability is per variable: the flags of intermediate containers are ignored, only the
  layer's own flag and the model's top-level flag count. A model whose own ``trainable`` is
  False trains no weights in ``fit()``, but its BN layers still follow their own flags for
  their moving statistics.

Rule sets are values keyed by :class:`Runtime`, so a tf_keras rule set can be added without
touching the walk.
"""

from __future__ import annotations

from typing import Protocol

from bnfreeze.records import (
    FitBehaviour,
    LayerKind,
    LayerRecord,
    LayerState,
    Normalization,
    Runtime,
)
from bnfreeze.walk import OPERATION_MODULE_PREFIXES

NOT_APPLICABLE = FitBehaviour(trains_weights=None, normalizes_with=None, updates_moving_stats=None)

#: Built-in layers that never hold variables: used when the weights file is not readable.
WEIGHTLESS_CLASSES = frozenset(
    {
        "InputLayer", "Activation", "ReLU", "LeakyReLU", "ELU", "Softmax", "Add", "Subtract",
        "Multiply", "Average", "Maximum", "Minimum", "Concatenate", "Dot", "Flatten", "Reshape",
        "Permute", "RepeatVector", "Dropout", "SpatialDropout1D", "SpatialDropout2D",
        "SpatialDropout3D", "GaussianNoise", "GaussianDropout", "AlphaDropout",
        "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D",
        "AveragePooling2D", "AveragePooling3D", "GlobalAveragePooling1D",
        "GlobalAveragePooling2D", "GlobalAveragePooling3D", "GlobalMaxPooling1D",
        "GlobalMaxPooling2D", "GlobalMaxPooling3D", "ZeroPadding1D", "ZeroPadding2D",
        "ZeroPadding3D", "Cropping1D", "Cropping2D", "Cropping3D", "UpSampling1D",
        "UpSampling2D", "UpSampling3D", "Rescaling", "Resizing", "CenterCrop", "Identity",
        "Masking", "ActivityRegularization", "UnitNormalization",
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

    def in_fit(
        self, record: LayerRecord, *, model_trainable: bool, has_weights: bool | None
    ) -> FitBehaviour: ...

    def in_predict(self, record: LayerRecord, *, has_weights: bool | None) -> FitBehaviour: ...


class Keras3Rules:
    """Keras 3 (TensorFlow and JAX backends), per SEMANTICS §1–§3."""

    runtime = Runtime.KERAS3

    def loaded_model_trainable(self, class_name: str, stored: bool) -> bool:
        # Measured: Keras 3's ``Sequential.from_config`` never passes the saved flag on, so a
        # Sequential saved with trainable=False loads trainable (its leaves keep their own
        # flags). A Functional model's flag is restored.
        if class_name == "Sequential":
            return True
        return stored

    def in_fit(
        self, record: LayerRecord, *, model_trainable: bool, has_weights: bool | None
    ) -> FitBehaviour:
        own = record.trainable is not False
        if record.kind in (LayerKind.INPUT, LayerKind.CONTAINER, LayerKind.WRAPPER):
            return NOT_APPLICABLE
        if record.kind is LayerKind.BATCHNORM:
            # Gamma and beta are the trainable weights; the moving statistics never are. A BN
            # with scale=False and center=False has neither, so it trains no weights.
            return FitBehaviour(
                trains_weights=own and model_trainable and (record.scale or record.center),
                normalizes_with=Normalization.BATCH if own else Normalization.MOVING,
                updates_moving_stats=own,
            )
        if not has_weights:
            trains = None
        elif not record.custom and record.class_name in UNTRAINABLE_STATE_CLASSES:
            trains = False
        else:
            trains = own and model_trainable
        return FitBehaviour(trains_weights=trains, normalizes_with=None, updates_moving_stats=None)

    def in_predict(self, record: LayerRecord, *, has_weights: bool | None) -> FitBehaviour:
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


RULES: dict[Runtime, RuleSet] = {Runtime.KERAS3: Keras3Rules()}


def rules_for(runtime: Runtime) -> RuleSet:
    try:
        return RULES[runtime]
    except KeyError:
        from bnfreeze.errors import RuntimeUnavailableError

        raise RuntimeUnavailableError(
            f"no rule set for runtime {runtime.value!r} yet; bnfreeze predicts for Keras 3."
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
) -> tuple[LayerState, ...]:
    """Attach each layer's effective behaviour in ``fit()`` and ``predict()``."""
    rules = rules_for(runtime)
    states = []
    for record in layers:
        weights = has_weights.get(record.path)
        states.append(
            LayerState(
                layer=record,
                has_weights=weights,
                in_fit=rules.in_fit(record, model_trainable=model_trainable, has_weights=weights),
                in_predict=rules.in_predict(record, has_weights=weights),
            )
        )
    return tuple(states)
