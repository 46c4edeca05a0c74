"""What each BN layer normalized over in a data-parallel step (``verify --replicas``), as
lines for a terminal: a header, one row per BN layer, then the problems."""

from __future__ import annotations

from bnfreeze.runtime.explain_replicas import ExplainReplicasReport
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


def explain_replicas_lines(report: ExplainReplicasReport) -> list[str]:
    """``explain --replicas N``: the slices' statistics, then what fit() did, per setting."""
    lines = [
        f"One BatchNormalization layer (gamma 2, beta 1, moving mean 0, moving variance 1), "
        f"one fit() step on {report.replicas} simulated devices ({report.backend}).",
        "Each replica's slice is shifted by 10, so the slices' means differ. Channel 0:",
        "",
    ]
    width = max(len(s.name) for s in report.slices)
    lines.append(f"{'statistics'.ljust(width)}  samples  mean     variance")
    for s in report.slices:
        lines.append(f"{s.name.ljust(width)}  {s.samples:<7}  {s.mean:<7.3f}  {s.variance:.3f}")
    lines.append("")
    for c in report.cases:
        head = f"{c.engine}, synchronized={c.synchronized}:"
        if c.refused is not None:
            lines.append(f"{head} refused by Keras ({c.refused})")
            continue
        normalized = c.normalized_with or "neither per-replica nor global statistics"
        lines.append(f"{head} normalized with {normalized} statistics")
        moving = c.moving_from or "none of the slices' or the global statistics"
        lines.append(
            f"  moving mean {c.moving_mean:.4f}, moving variance {c.moving_variance:.4f} after "
            f"the step: from {moving}"
        )
    return lines
