"""The one line `des` ends with: did the fleet keep up, and which policy served best.

"Kept up" means at least KEPT_UP_FRACTION of the requests completed within the SLO (the bench's usual
criterion for the highest rate a policy sustains).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

KEPT_UP_FRACTION = 0.90


def _attainment(summary: dict[str, Any]) -> float:
    value = summary.get("slo_attainment")
    return float(value) if value is not None else 0.0


def verdict(results: Sequence[Any], slo_text: str, load_text: str) -> str:
    """`results`: DesResult objects (policy, summary). `load_text`: how the rate relates to the fleet."""
    rows = [(r.policy, _attainment(r.summary), r.summary.get("request_goodput") or 0.0) for r in results]
    if not rows:
        return "verdict: nothing ran"
    best = max(rows, key=lambda row: row[2])
    kept = [p for p, att, _ in rows if att >= KEPT_UP_FRACTION]
    within = ", ".join(f"{p} {att:.0%}" for p, att, _ in rows)
    if len(rows) == 1:
        state = "keeps up" if kept else "does not keep up (overloaded for this SLO: lower the rate or add instances)"
        return f"verdict: {load_text}, {rows[0][0]} {state}: {within} of requests within the SLO ({slo_text})"
    others = [g for p, _, g in rows if p != best[0]]
    ratio = f", {best[2] / max(others):.2f}x the next best" if others and max(others) > 0 else ""
    keeps = f"{', '.join(kept)} keep{'s' if len(kept) == 1 else ''} up" if kept else "no policy keeps up"
    return (f"verdict: {load_text}, {keeps} (within the SLO {slo_text}: {within}); best goodput "
            f"{best[0]} {best[2]:.2f} req/s{ratio}")
