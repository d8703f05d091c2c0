"""Prometheus text exposition, rendered by hand: cheaper than prometheus_client per instance, and the
exact series names and label shapes of each engine are what this package is about.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: a value lands in every bucket with le >= it)."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * len(self.bounds)  # per-bucket (non-cumulative), +Inf is `count`
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        i = bisect.bisect_left(self.bounds, value)
        if i < len(self.counts):
            self.counts[i] += times
        self.sum += value * times
        self.count += times


def fmt_labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    # Sorted, as prometheus_client writes them (tests/data/real/vllm-cpu-metrics*.txt).
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def fmt_value(v: float) -> str:
    if isinstance(v, bool):
        return "1.0" if v else "0.0"
    return repr(float(v))


class Exposition:
    """Builds one /metrics body."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, doc: str, value: float, labels: dict[str, str] | None = None) -> None:
        self.header(name, kind, doc)
        self.sample(name, value, labels)

    def header(self, name: str, kind: str, doc: str) -> None:
        # The full sample name, `_total` included, as a real vLLM 0.32 writes it.
        self.lines.append(f"# HELP {name} {doc}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        self.lines.append(f"{name}{fmt_labels(labels or {})} {fmt_value(value)}")

    def histogram(self, name: str, doc: str, hist: Histogram, labels: dict[str, str] | None = None) -> None:
        labels = labels or {}
        self.header(name, "histogram", doc)
        cumulative = 0
        for bound, count in zip(hist.bounds, hist.counts, strict=True):
            cumulative += count
            self.sample(f"{name}_bucket", cumulative, {**labels, "le": _le(bound)})
        self.sample(f"{name}_bucket", hist.count, {**labels, "le": "+Inf"})
        self.sample(f"{name}_count", hist.count, labels)
        self.sample(f"{name}_sum", hist.sum, labels)

    def render(self) -> str:
        return "\n".join(self.lines) + "\n"


def _le(bound: float) -> str:
    return repr(float(bound))
