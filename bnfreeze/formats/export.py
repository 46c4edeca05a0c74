"""``--export report.svg|report.html``: save exactly what the terminal showed.

The CLI prints through a Rich console created with ``record=True``; this module turns the
recording into SVG or HTML with Rich's own exporters and writes it atomically (a temporary
file in the destination folder, then ``os.replace``), so an interrupted run never leaves a
half-written report.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from bnfreeze.errors import OutputError

FORMATS = {".svg": "svg", ".html": "html", ".htm": "html"}


def export_format(path: str | os.PathLike[str]) -> str:
    """``svg`` or ``html`` from the file name; anything else is an error (exit 2)."""
    suffix = Path(path).suffix.lower()
    try:
        return FORMATS[suffix]
    except KeyError:
        raise OutputError(
            f"--export {os.fspath(path)!r}: the file name must end in .svg or .html.",
        ) from None


def check_destination(
    path: str | os.PathLike[str], inputs: tuple[str | os.PathLike[str], ...] = ()
) -> None:
    """Fail before any work when the report could not be written, or would replace one of
    ``inputs`` (the models the command reads: ``inspect model.svg --export model.svg``) or a
    FIFO, device or socket. A symbolic link is followed, as for ``-o``."""
    from bnfreeze.formats.atomic import refuse_special, resolve_destination

    export_format(path)
    target = resolve_destination(Path(path))
    for model in inputs:
        if _same_file(target, Path(model)):
            raise OutputError(
                f"--export {os.fspath(path)!r} is the model file being read; refusing to "
                "overwrite it with the report. Nothing was written.",
                hint="Pick another name for the report.",
            )
    refuse_special(target, "--export ")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(
            f"--export {os.fspath(path)!r}: the folder {str(folder)!r} does not exist."
        )
    if target.is_dir():
        raise OutputError(f"--export {os.fspath(path)!r}: is a directory.")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"--export {os.fspath(path)!r}: the folder is not writable.")


def save_recording(console: Any, path: str | os.PathLike[str], title: str) -> None:
    """Write the console's recording as SVG or HTML, atomically."""
    kind = export_format(path)
    if kind == "svg":
        text = console.export_svg(title=title, clear=False)
    else:
        text = console.export_html(clear=False)
    write_text_atomic(path, text)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    from bnfreeze.formats.atomic import refuse_special, resolve_destination

    target = resolve_destination(Path(path))
    refuse_special(target, "--export ")
    folder = target.parent if str(target.parent) else Path(".")
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes 0600; a report is for sharing
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, target)
        tmp_name = None
    except OSError as exc:
        raise OutputError(
            f"--export {os.fspath(path)!r}: cannot be written ({exc.strerror or exc})."
        ) from None
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
