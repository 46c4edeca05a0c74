"""The Keras environment: which runtime and backend a process uses, importing it quietly,
and progress on stderr while it loads. Everything that imports TensorFlow or Keras starts here.

* pick and import a runtime (:func:`keras_module`, :func:`runtime_info`): Keras 3 on the
  backend Keras itself resolves (``KERAS_BACKEND``, then ``keras.json``, then TensorFlow:
  :func:`configured_backend`), or Keras 2 (``tf_keras``) when the user asks and has it;
* keep TensorFlow's noise off stdout (:func:`quiet`), and show progress on stderr while
  Keras and its backend load and steps run (:func:`progress_on_stderr`).

Loading a saved model is :mod:`bnfreeze.runtime.loading`. Every function imports TensorFlow /
Keras lazily, when called; importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
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

from bnfreeze.errors import BnfreezeError, RuntimeUnavailableError
from bnfreeze.model.measured import BACKEND_PACKAGES, RuntimeInfo
from bnfreeze.model.records import Runtime

ProgressFn = Callable[[str], None]


def no_progress(message: str) -> None:
    """A progress callback that shows nothing (the library's default)."""


#: The extra that installs Keras with each backend (``pip install 'bnfreeze[EXTRA]'``).
BACKEND_EXTRAS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
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
        return BACKEND_PACKAGES.get(self.name, (self.name, self.name))[1]


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
            "this command needs Keras, which is not installed (bnfreeze's core reads and "
            "edits files without it).",
            hint=INSTALL_KERAS_HINT,
        )
    choice = configured_backend()
    package, label = BACKEND_PACKAGES.get(choice.name, (None, choice.name))
    if package is not None and not _installed(package):
        extra = BACKEND_EXTRAS.get(choice.name)
        how = f"pip install 'bnfreeze[{extra}]'" if extra else f"install {label}"
        others = sorted(b for b, (pkg, _) in BACKEND_PACKAGES.items() if _installed(pkg))
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


def recompile_model(model: Any) -> Any:
    """``bnfreeze.recompile``: compile ``model`` again with its own compile arguments and a
    fresh optimizer of the same class and settings."""
    optimizer = getattr(model, "optimizer", None)
    if not is_compiled(model) or optimizer is None:
        raise BnfreezeError(
            f"model {model.name!r} is not compiled; call compile() on it yourself.",
        )
    arguments = dict(getattr(getattr(model, "_compile_config", None), "config", {}) or {})
    if not arguments:
        raise BnfreezeError(
            f"model {model.name!r} does not record its compile() arguments; call compile() "
            "yourself."
        )
    arguments["optimizer"] = optimizer.__class__.from_config(optimizer.get_config())
    model.compile(**arguments)
    return model


def keras_module(runtime: Runtime = Runtime.KERAS3) -> ModuleType:
    """Import and return the Keras package for ``runtime`` (``keras`` or ``tf_keras``).

    Keras 3 runs on the backend the user configured, exactly as Keras resolves it
    (:func:`configured_backend`: ``KERAS_BACKEND``, then ``keras.json``); bnfreeze never sets
    it. TensorFlow's start-up messages are kept off stdout and stderr.
    """
    require_runtime(runtime)
    quiet_environment()
    name = "tf_keras" if runtime is Runtime.TF_KERAS else "keras"
    if name in sys.modules:
        return sys.modules[name]
    with native_output_captured() as captured:
        try:
            module = importlib.import_module(name)
            silence_python_loggers()
        except Exception as exc:
            detail = captured().strip().splitlines()
            tail = f" ({detail[-1]})" if detail else ""
            raise RuntimeUnavailableError(
                f"importing {name} failed: {type(exc).__name__}: {one_line(exc)}{tail}"
            ) from None
    return module


def quiet_environment() -> None:
    """Defaults that must be in place before TensorFlow is first imported (by us or by a
    user's custom-objects module): C++ logs off below fatal errors. The backend is left to the
    user (``KERAS_BACKEND`` or ``keras.json``), as Keras itself does."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def runtime_info(runtime: Runtime = Runtime.KERAS3) -> RuntimeInfo:
    """The versions and backend of ``runtime`` (imports it)."""
    keras = keras_module(runtime)
    tf = sys.modules.get("tensorflow")
    backend = "tensorflow" if runtime is Runtime.TF_KERAS else str(keras.backend.backend())
    package = sys.modules.get(BACKEND_PACKAGES.get(backend, (backend, ""))[0])
    version = getattr(package, "__version__", None)
    return RuntimeInfo(
        runtime=runtime,
        keras_version=str(getattr(keras, "__version__", "unknown")),
        backend=backend,
        tensorflow_version=str(tf.__version__) if tf is not None else None,
        backend_version=str(version) if version is not None else None,
    )


def silence_python_loggers() -> None:
    import logging

    for name in ("tensorflow", "absl", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)


@contextlib.contextmanager
def native_output_captured() -> Iterator[Callable[[], str]]:
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


def one_line(exc: BaseException, limit: int = 300) -> str:
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
