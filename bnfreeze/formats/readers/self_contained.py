"""Read nothing outside the input: refuse HDF5 files that point at other files.

HDF5 lets a file borrow bytes or objects from elsewhere, and HDF5 then opens those files
itself, in C, whenever the object is read:

* **external raw storage** (a dataset whose values live in other files, "External Data
  Files" message, ``h5py``'s ``create_dataset(..., external=[...])``);
* **external links** (a link to an object in another HDF5 file, ``h5py.ExternalLink``);
* **virtual datasets** (a dataset mapped from datasets of other files,
  ``create_virtual_dataset``).

Keras never writes any of them, and a model file that uses one would make bnfreeze read a file
the user did not name (``/etc/passwd``, a sibling model). bnfreeze refuses such a file with
exit 2 before anything outside it is opened: the pure-Python reader
(:mod:`bnfreeze.formats.readers._hdf5`) sees them in the object headers and raises
:class:`~bnfreeze.formats.readers._hdf5.OutsideReference`; where h5py reads a file, this module
lists every link without following it (``H5Literate`` with link info) and opens each dataset
only to read its creation properties (``H5Dopen`` opens no outside file; measured with strace
on HDF5 1.14), before any value is read.
"""

from __future__ import annotations

from typing import Any

from bnfreeze.errors import ModelFormatError

HINT = (
    "Keras never writes these; bnfreeze reads nothing outside the file you name. Re-save "
    "the model with Keras (model.save) to get a self-contained file."
)


def refusal(source: str, member: str | None, where: str, what: str) -> ModelFormatError:
    """The error for a file that points outside itself (exit 2)."""
    inside = f"{member} " if member else ""
    return ModelFormatError(
        f"{source}: {inside}refers to data outside the file ({what} at {where}); "
        "refusing it, nothing outside it was read.",
        hint=HINT,
    )


#: Groups visited by the h5py check, at most (a guard against hard-link trees that double).
MAX_OBJECTS = 5_000_000


def outside_reference(h5: Any) -> tuple[str, str] | None:
    """``(HDF5 path, what)`` of the first object of the open ``h5py.File`` that points at
    another file, or None. Follows no external link and reads no dataset's values.

    Each group's links are listed one group at a time (``H5Literate``, with an explicit
    stack, no recursion: ``H5Lvisit`` builds every full path name and takes minutes on a
    file nested thousands of groups deep); each object is visited once, by address.
    """
    import h5py

    stack: list[tuple[str, Any]] = [("", h5.id)]
    seen: set[int] = {h5py.h5o.get_info(h5.id).addr}
    while stack:
        path, group = stack.pop()
        links: list[tuple[bytes, int]] = []
        group.links.iterate(lambda name, info, add=links.append: add((name, info.type)), info=True)
        for raw, kind in links:
            name = f"{path}/{raw.decode('utf-8', 'replace')}"
            if kind == h5py.h5l.TYPE_EXTERNAL:
                return name, "an external link"
            if kind not in (h5py.h5l.TYPE_HARD, h5py.h5l.TYPE_SOFT):
                return name, "a user-defined link"
            if kind != h5py.h5l.TYPE_HARD:
                continue  # a soft link names an object inside the file, visited by its own
            obj = h5py.h5o.open(group, raw)
            addr = h5py.h5o.get_info(obj).addr
            if addr in seen:
                continue
            seen.add(addr)
            if len(seen) > MAX_OBJECTS:
                raise ValueError(f"more than {MAX_OBJECTS} objects")
            if isinstance(obj, h5py.h5g.GroupID):
                stack.append((name, obj))
            elif isinstance(obj, h5py.h5d.DatasetID):
                plist = obj.get_create_plist()
                if plist.get_layout() == h5py.h5d.VIRTUAL:
                    return name, "a virtual dataset"
                if plist.get_external_count() > 0:
                    return name, "external raw storage"
    return None


def refuse_outside(h5: Any, source: str, member: str | None = None) -> None:
    """Raise :class:`ModelFormatError` when the open ``h5py.File`` points at another file."""
    found = outside_reference(h5)
    if found is not None:
        raise refusal(source, member, *found)
