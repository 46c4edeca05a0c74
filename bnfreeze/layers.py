"""Keras layers shipped by bnfreeze. Importing this module imports Keras and registers them for
Keras serialization (``keras.saving.register_keras_serializable(package="bnfreeze")``), so that
``keras.models.load_model`` finds them by their registered name
``bnfreeze>FrozenStatsBatchNormalization``.

``import bnfreeze`` alone never imports Keras; it arranges for the registration to happen as
soon as Keras is imported (:mod:`bnfreeze.runtime.keras_hook`), so a plain
``keras.models.load_model`` after ``import bnfreeze`` works whichever is imported first.
``bnfreeze.load_model`` registers them too.
"""

from __future__ import annotations

from bnfreeze.runtime.layers import FrozenStatsBatchNormalization

__all__ = ["FrozenStatsBatchNormalization"]
