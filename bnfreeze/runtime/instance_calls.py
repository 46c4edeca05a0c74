"""Replace some layers' ``call`` on the instance for the duration of a ``with`` block.

Three measurements watch or change what a BN layer does in a real call without touching its
class: which branch it took (:mod:`bnfreeze.runtime.branches`), the batch each call saw
(:mod:`bnfreeze.runtime.replicas`), and the batch statistics a recalibration averages
(:mod:`bnfreeze.runtime.recalibrate`). Each gives :func:`replaced_calls` the function that
makes a layer's new ``call``; this module sets it and restores the layer exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

#: ``make_call(path, layer)`` returns the function that becomes ``layer.call``.
MakeCall = Callable[[str, Any], Callable[..., Any]]


def distinct_layers(layers: Mapping[str, Any]) -> dict[str, Any]:
    """``layers`` (path -> layer) with each layer once, under the first path that names it: a
    layer shared by two paths is wrapped, and recorded, once."""
    first: dict[int, tuple[str, Any]] = {}
    for path, layer in layers.items():
        first.setdefault(id(layer), (path, layer))
    return dict(first.values())


@contextmanager
def replaced_calls(layers: Mapping[str, Any], make_call: MakeCall) -> Iterator[None]:
    """Set each distinct layer's ``call`` to ``make_call(path, layer)`` on the instance, and
    restore it on exit, whatever happens: an instance attribute it had is put back, one it
    did not have is deleted (the class's ``call`` shows through again).

    The attribute is set with ``object.__setattr__`` so that Keras's attribute tracking
    never sees it."""
    saved: list[tuple[Any, bool, Any]] = []
    try:
        for path, layer in distinct_layers(layers).items():
            call = make_call(path, layer)
            own = "call" in vars(layer)
            saved.append((layer, own, vars(layer).get("call")))
            object.__setattr__(layer, "call", call)
        yield
    finally:
        for layer, own, previous in reversed(saved):
            if own:
                object.__setattr__(layer, "call", previous)
            else:
                object.__delattr__(layer, "call")
