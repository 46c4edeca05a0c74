"""Register bnfreeze's Keras layers as soon as Keras is imported, without importing it.

A plain ``keras.models.load_model`` finds a custom layer only through Keras's registry of
serializable classes (``keras.saving.register_keras_serializable``); for a module outside
``keras``/``keras_hub`` it never imports the module named in the config (measured on Keras
3.15, ``serialization_lib._retrieve_class_or_fn``). Registration needs Keras, and ``import
bnfreeze`` must not import it. So :func:`install` does one of two things:

* Keras is already imported: import :mod:`bnfreeze.runtime.layers` now (it costs a class
  definition);
* otherwise: put a finder at the front of ``sys.meta_path`` that, the first time ``keras`` is
  imported, lets the normal import run, then imports :mod:`bnfreeze.runtime.layers` and
  removes itself. Nothing else is ever intercepted.

Either way, after ``import bnfreeze`` a plain ``keras.models.load_model`` loads a file with
``FrozenStatsBatchNormalization`` layers. ``import bnfreeze.layers`` does the same explicitly.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import sys
from types import ModuleType
from typing import Any


def _register() -> None:
    import bnfreeze.runtime.layers  # noqa: F401  (registers the classes with Keras)


class _AfterKeras(importlib.abc.MetaPathFinder):
    """Finds ``keras`` as the other finders do, with its loader wrapped so that registration
    runs right after Keras's own ``__init__``. A ``find_spec`` that is not followed by an
    import (``importlib.util.find_spec("keras")``) changes nothing."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "keras":
            return None
        spec = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # Keras sees its own loader, also while its __init__ runs.
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _uninstall()
        # A Keras bnfreeze cannot use (tf_keras posing as keras, say) must still import.
        with contextlib.suppress(Exception):
            _register()

    def __getattr__(self, name: str) -> Any:  # is_package, get_code, ... of the real loader
        return getattr(self._loader, name)


_FINDER = _AfterKeras()


def _uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> None:
    """Register now if Keras is imported, else as soon as it is."""
    if "keras" in sys.modules:
        with contextlib.suppress(Exception):
            _register()
        return
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
