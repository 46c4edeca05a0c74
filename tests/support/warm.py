"""Python scripts that use Keras, run in a fresh child of a warm interpreter.

Importing Keras with TensorFlow costs about 7 s of CPU on the suite's 2-core machine, and the
suite runs some thirty Keras scripts in their own processes (a fresh process is what a user
reloading a saved file has). :func:`run` runs such a script as ``subprocess.run`` would, but
in a child forked from an interpreter that has imported Keras and nothing else: a server per
run and per set of import-time variables (``KERAS_BACKEND``, ``TF_*``, ``JAX_*``, ...),
shared by the pytest-xdist workers through a Unix socket and started by the first worker that
needs it. The child gets the caller's argv, environment, working directory and ``sys.path``,
its own stdout and stderr, and its exit status; no model, layer or custom class exists in it
before the script runs, and bnfreeze is imported by the script itself.

Scripts that must not see Keras or TensorFlow already imported (a hidden TensorFlow, a
backend chosen by ``keras.json``) run in a real interpreter: :func:`run` falls back to
``subprocess.run`` for them, and whenever the suite has not configured a folder
(:func:`configure`), so a helper also runs on its own.

Run as a script, this module is the server: ``python warm.py SOCKET OWNER_PID``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Variables read when Keras, TensorFlow or JAX is imported: a child can only inherit them.
_IMPORT_TIME = ("KERAS_", "TF_", "JAX_", "XLA_", "CUDA_", "PYTHONHASHSEED")
#: Set by :func:`configure` (the suite's conftest): where the servers' sockets live.
_FOLDER: Path | None = None
#: In the server: the backend Keras was imported with.
_BACKEND = ""


def configure(folder: Path | None) -> None:
    global _FOLDER
    _FOLDER = folder


def _key(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in sorted(env.items()) if k.startswith(_IMPORT_TIME)}


def _eligible(argv: Sequence[str], env: Mapping[str, str]) -> bool:
    """A ``python SCRIPT``, ``python -c CODE`` or ``python -m MODULE`` command whose Keras
    backend is not chosen by a ``keras.json`` of its own, in a configured suite."""
    if _FOLDER is None or len(argv) < 2 or argv[0] != sys.executable or "KERAS_HOME" in env:
        return False
    return not argv[1].startswith("-") or (argv[1] in ("-c", "-m") and len(argv) >= 3)


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    capture_output: bool = True,
    text: bool = True,
    input: str | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run(argv, env=env, cwd=cwd, timeout=timeout, capture_output=True,
    text=text)`` for a ``python SCRIPT``, ``python -c CODE`` or ``python -m MODULE``
    command; only captured output is supported."""
    environment = dict(os.environ if env is None else env)
    if not capture_output or not _eligible(argv, environment):
        return subprocess.run(
            list(argv),
            env=environment,
            cwd=cwd,
            timeout=timeout,
            capture_output=capture_output,
            text=text,
            input=input,
            check=check,
        )
    server = _server(environment)
    with tempfile.TemporaryDirectory(prefix="warm-") as scratch:
        out, err, stdin = (Path(scratch) / name for name in ("out", "err", "in"))
        stdin.write_text(input or "", encoding="utf-8")
        out.touch()
        err.touch()
        request = {
            "argv": [str(a) for a in argv],
            "env": environment,
            "cwd": os.fspath(cwd) if cwd is not None else os.getcwd(),
            "stdin": str(stdin),
            "stdout": str(out),
            "stderr": str(err),
        }
        returncode = _call(server, request, timeout, argv)
        stdout, stderr = (p.read_bytes() for p in (out, err))
    if text:
        stdout, stderr = stdout.decode(), stderr.decode()  # type: ignore[assignment]
    done = subprocess.CompletedProcess(list(argv), returncode, stdout, stderr)
    if check:
        done.check_returncode()
    return done


def _call(server: Path, request: dict, timeout: float | None, argv: Sequence[str]) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(server))
        conn.sendall(json.dumps(request).encode() + b"\n")
        reader = conn.makefile("rb")
        pid = json.loads(reader.readline())["pid"]
        conn.settimeout(timeout)
        try:
            line = reader.readline()
        except TimeoutError:
            os.kill(pid, 9)
            raise subprocess.TimeoutExpired(list(argv), timeout or 0) from None
        if not line:
            raise RuntimeError(f"the warm interpreter's child {pid} ended without a status")
        return int(json.loads(line)["returncode"])


def _server(env: Mapping[str, str]) -> Path:
    """The socket of the server for ``env``'s import-time variables, started if needed."""
    from filelock import FileLock

    assert _FOLDER is not None
    key = _key(env)
    name = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]
    path = _FOLDER / f"warm-{name}.sock"
    with FileLock(_FOLDER / f"warm-{name}.lock"):
        if path.exists():
            return path
        owner = os.getppid() if os.environ.get("PYTEST_XDIST_WORKER") else os.getpid()
        server_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(_IMPORT_TIME)},
            **key,
        }
        log = open(_FOLDER / f"warm-{name}.log", "wb")  # noqa: SIM115 (the server keeps it)
        subprocess.Popen(
            [sys.executable, __file__, str(path), str(owner)],
            env=server_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 300
        while not path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the warm interpreter did not start: see {log.name}")
            time.sleep(0.05)
    return path


# ------------------------------------------------------------------------------ the server


def _serve(path: Path, owner: int) -> None:
    import signal

    import keras  # the point: children start with Keras imported

    global _BACKEND
    _BACKEND = keras.backend.backend()

    base_path = _base_sys_path()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ready = path.with_suffix(".starting")
    listener.bind(str(ready))
    listener.listen(64)
    listener.settimeout(1.0)
    os.replace(ready, path)  # the socket appears only once it accepts
    try:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                if not _alive(owner):
                    return
                continue
            if os.fork() == 0:
                listener.close()
                _child(conn, base_path)  # never returns
            conn.close()
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _base_sys_path() -> list[str]:
    """``sys.path`` without this script's folder and the server's ``PYTHONPATH``: what every
    interpreter here starts from."""
    own = set(filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    return [p for p in sys.path[1:] if p not in own]


def _child(conn: socket.socket, base_path: list[str]) -> None:
    import signal

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    reader = conn.makefile("rb")
    request = json.loads(reader.readline())
    conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
    code = 1
    try:
        code = _execute(request, base_path)
    finally:
        try:
            conn.sendall(json.dumps({"returncode": code}).encode() + b"\n")
        finally:
            os._exit(0)


def _execute(request: dict, base_path: list[str]) -> int:
    import atexit
    import runpy
    import traceback
    import types

    write = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for fd, name, mode in ((0, "stdin", os.O_RDONLY), (1, "stdout", write), (2, "stderr", write)):
        os.dup2(os.open(request[name], mode, 0o600), fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = request["argv"][1:]
    extra = list(filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    if argv[0] == "-c":
        first = ""
    elif argv[0] == "-m":
        first = os.getcwd()
    else:
        first = os.path.dirname(os.path.abspath(argv[0]))
    sys.path[:] = [first, *extra, *base_path]
    code = 0
    try:
        if argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            main = types.ModuleType("__main__")
            sys.modules["__main__"] = main
            exec(compile(argv[1], "<string>", "exec"), main.__dict__)
        elif argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    asked = os.environ.get("KERAS_BACKEND")
    if asked and asked != _BACKEND:
        # The script chose its backend itself, after Keras was imported here with another:
        # what it measured is not what it asked for. The caller must pass KERAS_BACKEND.
        print(f"warm: KERAS_BACKEND={asked} but Keras runs {_BACKEND}", file=sys.stderr)
        code = 97
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    return code


if __name__ == "__main__":
    _serve(Path(sys.argv[1]), int(sys.argv[2]))
