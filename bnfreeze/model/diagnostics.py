"""Warnings about a model: each names the layer and says what to do.

They come from the walk and the mode model, never from rendering, so the CLI, the JSON and
the Python API all see the same findings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from bnfreeze.model import frozen_stats
from bnfreeze.model.keras3_compat import incompatibility, nested_call_mismatches
from bnfreeze.model.records import (
    Finding,
    LayerKind,
    LayerState,
    ModelFile,
    ModelFormat,
    Normalization,
    Runtime,
    WarningCode,
)

if TYPE_CHECKING:
    from bnfreeze.model.code_built import Owner

#: The README section that says how to freeze a model whose layers code builds.
CODE_BUILT_SECTION = "keras-hub and code-built models"
#: The docs page that explains them (the README links the docs site).
CODE_BUILT_PAGE = "docs/keras-hub.md"

#: How close to the initializer values counts as "untrained" BN statistics.
_UNTRAINED_ATOL = 1e-7


def find(
    model: ModelFile | None,
    states: tuple[LayerState, ...],
    *,
    model_trainable: bool,
    read_values: Callable[[list[str]], dict[str, object]] | None = None,
    runtime: Runtime = Runtime.KERAS3,
    owners: Sequence[Owner] = (),
) -> tuple[Finding, ...]:
    findings: list[Finding] = []
    by_path = {s.layer.path: s for s in states}
    findings += _reload_trains(states, owners)
    findings += _model_not_trainable(states, model_trainable)
    if runtime is Runtime.KERAS3:
        # On tf_keras a recorded call-site training=False wins: no trap to warn about.
        findings += _call_site_training(states)
    findings += _bn_under_frozen_container(states, by_path, runtime)
    findings += _unknown_layers(states)
    findings += _not_called(states)
    findings += frozen_stats.findings(states)
    if model is not None:
        if runtime is Runtime.KERAS3:
            findings += _keras3_incompatible(model, states)
        findings += _synchronized(model, states)
        if read_values is not None:
            findings += _untrained_statistics(model, states, read_values)
    return tuple(findings)


def _below(states: tuple[LayerState, ...], path: str) -> list[LayerState]:
    prefix = path + "/"
    return [s for s in states if s.layer.path.startswith(prefix)]


def _reload_trains(states: tuple[LayerState, ...], owners: Sequence[Owner]) -> list[Finding]:
    """A code-built container saved with trainable=False whose BN layers still train once the
    file is loaded. The count is the count of the rows below it that take the batch branch:
    rows asked of Keras (``source=KERAS``: the flags the loaded layers carry) or rows found in
    the weights, predicted by the rule "Keras rebuilds them in ``__init__``, each with
    ``trainable=True``" (on Keras 3 only a layer's own flag counts). A frozen owner inside
    one already warned about (a task's backbone's wrapped encoder) adds no second warning: its
    BN rows are counted in the outer one's."""
    findings = []
    warned: list[str] = []
    for owner in owners:  # a container before the owners inside it (code_built.owners)
        if owner.trainable:
            continue
        prefix = owner.path + "/" if owner.path else ""
        if any(not w or owner.path.startswith(w + "/") for w in warned):
            continue
        below = [
            s
            for s in states
            if s.layer.code_built and s.layer.is_batchnorm and s.layer.path.startswith(prefix)
        ]
        training = [s for s in below if s.in_fit.normalizes_with is Normalization.BATCH]
        if not training:
            continue
        warned.append(owner.path)
        what = owner.path or "The model"
        if any(s.layer.from_keras for s in below):
            how = (
                f"loaded by Keras, {len(training)} of the {len(below)} BN layer(s) inside it "
                "come back with trainable=True and will"
            )
        else:
            how = (
                "Keras rebuilds them trainable when it loads it (a rule, not asked of Keras), "
                f"and {len(training)} BN layer(s) inside it will"
            )
        findings.append(
            Finding(
                WarningCode.CODE_BUILT_RELOAD_TRAINS,
                owner.path or None,
                f"{what} ({owner.class_name}) was saved with trainable=False, but its layers "
                f"are built by code, so their flags are not in the file: {how} "
                "normalize with batch statistics and update their moving statistics in fit() "
                "(and their gamma/beta train unless the whole model is frozen). Setting "
                "trainable=False before saving does not survive a reload; apply it after "
                f"loading. See {CODE_BUILT_PAGE} ({CODE_BUILT_SECTION}).",
            )
        )
    return findings


def keras_not_asked(reason: str) -> Finding:
    """The rows below code-built containers are predicted by rule because Keras could not be
    asked how the file loads."""
    return Finding(
        WarningCode.PREDICTED_BY_RULE,
        None,
        f"Keras was not asked how this model loads ({reason}), so the layers built by code "
        "(marked *) are predicted by rule: the BN layers found in the weights file, each "
        "rebuilt with trainable=True. The rule is wrong for some models (keras-hub's "
        "HGNetV2 keeps its flags); run bnfreeze verify, or inspect where Keras and "
        "keras-hub are installed.",
    )


def _model_not_trainable(states: tuple[LayerState, ...], model_trainable: bool) -> list[Finding]:
    if model_trainable:
        return []
    moving = sum(1 for s in states if s.in_fit.updates_moving_stats)
    message = (
        "The model's own trainable flag is False, so fit() trains no weights at all "
        "(Keras prints 'The model does not have any trainable weights.')."
    )
    if moving:
        message += (
            f" Yet {moving} BN layer(s) whose own flag is True still normalize with batch "
            "statistics and update their moving statistics. Set trainable on the layers "
            "themselves, then call compile() again."
        )
    return [Finding(WarningCode.MODEL_NOT_TRAINABLE, None, message)]


def _call_site_training(states: tuple[LayerState, ...]) -> list[Finding]:
    findings = []
    # BN layers in training mode, found once: a model can record training=False at many call
    # sites (EfficientNetV2L: 73 Dropout layers), and scanning every layer for each was slow.
    training_bn = [
        s
        for s in states
        if s.layer.is_batchnorm and s.in_fit.normalizes_with is Normalization.BATCH
    ]
    for state in states:
        layer = state.layer
        if layer.call_training is not False:
            continue
        prefix = layer.path + "/"
        unprotected = [s for s in training_bn if s is state or s.layer.path.startswith(prefix)]
        if not unprotected:
            continue
        target = f"'{layer.path}/*'" if layer.is_container else f"'{layer.path}'"
        findings.append(
            Finding(
                WarningCode.CALL_SITE_TRAINING_IGNORED,
                layer.path,
                f"{layer.path} is called with training=False, but Keras 3 overrides a recorded "
                f"call-site training=False in fit() (keras-team/keras#20285): "
                f"{len(unprotected)} BN layer(s) it was meant to protect still normalize with "
                "batch statistics and update their moving statistics. Only trainable=False on "
                f"each BN layer keeps it in inference mode: bnfreeze freeze MODEL --bn-inference "
                f"--layers {target} -o OUT.",
            )
        )
    return findings


def _bn_under_frozen_container(
    states: tuple[LayerState, ...],
    by_path: dict[str, LayerState],
    runtime: Runtime = Runtime.KERAS3,
) -> list[Finding]:
    findings = []
    for state in states:
        layer = state.layer
        if not layer.is_batchnorm or layer.trainable is False or layer.code_built:
            # A BN found in the weights of a code-built container: code-built-reload-trains
            # says it once for the container, and no file edit can set its flag.
            continue
        parent = layer.parent
        frozen = None
        while parent is not None:
            container = by_path[parent].layer
            if container.trainable is False:
                frozen = container
                break
            parent = container.parent
        if frozen is None:
            continue
        fix = f"set its own flag: bnfreeze freeze MODEL --layers '{layer.path}' -o OUT."
        if runtime is Runtime.KERAS3:
            why = (
                "on Keras 3 only a layer's own flag counts, so it trains anyway (gamma/beta "
                "update and its moving statistics move). That is right for the train-BN recipe "
                f"(--train-bn); otherwise {fix}"
            )
        elif state.in_fit.trains_weights:
            why = (
                "tf_keras's load_model drops the own trainable flag of every Functional and "
                "Sequential model, so once loaded the container freezes nothing and this layer "
                f"trains (gamma/beta update and its moving statistics move). To freeze it, {fix}"
            )
        elif state.in_fit.updates_moving_stats:
            why = (
                "on tf_keras the frozen ancestor keeps its gamma/beta fixed, but its own flag "
                "is True, so fit() still normalizes with batch statistics and moves its moving "
                f"statistics. To keep it in inference mode, {fix}"
            )
        else:
            continue
        findings.append(
            Finding(
                WarningCode.TRAINABLE_BN_UNDER_FROZEN_CONTAINER,
                layer.path,
                f"{layer.path} is trainable inside frozen container {frozen.path}: {why}",
            )
        )
    return findings


def _not_called(states: tuple[LayerState, ...]) -> list[Finding]:
    """BN rows asked of Keras that the loaded model's forward pass never calls."""
    return [
        Finding(
            WarningCode.BN_NOT_CALLED,
            s.layer.path,
            f"{s.layer.path} is held by the model but never called: a forward call of the "
            "model Keras loaded (training=True, as in fit()) did not call it. In fit() it "
            "takes no branch and its statistics never move, whatever its flag; it is not "
            "counted as training or inference.",
        )
        for s in states
        if s.layer.is_batchnorm and s.layer.called_in_fit is False
    ]


def _unknown_layers(states: tuple[LayerState, ...]) -> list[Finding]:
    wrapped = [
        Finding(
            WarningCode.UNKNOWN_LAYER,
            s.layer.path,
            f"{s.layer.path} ({s.layer.class_name}) is called by the custom wrapper "
            f"{s.layer.call_decided_by}, whose own call() decides the training= it passes "
            "(a training=False written there wins), so its mode in fit() is not predicted. "
            "Run bnfreeze verify to measure what it does.",
        )
        for s in states
        if s.layer.call_decided_by is not None and s.layer.is_batchnorm
    ]
    return wrapped + [
        Finding(
            WarningCode.UNKNOWN_LAYER,
            s.layer.path,
            (
                f"{s.layer.path}: the weights file cannot tell whether this layer is a "
                f"BatchNormalization ({_count(s)} same-length vectors, which a BN with "
                "center or scale off and a LayerNormalization both have); it is listed with "
                "is_batchnorm null. Run bnfreeze verify to measure what it does."
            )
            if s.layer.from_weights
            else (
                f"{s.layer.path} is a custom class ({s.layer.class_name}): kept as is, but its "
                "Python code may pass training= itself or subclass BatchNormalization, which "
                "the file cannot show. Run bnfreeze verify to measure what it does."
            ),
        )
        for s in states
        if s.layer.kind is LayerKind.UNKNOWN
    ]


def _count(state: LayerState) -> str:
    return "three" if state.layer.scale else "two"


def bn_statistics_datasets(model: ModelFile, state: LayerState) -> dict[str, str] | None:
    """Map gamma/beta/moving_mean/moving_variance to dataset paths for one BN layer.

    A legacy ``.h5`` names its datasets. A ``.keras`` weights file numbers them, in the order
    ``BatchNormalization.build`` creates them: gamma (when ``scale``), beta (when ``center``),
    moving_mean, moving_variance, then batch renormalization's moving_stddev, renorm_mean and
    renorm_stddev (when ``renorm``). A layout that does not fit the config gives None.
    """
    if model.weights is None:
        return None
    datasets = model.weights.variables.get(state.layer.path)
    if not datasets:
        return None
    leaves = [d.rsplit("/", 1)[-1].split(":")[0] for d in datasets]
    if all(leaf.isdigit() for leaf in leaves):
        layer = state.layer
        labels = [
            *(["gamma"] if layer.scale else []),
            *(["beta"] if layer.center else []),
            "moving_mean",
            "moving_variance",
            *(["moving_stddev", "renorm_mean", "renorm_stddev"] if layer.renorm else []),
        ]
        if len(labels) != len(datasets):
            return None
        named = dict(zip(labels, datasets, strict=True))
    else:
        named = dict(zip(leaves, datasets, strict=True))
    return {label: d for label, d in named.items() if label in _UNTRAINED}


_UNTRAINED = {"gamma": 1.0, "beta": 0.0, "moving_mean": 0.0, "moving_variance": 1.0}


def _untrained_statistics(
    model: ModelFile,
    states: tuple[LayerState, ...],
    read_values: Callable[[list[str]], dict[str, object]],
) -> list[Finding]:
    bns = [s for s in states if s.layer.is_batchnorm]
    by_path = {s.layer.path: s for s in bns}
    wanted: dict[str, dict[str, str]] = {}
    for state in bns:
        mapping = bn_statistics_datasets(model, state)
        if mapping and "moving_mean" in mapping and "moving_variance" in mapping:
            wanted[state.layer.path] = mapping
    if not wanted:
        return []
    values = read_values([d for m in wanted.values() for d in m.values()])
    findings = []
    for path, mapping in wanted.items():
        if not all(d in values for d in mapping.values()):
            continue
        if all(_is_constant(values[d], _UNTRAINED.get(label)) for label, d in mapping.items()):
            if by_path[path].in_fit.normalizes_with is Normalization.BATCH:
                # Training with batch statistics is right for a BN that was never trained:
                # fit() fills its moving statistics. It goes wrong only once it is frozen,
                # and then the result of that edit says so.
                continue
            if by_path[path].layer.called_in_fit is False:
                continue  # never called: not an identity in anything fit() computes
            findings.append(
                Finding(
                    WarningCode.UNTRAINED_BN_STATISTICS,
                    path,
                    f"{path} has untrained statistics (moving mean 0, variance 1, gamma 1, "
                    "beta 0) and runs in inference mode in fit(), so it is an identity: batch "
                    f"normalization is disabled. Train it first: bnfreeze unfreeze MODEL "
                    f"--layers '{path}' -o OUT.",
                )
            )
    return findings


def _is_constant(value: Any, expected: float | None) -> bool:
    """Whether every element is within ``_UNTRAINED_ATOL`` of ``expected`` (and there is one).

    Pure Python, so ``inspect`` needs no numpy: ``value`` is a flat sequence of numbers from
    the lean reader (whose ``count`` compares bytes), or a numpy array or scalar from h5py.
    Each element is compared as a float64,
    exactly as ``np.all(np.abs(np.asarray(value, "float64") - expected) <= atol)`` would.
    """
    if expected is None:  # gamma_or_beta: either initializer value counts
        return _is_constant(value, 0.0) or _is_constant(value, 1.0)
    if hasattr(value, "ravel"):  # numpy
        value = value.ravel().tolist()
    values = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if not values:
        return False
    if values.count(expected) == len(values):  # the common untrained case, at C speed
        return True
    return all(abs(float(v) - expected) <= _UNTRAINED_ATOL for v in values)


def _layer_dict(config: dict[str, Any], config_path: tuple[str | int, ...]) -> Any:
    node: Any = config
    for key in config_path:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _keras3_incompatible(model: ModelFile, states: tuple[LayerState, ...]) -> list[Finding]:
    findings = []
    nested = nested_call_mismatches(model.config)
    for state in states:
        layer = state.layer
        entry = _layer_dict(model.config, layer.config_path) if layer.config_path else None
        why = incompatibility(entry) if isinstance(entry, dict) else None
        if why is None and layer.is_container:
            why = nested.get(layer.name)
        if why is None:
            continue
        findings.append(
            Finding(
                WarningCode.KERAS3_INCOMPATIBLE,
                layer.path,
                f"{layer.path} ({layer.class_name}) cannot be loaded by Keras 3: {why}. "
                + (_KERAS3_H5 if (model.keras_version or "").startswith("3.") else _KERAS2),
            )
        )
    return findings


#: What to do about a layer Keras 3 cannot load, by who saved the file.
_KERAS2 = (
    "Rebuild that layer with Keras 3 and copy the weights over, or load and train the model "
    "with tf_keras (predict for it with --runtime tf-keras)."
)
_KERAS3_H5 = (
    "Keras 3 saved this .h5 but cannot load it: save the model as .keras from the code that "
    "built it (model.save('model.keras')), or build it again with that code and call "
    "model.load_weights on this file (Keras 3 reads its weights)."
)


def _synchronized(model: ModelFile, states: tuple[LayerState, ...]) -> list[Finding]:
    """Saved BN layers with ``synchronized=True``: Keras makes such a layer only on TensorFlow
    (``ValueError`` on JAX and torch, keras-team/keras#18667). tf_keras's
    ``SyncBatchNormalization`` is reported by the Keras 3 check (no such class)."""
    if model.format is ModelFormat.MEMORY:
        return []
    return [
        Finding(
            WarningCode.SYNCHRONIZED_BN,
            s.layer.path,
            f"{s.layer.path} is saved with synchronized=True: Keras loads this file only on "
            'TensorFlow (on JAX or torch: "Argument synchronized=True is only supported with '
            'the TensorFlow backend"). bnfreeze sync-bn MODEL off -o OUT rewrites it, weights '
            "untouched.",
        )
        for s in states
        if s.layer.is_batchnorm
        and s.layer.synchronized
        and s.layer.class_name != "SyncBatchNormalization"
    ]


def keras2_hint(
    model: ModelFile | None,
    states: tuple[LayerState, ...],
    tf_keras_states: tuple[LayerState, ...] | None,
) -> list[Finding]:
    """A file saved by Keras 2 (``keras_version`` 2.x), predicted with Keras 3's rules: say so,
    and how many BN layers the tf_keras rules would predict otherwise."""
    version = model.keras_version if model is not None else None
    if not version or not version.startswith(("2.", "1.")):
        return []
    message = (
        f"The file was saved by Keras {version}; these predictions follow Keras 3's rules. "
        "If you train it with tf_keras (Keras 2), pass --runtime tf-keras"
    )
    if tf_keras_states is not None:
        other = {s.layer.path: s.in_fit for s in tf_keras_states}
        differ = [
            s.layer.path
            for s in states
            if s.layer.is_batchnorm and other.get(s.layer.path) not in (None, s.in_fit)
        ]
        if differ:
            message += (
                f": there {len(differ)} BN layer(s) behave differently in fit() (a recorded "
                f"call-site training=False wins on tf_keras), e.g. {differ[0]}"
            )
    return [Finding(WarningCode.SAVED_BY_KERAS2, None, message + ".")]
