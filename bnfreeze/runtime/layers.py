"""``FrozenStatsBatchNormalization``: BatchNormalization with frozen statistics and trainable
scale and shift (OpenMMLab's ``norm_eval=True``; torchvision's and detectron2's
``FrozenBatchNorm2d`` with a learnable affine part).

Keras's ``BatchNormalization`` has two branches (its docstring): in training mode "the layer
normalizes its output using the mean and standard deviation of the current batch of inputs"
and updates its moving statistics; in inference mode it "normalizes its output using a moving
average of the mean and standard deviation of the batches it has seen during training". The
branch is chosen by ``training and self.trainable``, so with flags alone Keras 3 cannot keep
the moving statistics while gamma and beta train: ``trainable=False`` freezes gamma and beta
too, and a call-site ``training=False`` recorded in a Functional graph is overridden in
``fit()`` (docs/semantics.md, rule 2).

This subclass always calls ``BatchNormalization.call`` with ``training=False``: in ``fit()`` and
``predict()`` alike it normalizes with the moving statistics and never updates them, while its
own ``trainable`` flag keeps deciding whether gamma and beta train. It has exactly the
variables, config and weights layout of ``BatchNormalization``: a saved file converts either way
by changing the layer's class in ``config.json`` only.
"""

from __future__ import annotations

from typing import Any

import keras

#: What Keras writes in a saved config for this class (measured on Keras 3.15):
#: ``class_name`` is the class's ``__name__`` (``BatchNormalization``, see below), ``module``
#: this module and ``registered_name`` ``bnfreeze>FrozenStatsBatchNormalization``.
PACKAGE = "bnfreeze"
CLASS_NAME = "FrozenStatsBatchNormalization"
REGISTERED_NAME = f"{PACKAGE}>{CLASS_NAME}"
MODULE = __name__


@keras.saving.register_keras_serializable(package=PACKAGE, name=CLASS_NAME)
class FrozenStatsBatchNormalization(keras.layers.BatchNormalization):
    """A BatchNormalization layer that always normalizes with its moving statistics and never
    updates them; gamma and beta train when the layer's ``trainable`` is True.

    Takes the arguments of ``keras.layers.BatchNormalization`` (``renorm=True`` is refused: batch
    renormalization exists only in the training branch)."""

    #: Read by bnfreeze's branch recorder: every call takes the inference branch.
    bnfreeze_frozen_stats = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("renorm"):
            raise ValueError(
                "FrozenStatsBatchNormalization cannot use renorm=True: batch renormalization "
                "only runs in the training branch, which this layer never takes."
            )
        super().__init__(*args, **kwargs)

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        return super().call(inputs, training=False, mask=mask)


# Keras names a layer's group in a saved weights file after its class's ``__name__`` (snake
# case, numbered within a layer list: ``layers/batch_normalization_2/vars``), and the default
# layer name likewise. Measured on Keras 3.15: a ``.keras`` file whose BN was re-classed to a
# class named FrozenStatsBatchNormalization fails to load ("Layer 'a' expected 4 variables, but
# received 0 variables during loading"), because its group is now looked up as
# ``frozen_stats_batch_normalization``. Under the name ``BatchNormalization`` the variables are
# stored exactly where a plain BatchNormalization's are: a saved file converts either way by
# changing the layer's ``module`` and ``registered_name`` in ``config.json``, the weights
# member copied byte for byte, and ``.weights.h5`` files are interchangeable. What identifies
# the class in a config is its registered name, ``bnfreeze>FrozenStatsBatchNormalization``.
FrozenStatsBatchNormalization.__name__ = "BatchNormalization"
