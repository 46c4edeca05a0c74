"""Keras layers shipped by bnfreeze. Importing this package imports Keras and registers the
layers for Keras serialization (``keras.saving.register_keras_serializable(package="bnfreeze")``),
so that ``keras.models.load_model`` finds them by their registered name
``bnfreeze>FrozenStatsBatchNormalization``.

``import bnfreeze`` alone never imports Keras; it arranges for this package to be imported as
soon as Keras is (see :mod:`bnfreeze._keras_hook`), so a plain ``keras.models.load_model`` after
``import bnfreeze`` works either way round. ``bnfreeze.load_model`` imports it too.
"""

from __future__ import annotations

from bnfreeze.layers.frozen_stats import FrozenStatsBatchNormalization

__all__ = ["FrozenStatsBatchNormalization"]
