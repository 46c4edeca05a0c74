"""What each BN layer normalized over in a data-parallel step (``verify --replicas``), as
lines for a terminal: a header, one row per BN layer, then the problems."""

from __future__ import annotations

from bnfreeze.runtime.replicas import ReplicaReport


def replica_lines(report: ReplicaReport) -> list[str]:
    setup = report.setup
    lines = [
        f"Engine     {setup.name} ({setup.replicas} replica{'s' if setup.replicas != 1 else ''})",
        f"Threshold  {report.min_samples} samples per BN in training mode",
        "",
    ]
    rows = [("path", "mode", "samples", "over", "synchronized", "moving stats from")]
    for b in report.layers:
        rows.append(
            (
                b.path,
                "training" if b.training else "inference",
                "-" if not b.training else ("?" if b.samples is None else str(b.samples)),
                b.statistics.value if b.training else "-",
                "yes" if b.synchronized else "no",
                b.moving.value if b.training else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("─" * (sum(widths) + 2 * (len(widths) - 1)))
    return lines
