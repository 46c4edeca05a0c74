"""Which writer rewrites a format: :func:`writer_for`, one import per format, on first use
(the writer modules import this package, so it cannot name them itself)."""

from __future__ import annotations

from bnfreeze.formats.writers import Writer
from bnfreeze.model.records import ModelFormat


def writer_for(fmt: ModelFormat) -> Writer | None:
    """The writer for ``fmt``, or None when bnfreeze does not rewrite that format. Each
    writer's module (and h5py, for the legacy format) is imported on first use."""
    if fmt is ModelFormat.KERAS:
        from bnfreeze.formats.writers import keras_zip

        return keras_zip.WRITER
    if fmt is ModelFormat.KERAS_DIR:  # written as a .keras archive (see that module)
        from bnfreeze.formats.writers import keras_dir

        return keras_dir.WRITER
    if fmt is ModelFormat.H5:
        from bnfreeze.formats.writers import legacy_h5

        return legacy_h5.WRITER
    return None
