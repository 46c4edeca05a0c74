"""Loading a saved model with Keras, safely (:func:`load_model`): ``safe_mode=True`` always,
a model whose config carries a Python ``lambda`` is refused with :class:`UnsafeModelError`
unless the caller passes ``unsafe=True``, and custom classes come only from a module or file
the user names (:func:`load_custom_objects`). The runtime itself (which Keras, which backend,
quiet imports, progress) is :mod:`bnfreeze.runtime.environment`.

Every function imports TensorFlow / Keras lazily, when called; importing this module is cheap.

Typical use::

    from bnfreeze.runtime import environment, loading

    with environment.quiet():
        model = loading.load_model("model.keras")            # keras.Model, safe_mode=True
        model = loading.load_model("m.keras", unsafe=True)    # the user trusts the file
        objs = loading.load_custom_objects("my_layers.py")
        model = loading.load_model("m.keras", custom_objects=objs)
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from bnfreeze.errors import BnfreezeError, ModelFormatError, UnsafeModelError
from bnfreeze.model.records import Runtime
from bnfreeze.runtime.environment import (
    keras_module,
    native_output_captured,
    one_line,
    quiet_environment,
    silence_python_loggers,
)

#: The option a user passes to load a model whose config carries Python code.
UNSAFE_OPTION = "--unsafe"


UNSAFE_OPTION = "--unsafe"
#: The option a user passes to name the module or file that defines custom classes.
CUSTOM_OBJECTS_OPTION = "--custom-objects"


def unsafe_layers(config: Any) -> list[str]:
    """Names of the layers (or other objects) whose saved config carries Python code.

    Keras 3 stores a ``lambda``'s bytecode as ``{"class_name": "__lambda__", ...}``; Keras 2 /
    tf_keras mark it with ``"function_type": "lambda"``. The whole config is scanned,
    ``compile_config`` included. Reading the config executes nothing.
    """
    found: list[str] = []

    def visit(node: Any, owner: str) -> None:
        if isinstance(node, dict):
            conf = node.get("config")
            if isinstance(conf, dict) and isinstance(conf.get("name"), str):
                owner = conf["name"]
            if node.get("class_name") == "__lambda__" or any(
                str(k).endswith("function_type") and v == "lambda" for k, v in node.items()
            ):
                found.append(owner)
            for value in node.values():
                visit(value, owner)
        elif isinstance(node, list):
            for item in node:
                visit(item, owner)

    visit(config, "the model")
    return sorted(set(found))


def refuse_unsafe(config: Any, source: str, *, unsafe: bool) -> None:
    """Raise :class:`UnsafeModelError` if the config carries Python code and ``unsafe`` is False."""
    if unsafe:
        return
    layers = unsafe_layers(config)
    if layers:
        shown = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
        raise UnsafeModelError(
            f"{source}: layer {shown} holds a Python lambda; loading the model would run "
            "code stored in the file, so bnfreeze refuses (Keras safe_mode).",
            hint=f"If you trust the file, pass {UNSAFE_OPTION}.",
        )


def load_custom_objects(spec: str) -> dict[str, Any]:
    """Import the module or ``.py`` file ``spec`` and return the custom objects it defines.

    This runs the user's code, on purpose: it is how a user vouches for the custom classes
    their model needs. ``spec`` is a path to a ``.py`` file or a dotted module name
    importable from the current directory. If the module defines a dict ``CUSTOM_OBJECTS``,
    that dict is used as is; otherwise every class and function defined in the module,
    keyed by name. Classes decorated with ``keras.saving.register_keras_serializable``
    register themselves on import as well.
    """
    # The user's module almost always imports Keras, and with it TensorFlow: keep its
    # start-up noise off the terminal as keras_module() does.
    quiet_environment()
    with native_output_captured():
        try:
            module = _import_user_module(spec)
        finally:
            if "tensorflow" in sys.modules:
                silence_python_loggers()
    declared = getattr(module, "CUSTOM_OBJECTS", None)
    if declared is not None:
        if not isinstance(declared, dict):
            raise BnfreezeError(
                f"{CUSTOM_OBJECTS_OPTION} {spec}: CUSTOM_OBJECTS must be a dict of name to "
                f"class or function, not {type(declared).__name__}."
            )
        return dict(declared)
    found: dict[str, Any] = {}
    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        if (isinstance(value, type) or callable(value)) and getattr(
            value, "__module__", None
        ) == module.__name__:
            found[name] = value
    return found


def _import_user_module(spec: str) -> ModuleType:
    path = Path(spec)
    try:
        if spec.endswith(".py") or path.is_file():
            if not path.is_file():
                raise BnfreezeError(f"{CUSTOM_OBJECTS_OPTION} {spec}: no such file.")
            name = "bnfreeze_custom_objects_" + re.sub(r"\W", "_", path.stem)
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise BnfreezeError(f"{CUSTOM_OBJECTS_OPTION} {spec}: not a Python file.")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
            return module
        sys.path.insert(0, os.getcwd())
        try:
            return importlib.import_module(spec)
        finally:
            with contextlib.suppress(ValueError):
                sys.path.remove(os.getcwd())
    except BnfreezeError:
        raise
    except ModuleNotFoundError as exc:
        raise BnfreezeError(
            f"{CUSTOM_OBJECTS_OPTION} {spec}: cannot import it ({exc}).",
            hint="Pass a .py file path or a module importable from the current directory.",
        ) from None
    except Exception as exc:
        raise BnfreezeError(
            f"{CUSTOM_OBJECTS_OPTION} {spec}: importing it raised "
            f"{type(exc).__name__}: {one_line(exc)}"
        ) from None


def load_model(
    path: str | os.PathLike[str],
    *,
    unsafe: bool = False,
    custom_objects: dict[str, Any] | str | None = None,
    compile: bool = True,
    runtime: Runtime = Runtime.KERAS3,
    fresh_names: bool = False,
) -> Any:
    """Load a saved model with Keras and return the ``keras.Model``.

    * ``safe_mode=True`` unless ``unsafe``: a model whose config holds a Python ``lambda``
      raises :class:`UnsafeModelError`, naming ``--unsafe``, before Keras sees it.
    * ``custom_objects``: a dict of classes and functions, or the module / ``.py`` path
      :func:`load_custom_objects` takes; a model that needs custom classes it was not given
      raises :class:`ModelFormatError` naming ``--custom-objects``.
    * ``compile``: as in ``keras.models.load_model``.
    * ``fresh_names``: the layers that code builds without a name (keras-hub's DeepLabV3
      wraps its encoder in ``keras.Model(...)``) get the names Keras generates in a fresh
      process (``functional``, not ``functional_7``), so two loads in one process (inspect's
      and verify's) give the same paths; the process's own name counters are restored after.

    The trainable flags bnfreeze recorded in an archive's ``bnfreeze.json`` are not set
    again: ``verify`` and ``explain`` measure what a plain ``keras.models.load_model`` gives
    (the Keras route and :func:`bnfreeze.load_model` set them, with
    :func:`bnfreeze.runtime.saving.apply_recorded`).

    Any failure is a :class:`~bnfreeze.errors.BnfreezeError` with a one-line message. The
    file is only read. Call it inside :func:`quiet` to keep TensorFlow's noise off stdout.
    """
    from bnfreeze.formats.readers import read_model

    # Read the config ourselves first: bad files get bnfreeze's specific errors, and
    # unsafe content is refused before TensorFlow is even imported. The weights are indexed
    # too, so a file that points outside itself is refused before Keras would open that
    # other file (docs/guarantees.md).
    model_file = read_model(path)
    refuse_unsafe(model_file.config, str(path), unsafe=unsafe)
    if isinstance(custom_objects, str):
        custom_objects = load_custom_objects(custom_objects)
    keras = keras_module(runtime)
    custom_objects = {
        **keras_hub_objects(keras, model_file, custom_objects),
        **(custom_objects or {}),
    }
    kwargs: dict[str, Any] = {"custom_objects": custom_objects or None, "compile": compile}
    kwargs["safe_mode"] = not unsafe
    try:
        with _fresh_names(keras if fresh_names and runtime is Runtime.KERAS3 else None):
            if model_file.preset_task is not None:
                model = _load_task_preset(keras, path, model_file, kwargs)
            else:
                model = keras.models.load_model(os.fspath(path), **kwargs)
    except BnfreezeError:
        raise
    except Exception as exc:
        raise _load_error(path, exc, model_file.config) from None
    return model


def _load_task_preset(
    keras: ModuleType, path: str | os.PathLike[str], model_file: Any, kwargs: dict[str, Any]
) -> Any:
    """A keras-hub task's preset folder, loaded as ``keras_hub.models.<Task>.from_preset``
    loads it (``keras.models.load_model`` would read its backbone only): the class named by
    ``task.json``, its ``from_preset`` in safe mode with the caller's custom objects.
    keras-hub compiles a task when it builds it, so ``compile`` changes nothing here."""
    from keras.src.saving.serialization_lib import SafeModeScope

    try:
        importlib.import_module("keras_hub")  # registers the keras_hub> classes
    except Exception as exc:
        raise ModelFormatError(
            f"{path}: a keras-hub task's preset folder, and keras_hub cannot be imported "
            f"({type(exc).__name__}: {one_line(exc)}).",
            hint="Install keras-hub (pip install keras-hub), or read the files alone with "
            "bnfreeze inspect --from-file.",
        ) from None
    config = model_file.config
    with keras.saving.custom_object_scope(kwargs["custom_objects"] or {}):
        task = keras.saving.get_registered_object(
            str(config.get("registered_name") or config["class_name"])
        )
        if task is None or not hasattr(task, "from_preset"):
            raise ModelFormatError(
                f"{path}: task.json names {model_file.preset_task}, which is not a keras-hub "
                "task class this keras_hub knows."
            )
        with SafeModeScope(kwargs["safe_mode"]):
            return task.from_preset(os.fspath(path))


@contextlib.contextmanager
def _fresh_names(keras: ModuleType | None) -> Iterator[None]:
    """Keras's generated-name counters (``keras.src.utils.naming``) as in a fresh process
    inside the block, and the process's own again after it."""
    state = None
    if keras is not None:
        with contextlib.suppress(ImportError):
            from keras.src.backend.common import global_state

            state = global_state
    if state is None:
        yield
        return
    import collections

    saved = state.get_global_attribute("object_name_uids")
    state.set_global_attribute("object_name_uids", collections.defaultdict(int))
    try:
        yield
    finally:
        state.set_global_attribute("object_name_uids", saved)


def keras_hub_objects(
    keras: ModuleType, model_file: Any, given: dict[str, Any] | None
) -> dict[str, Any]:
    """The keras-hub classes a file needs, so it loads as ``keras_hub`` users load it.

    A ``.keras`` file names them ``keras_hub>ResNetBackbone``, which Keras resolves once
    keras-hub is imported (importing it registers them). A legacy ``.h5`` keeps only the bare
    class name (``DenseNetBackbone``), which Keras cannot resolve without ``custom_objects``:
    such names are looked up in ``keras_hub.models`` and ``keras_hub.layers``. keras-hub is
    imported only when the file needs it, and nothing happens when it is not installed.
    """
    from bnfreeze.model.hub import keras_hub

    wanted: set[str] = set()

    def visit(node: Any, depth: int) -> None:
        if depth > 64:
            return
        if isinstance(node, dict):
            name = node.get("class_name")
            if isinstance(name, str) and isinstance(node.get("config"), dict):
                wanted.add(name)
            for value in node.values():
                visit(value, depth + 1)
        elif isinstance(node, list):
            for item in node:
                visit(item, depth + 1)

    if getattr(keras, "__name__", "") != "keras":  # tf_keras: keras-hub is Keras 3 only
        return {}
    visit(model_file.config, 0)
    known = given or {}
    modules = [getattr(keras, m, None) for m in ("layers", "models", "ops")] + [keras]
    unknown = {
        name
        for name in wanted
        if name not in known and not any(hasattr(m, name) for m in modules if m is not None)
    }
    if keras_hub(model_file) is None and not unknown:
        return {}
    try:
        import keras_hub as hub  # type: ignore[import-untyped]
    except Exception:
        return {}
    found: dict[str, Any] = {}
    for name in sorted(unknown):
        for module in (hub.models, hub.layers):
            value = getattr(module, name, None)
            if isinstance(value, type):
                found[name] = value
                break
    return found


def _load_error(path: Any, exc: Exception, config: Any) -> BnfreezeError:
    text = one_line(exc)
    if "safe_mode" in text or "unsafe_deserialization" in text:
        return UnsafeModelError(
            f"{path}: Keras refused to load it in safe mode: it holds Python code "
            "(a Lambda layer or similar).",
            hint=f"If you trust the file, pass {UNSAFE_OPTION}.",
        )
    custom = sorted(_custom_classes(config))
    if custom and any(
        s in text for s in ("Could not locate", "Unknown layer", "could not be deserialized")
    ):
        return ModelFormatError(
            f"{path}: Keras cannot rebuild the custom class(es) {', '.join(custom[:5])}.",
            hint=f"Pass the module or .py file that defines them: "
            f"{CUSTOM_OBJECTS_OPTION} my_layers.py.",
        )
    return ModelFormatError(f"{path}: Keras could not load the model: {type(exc).__name__}: {text}")


def _custom_classes(config: Any) -> set[str]:
    from bnfreeze.model.walk import is_builtin

    found: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            named = isinstance(node.get("class_name"), str) and "config" in node
            if named and not is_builtin(node):
                found.add(str(node.get("registered_name") or node["class_name"]))
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit(config)
    return found
