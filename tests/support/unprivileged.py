"""Run test code as user ``nobody``, so that the kernel, not a mock, refuses what this user
may not do. The suite runs as root in CI, and root ignores permission bits.

The code runs in a forked child that drops root for ``nobody`` (65534). That child cannot
import anything new (the interpreter lives under root's home here): the parent imports the
modules first, by running the same code once as root (see each test's warm-up). When the
suite does not run as root, the code runs in this process: an ordinary user is refused by the
kernel already.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

NOBODY = 65534

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def call_as_nobody(fn: Callable[[], Any]) -> tuple[str, Any]:
    """``fn()`` as user ``nobody``: ``("ok", its result)`` or ``("raised", (exception class
    name, str(exception)))``. The result must pickle."""
    if not running_as_root():
        return _outcome(fn)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            payload = _outcome(fn)
            os.write(write_end, pickle.dumps(payload))
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    if not chunks:
        raise AssertionError("the child running as nobody failed before it could answer")
    return pickle.loads(b"".join(chunks))


def _outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except Exception as exc:
        return "raised", (type(exc).__name__, str(exc))


def as_nobody(args: list[str], env: dict[str, str | None] | None = None) -> tuple[int, str, str]:
    """The CLI with ``args``, as user ``nobody``: (exit code, stdout, stderr). A traceback, if
    any, is appended to stderr."""
    from bnfreeze.cli import cli

    def run() -> str:
        result = CliRunner().invoke(cli, args, env=env)
        payload = [result.exit_code, result.stdout, result.stderr]
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            payload[2] += "Traceback: " + "".join(traceback.format_exception(result.exception))
        return json.dumps(payload)

    state, value = call_as_nobody(run)
    assert state == "ok", value
    exit_code, stdout, stderr = json.loads(value)
    return exit_code, stdout, stderr


@contextlib.contextmanager
def open_folder() -> Iterator[Path]:
    """A folder user ``nobody`` can enter and write (pytest's own tmp folders are root-only)."""
    with tempfile.TemporaryDirectory(prefix="bnfreeze-nobody-") as name:
        folder = Path(name)
        folder.chmod(0o777)
        yield folder
