"""``bnfreeze sync-bn``'s output: one line per BN layer rewritten, then a summary line."""

from __future__ import annotations

from bnfreeze.ops.sync import SyncChange, SyncResult


def _what(c: SyncChange) -> str:
    before = f"{c.class_before}(synchronized={c.synchronized_before})"
    if c.class_before == "SyncBatchNormalization":
        before = c.class_before
    return f"{c.path}: {before} -> {c.class_after}(synchronized={c.synchronized_after})"


def sync_lines(result: SyncResult) -> list[str]:
    """The changes (stdout) of a ``sync-bn`` run."""
    lines = [_what(c) for c in result.changes]
    n = len(result.changes)
    layers = f"{n} BN layer{'s' if n != 1 else ''}"
    if not n:
        wrote = f"; wrote {result.output} unchanged" if result.output else ""
        lines.append(
            "no change: every selected BN layer already has "
            f"synchronized={result.synchronized}{wrote}."
        )
    elif result.output is None:
        lines.append(f"{layers} would change (nothing written).")
    else:
        lines.append(f"{layers} changed; wrote {result.output} (weights as they were).")
    return lines
