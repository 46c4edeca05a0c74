"""Recognising and writing bnfreeze's frozen-statistics BatchNormalization in a config.

``bnfreeze.layers.FrozenStatsBatchNormalization`` always normalizes with its moving
statistics and never updates them, while gamma and beta train when its own ``trainable`` is
True. Keras 3.15 saves it as (measured)::

    {"module": "bnfreeze.runtime.layers", "class_name": "BatchNormalization",
     "config": {... exactly BatchNormalization's ...},
     "registered_name": "bnfreeze>FrozenStatsBatchNormalization", ...}

``class_name`` is ``BatchNormalization`` on purpose (the class's ``__name__``): Keras names the
layer's weights group after it, so the weights of both classes are stored in the same place and
a conversion edits only ``module`` and ``registered_name``. A legacy ``.h5`` names a registered
class ``bnfreeze>FrozenStatsBatchNormalization`` in ``class_name`` itself.

This module never imports Keras.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bnfreeze.model.records import Finding, LayerState

PACKAGE = "bnfreeze"
NAME = "FrozenStatsBatchNormalization"
REGISTERED_NAME = f"{PACKAGE}>{NAME}"
MODULE = "bnfreeze.runtime.layers"
#: What Keras 3 writes for a plain BatchNormalization (measured on Keras 3.15).
BATCHNORM_MODULE = "keras.layers"


def is_frozen_stats(layer: dict[str, Any]) -> bool:
    """Whether a serialized layer is a ``FrozenStatsBatchNormalization``."""
    return REGISTERED_NAME in (layer.get("registered_name"), layer.get("class_name"))


def to_frozen_stats(layer: dict[str, Any]) -> bool:
    """Re-class a serialized Keras 3 ``BatchNormalization`` in place; False if it already
    was one."""
    if is_frozen_stats(layer):
        return False
    layer["class_name"] = "BatchNormalization"
    layer["module"] = MODULE
    layer["registered_name"] = REGISTERED_NAME
    return True


def to_batchnorm(layer: dict[str, Any]) -> bool:
    """Re-class a serialized ``FrozenStatsBatchNormalization`` to Keras's own
    ``BatchNormalization`` in place; False if it was not one."""
    if not is_frozen_stats(layer):
        return False
    layer["class_name"] = "BatchNormalization"
    layer["module"] = BATCHNORM_MODULE
    layer["registered_name"] = None
    return True


def findings(states: tuple[LayerState, ...]) -> list[Finding]:
    """The ``needs-bnfreeze`` warning: a model with FrozenStatsBatchNormalization layers loads
    only where bnfreeze is installed and imported, and how to convert them back."""
    from bnfreeze.model.records import Finding, WarningCode

    paths = [s.layer.path for s in states if s.layer.frozen_stats]
    if not paths:
        return []
    names = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    return [
        Finding(
            WarningCode.NEEDS_BNFREEZE,
            None,
            f"{len(paths)} layer(s) are bnfreeze's FrozenStatsBatchNormalization ({names}): "
            "keras.models.load_model loads this model only after `import bnfreeze` (or with "
            "bnfreeze.load_model); without bnfreeze installed it fails with Keras's "
            "\"Could not locate class 'BatchNormalization'\". To share the file, convert them "
            "back to Keras's BatchNormalization: `bnfreeze unfreeze MODEL --layers ...` "
            "(trainable) or `bnfreeze freeze MODEL --bn-inference` (inference).",
        )
    ]
