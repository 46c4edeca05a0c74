"""The one table of Keras layer classes bnfreeze knows by name, from a saved config.

* :data:`BATCHNORM_CLASSES`: BatchNormalization layers. ``BatchNormalization(synchronized=True)``
  keeps its class name; tf_keras's ``SyncBatchNormalization`` has its own
  (docs/semantics.md, rule 7).
* :data:`OTHER_NORMALIZATION_CLASSES`: normalization layers that are *not* BN: they have no
  moving statistics (docs/semantics.md, rule 7).
* :data:`CONTAINER_CLASSES`: the models that hold layers.
* :data:`ALL_TRAINABLE_CLASSES`: built-in layers all of whose variables are trainable when the
  layer is (none calls ``add_weight(trainable=False)``). Measured on Keras 3.15: built, then
  ``layer.non_trainable_weights`` is empty, for each, ``EinsumDense`` (``kernel``, ``bias``)
  and ``RMSNormalization`` (``scale``) included, and ``trainable=False`` leaves no trainable
  weight. The optimizer-state remap (:mod:`bnfreeze.ops.optimizer_state`) and the legacy
  ``.h5`` writer (:mod:`bnfreeze.formats.writers.legacy_h5`) both read it.
* :data:`NON_TRAINABLE_VARIABLES`: the variables of a built-in layer that are never trainable,
  whatever its flag.
"""

from __future__ import annotations

from collections.abc import Mapping

BATCHNORM_CLASSES = frozenset({"BatchNormalization", "SyncBatchNormalization"})

OTHER_NORMALIZATION_CLASSES = frozenset(
    {
        "LayerNormalization",
        "GroupNormalization",
        "UnitNormalization",
        "RMSNormalization",
        "Normalization",
    }
)

CONTAINER_CLASSES = frozenset({"Functional", "Sequential", "Model"})

ALL_TRAINABLE_CLASSES = frozenset(
    {
        "Dense",
        "EinsumDense",
        "Conv1D",
        "Conv2D",
        "Conv3D",
        "Conv1DTranspose",
        "Conv2DTranspose",
        "Conv3DTranspose",
        "DepthwiseConv1D",
        "DepthwiseConv2D",
        "SeparableConv1D",
        "SeparableConv2D",
        "Embedding",
        "LayerNormalization",
        "GroupNormalization",
        "RMSNormalization",
        "PReLU",
    }
)

NON_TRAINABLE_VARIABLES: Mapping[str, frozenset[str]] = {
    "BatchNormalization": frozenset({"moving_mean", "moving_variance"}),
    "SyncBatchNormalization": frozenset({"moving_mean", "moving_variance"}),
    "Normalization": frozenset({"mean", "variance", "count"}),
}
