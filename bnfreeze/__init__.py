"""bnfreeze: see and set which Keras BatchNormalization layers train and which run in
inference mode.

The Python API (see :mod:`bnfreeze.api`) takes a saved model's path or an in-memory
``keras.Model``::

    bnfreeze.inspect(model_or_path) -> Report
    bnfreeze.freeze(model_or_path, layers=..., up_to=..., bn_inference=..., train_bn=...)
    bnfreeze.unfreeze(model_or_path, layers=..., from_=..., keep_bn_inference=...)
    bnfreeze.recompile(model)          # compile() again with a fresh optimizer
    bnfreeze.RecompileWarning          # a UserWarning subclass
    bnfreeze.load_model(path, **kwargs)  # keras.models.load_model, then the trainable flags
                                         # bnfreeze recorded for layers built in code
    bnfreeze.sync_bn(path, synchronized=False, output=...)  # BN synchronized on/off in a file
    bnfreeze.BatchNormGuard(expect=None, strict=False, min_samples=16)  # a Keras callback

Importing this package never imports TensorFlow or Keras; the names above are loaded on
first use, and only the functions that need Keras import it, when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # What a type checker sees: the real signatures. At run time the names are loaded from
    # bnfreeze.api on first use (__getattr__ below), so `import bnfreeze` stays cheap.
    from bnfreeze.api import RecompileWarning as RecompileWarning
    from bnfreeze.api import freeze as freeze
    from bnfreeze.api import inspect as inspect
    from bnfreeze.api import load_model as load_model
    from bnfreeze.api import recompile as recompile
    from bnfreeze.api import sync_bn as sync_bn
    from bnfreeze.api import unfreeze as unfreeze

__version__ = "0.1.0"

#: The public API, loaded lazily from bnfreeze.api (PEP 562).
_API = (
    "inspect",
    "freeze",
    "unfreeze",
    "recompile",
    "RecompileWarning",
    "load_model",
    "sync_bn",
)

#: Loaded lazily from bnfreeze.runtime.guard; the class subclasses keras.callbacks.Callback,
#: so it is created (and Keras imported) on first access.
_GUARD = ("BatchNormGuard",)

__all__ = ["__version__", *_API, *_GUARD]


def __getattr__(name: str) -> Any:
    if name in _API:
        from bnfreeze import api

        return getattr(api, name)
    if name in _GUARD:
        from bnfreeze.runtime import guard

        return getattr(guard, name)
    raise AttributeError(f"module 'bnfreeze' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API, *_GUARD})
