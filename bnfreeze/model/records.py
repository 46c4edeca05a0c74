"""The values bnfreeze passes around: frozen dataclasses and closed Enums.

Readers produce a :class:`ModelFile`; the walk turns its config into :class:`LayerRecord`
values; the mode model adds a :class:`FitBehaviour` to each; a :class:`Report` bundles them for
the renderers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class ModelFormat(enum.Enum):
    """How a model is stored."""

    KERAS = "keras"  # Keras 3 zip archive
    KERAS_DIR = "keras-dir"  # the same members, unzipped into a folder
    H5 = "h5"  # legacy HDF5 with a model_config attribute
    MEMORY = "memory"  # an in-memory keras.Model (Python API)

    @property
    def json_name(self) -> str:
        """The value of ``model.format`` in the JSON contract: an unzipped folder is "keras"."""
        return {ModelFormat.KERAS_DIR: "keras"}.get(self, self.value)


class LayerKind(enum.Enum):
    """What a layer is, as far as BatchNormalization semantics care."""

    BATCHNORM = "batchnorm"  # BatchNormalization, SyncBatchNormalization, a known subclass
    NORMALIZATION = "normalization"  # LayerNormalization and friends: no moving statistics
    CONTAINER = "container"  # a Functional or Sequential model nested in another
    WRAPPER = "wrapper"  # TimeDistributed, Bidirectional: one or two inner layers in config
    INPUT = "input"  # InputLayer: no weights, no flag
    LAYER = "layer"  # any other built-in Keras layer
    UNKNOWN = "unknown"  # a custom or unregistered class: kept, never dropped


class LayerSource(enum.Enum):
    """Where ``inspect`` found a layer.

    ``CONFIG``: the saved config lists it, with its own stored ``trainable``. ``WEIGHTS``: the
    config does not list it (a keras-hub class, a custom layer or a subclassed model builds
    it in ``__init__``), so it was found as a variable group in the weights file; its flag is
    not saved, and its ``trainable`` is the one a rule says Keras gives it when it rebuilds it:
    True (a prediction; keras-hub's HGNetV2 breaks it).
    """

    CONFIG = "config"
    WEIGHTS = "weights"
    #: The config does not list it; Keras was asked (``keras.models.load_model`` rebuilt the
    #: model): its flag and path are the ones the loaded layer has.
    KERAS = "keras"


class Normalization(enum.Enum):
    """Which statistics a BN layer normalizes with."""

    BATCH = "batch"
    MOVING = "moving"


class Runtime(enum.Enum):
    """A rule set for effective modes."""

    KERAS3 = "keras3"
    TF_KERAS = "tf-keras"


class WarningCode(enum.StrEnum):
    """The closed set of things ``inspect`` warns about. A ``StrEnum``: a code compares equal
    to the string ``--json`` prints (``finding.code == "untrained-bn-statistics"``)."""

    CALL_SITE_TRAINING_IGNORED = "call-site-training-ignored"
    TRAINABLE_BN_UNDER_FROZEN_CONTAINER = "trainable-bn-under-frozen-container"
    OPTIMIZER_STATE = "optimizer-state"
    UNTRAINED_BN_STATISTICS = "untrained-bn-statistics"
    UNKNOWN_LAYER = "unknown-layer"
    MODEL_NOT_TRAINABLE = "model-not-trainable"
    # freeze/unfreeze changed flags (docs/semantics.md, rule 4)
    RECOMPILE_REQUIRED = "recompile-required"
    KERAS3_INCOMPATIBLE = "keras3-incompatible"  # a layer config Keras 3's load_model refuses
    SAVED_BY_KERAS2 = "saved-by-keras-2"  # keras_version 2.x, predicted with Keras 3's rules
    RECORDED_FLAGS = "recorded-flags"  # flags Keras cannot save, in bnfreeze.json
    #: A code-built container (keras-hub class, custom layer, subclassed model) saved with
    #: trainable=False: Keras rebuilds its layers trainable on load, so its BN layers train.
    CODE_BUILT_RELOAD_TRAINS = "code-built-reload-trains"
    #: FrozenStatsBatchNormalization layers: Keras loads the file only with bnfreeze imported.
    NEEDS_BNFREEZE = "needs-bnfreeze"
    #: A saved BN with synchronized=True (or tf_keras's SyncBatchNormalization): Keras loads it
    #: only on TensorFlow (docs/semantics.md, rule 8).
    SYNCHRONIZED_BN = "synchronized-bn"
    #: Keras could not be asked how a code-built model loads: its rows are predicted by rule.
    PREDICTED_BY_RULE = "predicted-by-rule"
    #: A BN the loaded model holds but its forward pass never calls (asked of Keras): no
    #: branch in fit(), statistics never move.
    BN_NOT_CALLED = "bn-not-called"


@dataclass(frozen=True)
class ModelFile:
    """What a reader found in a saved model, before any Keras semantics are applied."""

    path: str
    format: ModelFormat
    config: dict[str, Any] = field(repr=False)  # the top-level {"class_name", "config", ...}
    keras_version: str | None
    compiled: bool
    compile_config: dict[str, Any] | None = field(default=None, repr=False)
    optimizer_variables: int | None = None  # saved optimizer variables, None when not stored
    weights: WeightIndex | None = field(default=None, repr=False)
    #: ``keras_hub_version`` from the metadata (keras-hub's ``save_to_preset`` writes it).
    keras_hub_version: str | None = None
    #: A keras-hub task's preset folder (``task.save_to_preset``: ``task.json`` beside the
    #: backbone's ``config.json``): the task's class name. ``config`` is then ``task.json``'s,
    #: the task as ``Task.from_preset`` loads it, and ``weights`` indexes both weights files
    #: (the backbone's under its name). None for any other model.
    preset_task: str | None = None


@dataclass(frozen=True)
class WeightIndex:
    """Where each layer's variables live in the weights file, by layer path.

    ``variables`` maps a layer path to the HDF5 dataset paths of its own variables, in the
    order Keras created them (for BN: gamma, beta, moving_mean, moving_variance, less any
    that ``scale=False`` / ``center=False`` drop). Building the index reads only HDF5
    metadata; reading values uses ``locations`` when the reader recorded them, else h5py.
    """

    variables: dict[str, tuple[str, ...]]
    #: Reader-private: where each visited dataset's bytes are in the file (dataset path ->
    #: ``readers._hdf5.DatasetInfo``), so values can be read without parsing the file again.
    #: Empty when the index came from h5py.
    locations: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    #: ``.keras`` only: the layer name Keras recorded for each group nested *inside* a
    #: layer's group that holds a sublayer the layer built as an attribute (HDF5 path ->
    #: name, e.g. ``/layers/fused_mb_conv_block/bn1`` -> ``block1a_expand_bn``).
    names: dict[str, str] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class LayerRecord:
    """One layer found by the walk, with what the config says about it."""

    path: str  # names from the outermost container down, joined by "/"
    name: str
    class_name: str
    kind: LayerKind
    depth: int  # 0 for the model's own layers, 1 inside a nested model, ...
    parent: str | None  # the path of the enclosing container or wrapper, None at top level
    trainable: bool | None  # the layer's own flag as stored; None where the layer has none
    call_kwargs: tuple[dict[str, Any], ...] = field(default=(), compare=False, repr=False)
    config_path: tuple[str | int, ...] = field(default=(), compare=False, repr=False)
    synchronized: bool = False
    module: str | None = None
    custom: bool = False  # a class that is not a Keras built-in
    #: BN only, from its config: ``scale`` (a gamma), ``center`` (a beta), ``renorm`` (batch
    #: renormalization's extra statistics). A BN without gamma and beta trains no weights.
    scale: bool = True
    center: bool = True
    renorm: bool = False
    #: BN only: ``momentum`` from its config (None when not known). At 1.0 the moving
    #: statistics never move, even in the batch branch.
    momentum: float | None = None
    source: LayerSource = LayerSource.CONFIG
    #: bnfreeze's ``FrozenStatsBatchNormalization``: always the inference branch, gamma and
    #: beta train when its own flag is True.
    frozen_stats: bool = False

    @property
    def shown_class(self) -> str:
        """The class name to show a person: ``FrozenStatsBatchNormalization`` for bnfreeze's
        subclass, which Keras saves under the ``class_name`` BatchNormalization."""
        return "FrozenStatsBatchNormalization" if self.frozen_stats else self.class_name

    #: The path of a custom wrapper whose own ``call()`` calls this layer: that code decides
    #: the ``training`` it passes, so the layer's mode is not predicted.
    call_decided_by: str | None = None
    #: Asked of Keras (``source=KERAS``): whether a forward call of the loaded model in
    #: training mode calls this layer; False for a layer the model holds but never calls
    #: (RetinaNet's FPN output norms), None when not asked.
    called_in_fit: bool | None = None

    @property
    def from_weights(self) -> bool:
        return self.source is LayerSource.WEIGHTS

    @property
    def from_keras(self) -> bool:
        return self.source is LayerSource.KERAS

    @property
    def code_built(self) -> bool:
        """Built by code when Keras loads the file: found in the weights, or asked of Keras."""
        return self.source is not LayerSource.CONFIG

    @property
    def is_batchnorm(self) -> bool:
        return self.kind is LayerKind.BATCHNORM

    @property
    def is_container(self) -> bool:
        return self.kind in (LayerKind.CONTAINER, LayerKind.WRAPPER)

    @property
    def call_training(self) -> bool | None:
        """The ``training=`` value recorded at a call site, if any call recorded one."""
        for kwargs in self.call_kwargs:
            value = kwargs.get("training")
            if isinstance(value, bool):
                return value
        return None


@dataclass(frozen=True)
class FitBehaviour:
    """What a layer does in ``fit()`` (or ``predict()``) under one runtime's rules.

    ``None`` means "not applicable" (no weights, not BN) or "cannot know from the file" (a
    custom class whose Python code may decide). See docs/json.md.
    """

    trains_weights: bool | None
    normalizes_with: Normalization | None
    updates_moving_stats: bool | None


@dataclass(frozen=True)
class LayerState:
    """A layer and its effective behaviour."""

    layer: LayerRecord
    has_weights: bool | None
    in_fit: FitBehaviour
    in_predict: FitBehaviour


@dataclass(frozen=True)
class Finding:
    """A warning about the model: what is wrong, where, and what to do."""

    code: WarningCode
    path: str | None
    message: str


@dataclass(frozen=True)
class Report:
    """The result of inspecting a model."""

    model: ModelFile
    runtime: Runtime
    model_trainable: bool
    layers: tuple[LayerState, ...]
    warnings: tuple[Finding, ...]

    @property
    def batchnorm(self) -> tuple[LayerState, ...]:
        return tuple(s for s in self.layers if s.layer.is_batchnorm)

    @property
    def bn_training_in_fit(self) -> int:
        return sum(1 for s in self.batchnorm if s.in_fit.normalizes_with is Normalization.BATCH)

    @property
    def bn_inference_in_fit(self) -> int:
        return sum(1 for s in self.batchnorm if s.in_fit.normalizes_with is Normalization.MOVING)

    def state(self, path: str) -> LayerState:
        for s in self.layers:
            if s.layer.path == path:
                return s
        raise KeyError(path)
