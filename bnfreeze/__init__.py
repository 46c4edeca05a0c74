"""bnfreeze: see and set which Keras BatchNormalization layers train and which run in
inference mode.

Importing this package never imports TensorFlow or Keras; the functions that need Keras
import it when called.
"""

from __future__ import annotations

__version__ = "0.1.0"
