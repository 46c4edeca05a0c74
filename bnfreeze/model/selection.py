"""Layer selection: which layers a freeze, an unfreeze or a plan rule applies to.

Selectors work on the walk's layer paths (``backbone/block_1_expand_BN``) and names, in the
model's layer order. A container is never selected alone: selecting it selects every layer
below it, because a container's own flag does not propagate when Keras loads a saved model
(docs/semantics.md, rule 6); every affected leaf has to be edited.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence

from bnfreeze.errors import SelectionError
from bnfreeze.model.records import LayerKind, LayerRecord


def is_leaf(record: LayerRecord) -> bool:
    """A layer whose own flag can be edited: not a container, a wrapper or an InputLayer."""
    return record.kind not in (LayerKind.CONTAINER, LayerKind.WRAPPER, LayerKind.INPUT)


def find_layer(layers: Sequence[LayerRecord], spec: str) -> LayerRecord:
    """The layer named by an exact path, or else by a name that is unique in the model."""
    for record in layers:
        if record.path == spec:
            return record
    by_name = [r for r in layers if r.name == spec]
    if len(by_name) == 1:
        return by_name[0]
    if len(by_name) > 1:
        paths = ", ".join(r.path for r in by_name[:5])
        raise SelectionError(f"layer name {spec!r} is ambiguous: {paths}.", hint="Use a full path.")
    candidates = difflib.get_close_matches(
        spec, list(dict.fromkeys([r.path for r in layers] + [r.name for r in layers])), n=3
    )
    hint = (
        f"Did you mean {', '.join(repr(c) for c in candidates)}?"
        if candidates
        else ("Run bnfreeze inspect --all to list layer paths.")
    )
    raise SelectionError(f"no layer named {spec!r} in the model.", hint=hint)


def _covered(layers: Sequence[LayerRecord], hits: set[str]) -> set[str]:
    """Paths hit directly, plus every layer below a hit container."""
    prefixes = tuple(p + "/" for p in hits)
    return {r.path for r in layers if r.path in hits or r.path.startswith(prefixes)}


def match_glob(layers: Sequence[LayerRecord], pattern: str) -> set[str]:
    """Paths matched by a glob on the path or the name, expanded below containers."""
    hits = {
        r.path
        for r in layers
        if fnmatch.fnmatchcase(r.path, pattern) or fnmatch.fnmatchcase(r.name, pattern)
    }
    return _covered(layers, hits)


def layers_up_to(layers: Sequence[LayerRecord], spec: str) -> set[str]:
    """Every layer before ``spec`` in model order, ``spec`` itself and everything below it."""
    target = find_layer(layers, spec)
    paths = [r.path for r in layers]
    end = paths.index(target.path)
    below = _covered(layers, {target.path})
    last = max(paths.index(p) for p in below)
    return set(paths[: max(end, last) + 1])


def layers_from(layers: Sequence[LayerRecord], spec: str) -> set[str]:
    """``spec``, everything below it and every layer after it in model order."""
    target = find_layer(layers, spec)
    paths = [r.path for r in layers]
    return set(paths[paths.index(target.path) :])


def select(
    records: Sequence[LayerRecord],
    *,
    layers: Sequence[str] = (),
    up_to: str | None = None,
    from_: str | None = None,
) -> tuple[LayerRecord, ...]:
    """The leaves chosen by all the given selectors together (their intersection).

    With no selector at all, every leaf is chosen. Each glob must match something, and the
    result must not be empty: a selection that matches nothing is an error, not a silent
    success.
    """
    chosen = {r.path for r in records}
    if layers:
        matched: set[str] = set()
        for pattern in layers:
            hit = match_glob(records, pattern)
            if not hit:
                raise SelectionError(
                    f"--layers {pattern!r} matches no layer path or name.",
                    hint="Run bnfreeze inspect --all to list layer paths.",
                )
            matched |= hit
        chosen &= matched
    if up_to is not None:
        chosen &= layers_up_to(records, up_to)
    if from_ is not None:
        chosen &= layers_from(records, from_)
    result = tuple(r for r in records if r.path in chosen and is_leaf(r))
    if not result:
        raise SelectionError("the selection matches no layer whose flag can be set.")
    return result
