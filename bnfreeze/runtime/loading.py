"""The Keras engine: everything that imports TensorFlow or Keras goes through here.

``inspect`` reads files without Keras. The commands that must *run* a model (``verify``,
``explain``, and the in-memory Python API) use this module to:

* pick and import a runtime (:func:`keras_module`, :func:`runtime_info`): Keras 3 on the
  backend Keras itself resolves (``KERAS_BACKEND``, then ``keras.json``, then TensorFlow:
  :func:`configured_backend`), or Keras 2 (``tf_keras``) when the user asks and has it;
* load a saved model safely (:func:`load_model`): ``safe_mode=True`` always, a model whose
  config carries a Python ``lambda`` is refused with :class:`UnsafeModelError` unless the
  caller passes ``unsafe=True``, and custom classes come only from a module or file the user
  names (:func:`load_custom_objects`);
* keep TensorFlow's noise off stdout (:func:`quiet`), and show progress on stderr while
  Keras and its backend load and steps run (:func:`progress_on_stderr`).

Every function imports TensorFlow / Keras lazily, when called; importing this module is cheap.

Typical use::

    from bnfreeze.runtime import loading

    with loading.quiet():
        model = loading.load_model("model.keras")            # keras.Model, safe_mode=True
        model = loading.load_model("m.keras", unsafe=True)    # the user trusts the file
        objs = loading.load_custom_objects("my_layers.py")
        model = loading.load_model("m.keras", custom_objects=objs)
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import re
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from bnfreeze.errors import (
    BnfreezeError,
    ModelFormatError,
    RuntimeUnavailableError,
    UnsafeModelError,
)
from bnfreeze.model.records import Runtime

#: The option a user passes to load a model whose config carries Python code.
UNSAFE_OPTION = "--unsafe"
#: The option a user passes to name the module or file that defines custom classes.
CUSTOM_OBJECTS_OPTION = "--custom-objects"

ProgressFn = Callable[[str], None]


def no_progress(message: str) -> None:
    """A progress callback that shows nothing (the library's default)."""


# --------------------------------------------------------------------------- runtimes


@dataclass(frozen=True)
class RuntimeInfo:
    """Which Keras ran a measurement: shown by ``verify`` and ``explain``."""

    runtime: Runtime
    keras_version: str
    backend: str
    tensorflow_version: str | None  # when TensorFlow is imported, whatever the backend
    backend_version: str | None = None  # the backend package's version (JAX 0.10.2, ...)

    @property
    def label(self) -> str:
        """E.g. ``Keras 3.15.1, backend tensorflow (TensorFlow 2.21.0)`` or
        ``Keras 3.15.1, backend jax (JAX 0.10.2)``: the backend that ran, with its version."""
        text = f"Keras {self.keras_version}, backend {self.backend}"
        if self.backend == "tensorflow" and self.tensorflow_version:
            text += f" (TensorFlow {self.tensorflow_version})"
        elif self.backend_version:
            label = _BACKEND_PACKAGES.get(self.backend, (self.backend, self.backend))[1]
            text += f" ({label} {self.backend_version})"
        if self.runtime is Runtime.TF_KERAS:
            text = f"tf_keras: {text}"
        return text


#: The extra that installs Keras with each backend (``pip install 'bnfreeze[EXTRA]'``).
BACKEND_EXTRAS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
#: The package each Keras backend imports, and how a person names it.
_BACKEND_PACKAGES = {
    "tensorflow": ("tensorflow", "TensorFlow"),
    "jax": ("jax", "JAX"),
    "torch": ("torch", "PyTorch"),
    "numpy": ("numpy", "NumPy"),
    "openvino": ("openvino", "OpenVINO"),
}
#: What the commands that run Keras tell a user who has only bnfreeze's core.
INSTALL_KERAS_HINT = (
    "Install Keras with a backend: pip install 'bnfreeze[tensorflow]' (or bnfreeze[jax], "
    "bnfreeze[torch]; bnfreeze[keras] for Keras alone)."
)


@dataclass(frozen=True)
class BackendChoice:
    """The Keras 3 backend a process will load, resolved before importing Keras."""

    name: str  # "tensorflow", "jax", "torch", ...
    source: str  # "KERAS_BACKEND", a keras.json path, or "Keras's default"

    @property
    def label(self) -> str:
        """How a person names the backend: TensorFlow, JAX, PyTorch."""
        return _BACKEND_PACKAGES.get(self.name, (self.name, self.name))[1]


def keras_json_path() -> Path:
    """The ``keras.json`` Keras 3 reads: ``$KERAS_HOME/keras.json``, else
    ``~/.keras/keras.json`` (``/tmp/.keras`` when the home folder is not writable), as in
    ``keras/src/backend/config.py``."""
    if "KERAS_HOME" in os.environ:
        folder = os.environ.get("KERAS_HOME") or ""
    else:
        base = os.path.expanduser("~")
        if not os.access(base, os.W_OK):
            base = "/tmp"
        folder = os.path.join(base, ".keras")
    return Path(os.path.expanduser(os.path.join(folder, "keras.json")))


def configured_backend() -> BackendChoice:
    """The backend Keras 3 will pick, resolved exactly as Keras does: a non-empty
    ``KERAS_BACKEND`` variable, else the ``backend`` key of :func:`keras_json_path`, else
    ``tensorflow``. Reads a file; imports nothing. Once Keras is imported,
    ``keras.backend.backend()`` is the truth (:func:`runtime_info` reports that)."""
    keras = sys.modules.get("keras")
    if keras is not None:
        with contextlib.suppress(Exception):
            return BackendChoice(str(keras.backend.backend()), "the Keras already imported")
    variable = os.environ.get("KERAS_BACKEND")
    if variable:
        return BackendChoice(variable, "KERAS_BACKEND")
    path = keras_json_path()
    if path.exists():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
        backend = config.get("backend") if isinstance(config, dict) else None
        if isinstance(backend, str) and backend:
            return BackendChoice(backend, str(path))
    return BackendChoice("tensorflow", "Keras's default")


def loading_message(runtime: Runtime = Runtime.KERAS3) -> str:
    """The progress line shown while Keras imports, naming the backend that will load:
    ``loading Keras (JAX backend)``."""
    if runtime is Runtime.TF_KERAS:
        return "loading tf_keras (TensorFlow)"
    return f"loading Keras ({configured_backend().label} backend)"


def _installed(name: str) -> bool:
    """Whether ``import name`` can work, without importing it."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def require_runtime(runtime: Runtime) -> None:
    """Raise :class:`RuntimeUnavailableError` when ``runtime`` is not installed: tf_keras,
    or Keras 3 and the backend :func:`configured_backend` resolves.

    Cheap: it looks the packages up without importing them, so commands can fail fast, with
    one line naming what to install, before anything slow.
    """
    if runtime is Runtime.TF_KERAS:
        if not _installed("tf_keras"):
            raise RuntimeUnavailableError(
                "--runtime tf-keras needs the tf_keras package (Keras 2), which is not "
                "installed; bnfreeze does not depend on it.",
                hint="Install the tf_keras release that matches your TensorFlow "
                "(pip install tf_keras), or leave out --runtime to measure with Keras 3.",
            )
        return
    if not _installed("keras"):
        raise RuntimeUnavailableError(
            "this command runs the model with Keras, which is not installed (bnfreeze's core "
            "reads and edits files without it).",
            hint=INSTALL_KERAS_HINT,
        )
    choice = configured_backend()
    package, label = _BACKEND_PACKAGES.get(choice.name, (None, choice.name))
    if package is not None and not _installed(package):
        extra = BACKEND_EXTRAS.get(choice.name)
        how = f"pip install 'bnfreeze[{extra}]'" if extra else f"install {label}"
        others = sorted(b for b, (pkg, _) in _BACKEND_PACKAGES.items() if _installed(pkg))
        others = [b for b in others if b in BACKEND_EXTRAS and b != choice.name]
        switch = f", or pick an installed one: KERAS_BACKEND={others[0]}" if others else ""
        raise RuntimeUnavailableError(
            f"Keras is set to the {label} backend (by {choice.source}), which is not installed.",
            hint=f"Install it ({how}){switch}.",
        )


def is_compiled(model: Any) -> bool:
    """Whether a live model is compiled: Keras 3 says ``model.compiled``, tf_keras (Keras 2)
    only ``model._is_compiled``."""
    return bool(getattr(model, "compiled", False) or getattr(model, "_is_compiled", False))


def keras_module(runtime: Runtime = Runtime.KERAS3) -> ModuleType:
    """Import and return the Keras package for ``runtime`` (``keras`` or ``tf_keras``).

    Keras 3 runs on the backend the user configured, exactly as Keras resolves it
    (:func:`configured_backend`: ``KERAS_BACKEND``, then ``keras.json``); bnfreeze never sets
    it. TensorFlow's start-up messages are kept off stdout and stderr.
    """
    require_runtime(runtime)
    _quiet_environment()
    name = "tf_keras" if runtime is Runtime.TF_KERAS else "keras"
    if name in sys.modules:
        return sys.modules[name]
    with _native_output_captured() as captured:
        try:
            module = importlib.import_module(name)
            _silence_python_loggers()
        except Exception as exc:
            detail = captured().strip().splitlines()
            tail = f" ({detail[-1]})" if detail else ""
            raise RuntimeUnavailableError(
                f"importing {name} failed: {type(exc).__name__}: {_one_line(exc)}{tail}"
            ) from None
    return module


def _quiet_environment() -> None:
    """Defaults that must be in place before TensorFlow is first imported (by us or by a
    user's custom-objects module): C++ logs off below fatal errors. The backend is left to the
    user (``KERAS_BACKEND`` or ``keras.json``), as Keras itself does."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def runtime_info(runtime: Runtime = Runtime.KERAS3) -> RuntimeInfo:
    """The versions and backend of ``runtime`` (imports it)."""
    keras = keras_module(runtime)
    tf = sys.modules.get("tensorflow")
    backend = "tensorflow" if runtime is Runtime.TF_KERAS else str(keras.backend.backend())
    package = sys.modules.get(_BACKEND_PACKAGES.get(backend, (backend, ""))[0])
    version = getattr(package, "__version__", None)
    return RuntimeInfo(
        runtime=runtime,
        keras_version=str(getattr(keras, "__version__", "unknown")),
        backend=backend,
        tensorflow_version=str(tf.__version__) if tf is not None else None,
        backend_version=str(version) if version is not None else None,
    )


def _silence_python_loggers() -> None:
    import logging

    for name in ("tensorflow", "absl", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)


# --------------------------------------------------------------------------- output hygiene


@contextlib.contextmanager
def _native_output_captured() -> Iterator[Callable[[], str]]:
    """Send what C/C++ code writes to file descriptors 1 and 2 into a temporary file.

    TensorFlow's import prints absl/CUDA start-up lines from C++, below Python's
    ``sys.stdout``/``sys.stderr``. Yields a function returning what was captured, so a caller
    can show it when something fails.
    """
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved: list[tuple[int, int]] = []
        for fd in (1, 2):
            with contextlib.suppress(Exception):
                getattr(sys, "stdout" if fd == 1 else "stderr").flush()
            try:
                saved.append((fd, os.dup(fd)))
                os.dup2(sink.fileno(), fd)
            except OSError:  # no such descriptor (embedded interpreters): nothing to hide
                continue

        def read() -> str:
            sink.flush()
            sink.seek(0)
            return sink.read().decode("utf-8", "replace")

        try:
            yield read
        finally:
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep TensorFlow and Keras noise off stdout while the block runs.

    Inside the block, whatever Python or native code prints to stdout goes to stderr
    instead, so stdout stays clean for tables and JSON. TensorFlow and absl Python loggers
    are set to errors only. Keras warnings are left to the caller (``verify`` records them
    with :func:`warnings.catch_warnings` and reports them as notes).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    copy: int | None = None
    try:
        copy = os.dup(1)
        os.dup2(2, 1)
    except OSError:
        copy = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        if copy is not None:
            os.dup2(copy, 1)
            os.close(copy)


# --------------------------------------------------------------------------- progress


class _Spinner:
    """A one-line spinner with elapsed seconds, on a terminal's stderr.

    It writes to its own duplicate of the terminal's descriptor, so it keeps turning while
    :func:`keras_module` hides TensorFlow's native start-up output.
    """

    FRAMES = "|/-\\"

    def __init__(self, fd: int) -> None:
        self._out = os.fdopen(os.dup(fd), "w", encoding="utf-8", errors="replace")
        self._message = ""
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="bnfreeze-progress", daemon=True)
        self._thread.start()

    def update(self, message: str) -> None:
        with self._lock:
            self._message = message
            self._started = time.monotonic()

    def _draw(self, frame: str) -> None:
        with self._lock:
            if not self._message:
                return
            elapsed = time.monotonic() - self._started
            self._out.write(f"\r\x1b[2K{frame} {self._message} {elapsed:4.1f}s")
            self._out.flush()

    def _run(self) -> None:
        index = 0
        while not self._stop.wait(0.12):
            self._draw(self.FRAMES[index % len(self.FRAMES)])
            index += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        with self._lock:
            self._out.write("\r\x1b[2K")
            self._out.flush()
            self._out.close()


@contextlib.contextmanager
def progress_on_stderr(enabled: bool = True) -> Iterator[ProgressFn]:
    """Yield a progress callback that reports slow steps on stderr.

    On a terminal it is a spinner that rewrites one line and disappears at the end. Elsewhere
    (a pipe, CI, tests) each step is one plain line, ``bnfreeze: loading Keras (JAX backend)``, so
    logs show where time went. Nothing ever goes to stdout.
    """
    if not enabled:
        yield no_progress
        return
    stream = sys.stderr
    try:
        fd = stream.fileno()
        tty = os.isatty(fd)
    except (AttributeError, OSError, ValueError):
        fd, tty = -1, False
    if not tty:

        def line(message: str) -> None:
            print(f"bnfreeze: {message}", file=sys.stderr, flush=True)

        yield line
        return
    spinner = _Spinner(fd)
    try:
        yield spinner.update
    finally:
        spinner.close()


# --------------------------------------------------------------------------- safety


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


# --------------------------------------------------------------------------- custom objects


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
    _quiet_environment()
    with _native_output_captured():
        try:
            module = _import_user_module(spec)
        finally:
            if "tensorflow" in sys.modules:
                _silence_python_loggers()
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
            f"{type(exc).__name__}: {_one_line(exc)}"
        ) from None


# --------------------------------------------------------------------------- loading


def load_model(
    path: str | os.PathLike[str],
    *,
    unsafe: bool = False,
    custom_objects: dict[str, Any] | str | None = None,
    compile: bool = True,
    runtime: Runtime = Runtime.KERAS3,
    recorded_flags: bool = False,
    fresh_names: bool = False,
) -> Any:
    """Load a saved model with Keras and return the ``keras.Model``.

    * ``safe_mode=True`` unless ``unsafe``: a model whose config holds a Python ``lambda``
      raises :class:`UnsafeModelError`, naming ``--unsafe``, before Keras sees it.
    * ``custom_objects``: a dict of classes and functions, or the module / ``.py`` path
      :func:`load_custom_objects` takes; a model that needs custom classes it was not given
      raises :class:`ModelFormatError` naming ``--custom-objects``.
    * ``compile``: as in ``keras.models.load_model``.
    * ``recorded_flags``: set again the trainable flags bnfreeze recorded in the archive's
      ``bnfreeze.json`` (:mod:`bnfreeze.formats.recorded_flags`), as
      :func:`bnfreeze.load_model` does. Off by default: ``verify`` and ``explain`` measure
      what a plain ``keras.models.load_model`` gives.
    * ``fresh_names``: the layers that code builds without a name (keras-hub's DeepLabV3
      wraps its encoder in ``keras.Model(...)``) get the names Keras generates in a fresh
      process (``functional``, not ``functional_7``), so two loads in one process (inspect's
      and verify's) give the same paths; the process's own name counters are restored after.

    Any failure is a :class:`~bnfreeze.errors.BnfreezeError` with a one-line message. The
    file is only read. Call it inside :func:`quiet` to keep TensorFlow's noise off stdout.
    """
    from bnfreeze.formats.readers import read_model

    # Read the config ourselves first: bad files get bnfreeze's specific errors, and
    # unsafe content is refused before TensorFlow is even imported.
    model_file = read_model(path, weights=False)
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
            model = keras.models.load_model(os.fspath(path), **kwargs)
    except BnfreezeError:
        raise
    except Exception as exc:
        raise _load_error(path, exc, model_file.config) from None
    if recorded_flags and runtime is Runtime.KERAS3:
        from bnfreeze.formats import recorded_flags as member
        from bnfreeze.runtime import keras_engine

        recorded = member.read(path)
        if recorded is not None:
            keras_engine.apply_recorded(model, recorded, os.fspath(path))
    return model


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
    from bnfreeze.model.code_built import keras_hub

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
    text = _one_line(exc)
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


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """The first meaningful line of an exception, without Keras's config dumps."""
    text = str(exc).strip()
    first = text.split("\n\n", 1)[0]
    first = " ".join(first.split())
    if len(first) > limit:
        first = first[: limit - 3] + "..."
    return first or type(exc).__name__


@contextlib.contextmanager
def keras_warnings() -> Iterator[list[str]]:
    """Record the Python warnings Keras emits inside the block, deduplicated, one line each.

    Keras reports real problems this way (a saved optimizer that no longer matches, "The
    model does not have any trainable weights."), so callers show them rather than drop them.
    """
    collected: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield collected
        finally:
            seen: set[str] = set()
            for item in caught:
                if issubclass(item.category, DeprecationWarning):
                    continue
                line = " ".join(str(item.message).split())
                if line and line not in seen:
                    seen.add(line)
                    collected.append(line)
