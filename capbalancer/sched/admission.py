"""Admission for goodput: when a request that no backend can take now may wait, and when it is refused.

Users measure goodput (requests that meet their TTFT objective), not completions. So a request is held only
while it can still start in time: its TTFT objective runs from its arrival (time held counts), the hold ends
when what is left of it is less than the fastest idle backend's TTFT, and a request the queue ahead cannot
clear in time is refused at once with 429 + Retry-After instead of being served late. Pure and clock-driven.
"""

from __future__ import annotations

from dataclasses import dataclass

DRAIN_WINDOW_S = 2.0  # a drain rate is only trusted once measured over this much backlogged time


@dataclass(slots=True)
class DrainRate:
    """How fast held requests leave the queue for a backend, measured only while there is a backlog.

    The window starts when the queue stops being empty, never at the scheduler's epoch: a window that began
    at clock 0 on a live proxy (a monotonic clock reads thousands of seconds) once measured ~0.2 releases/s
    for a pool draining 200/s and refused every newcomer. Until one window has passed there is no estimate
    and nobody is refused on it: a false refusal loses a request that would have met its objective.
    """

    rate_per_s: float | None = None
    window_start_s: float | None = None
    window_count: int = 0

    def on_backlog(self, now: float) -> None:
        """A request joins an empty queue: a backlog (and a measuring window) starts."""
        if self.window_start_s is None:
            self.window_start_s = now
            self.window_count = 0

    def on_release(self, now: float) -> None:
        if self.window_start_s is None:
            self.window_start_s = now
        self.window_count += 1
        elapsed = now - self.window_start_s
        if elapsed >= DRAIN_WINDOW_S:
            rate = self.window_count / elapsed
            prev = self.rate_per_s
            self.rate_per_s = rate if prev is None else 0.5 * prev + 0.5 * rate
            self.window_start_s = now
            self.window_count = 0

    def on_empty(self) -> None:
        """No queue, no congestion: the next backlog is judged afresh."""
        self.rate_per_s = None
        self.window_start_s = None
        self.window_count = 0

    def wait_s(self, ahead: int) -> float | None:
        """Expected seconds until a request with `ahead` requests in front of it leaves the queue."""
        rate = self.rate_per_s
        if rate is None or rate <= 0:
            return None
        return (ahead + 1) / rate


def derived_objective_s(idle_ttft_s: float, factor: float, floor_s: float) -> float | None:
    """The default TTFT objective of a request whose user set none: max(floor, factor x its idle TTFT).
    None when factor is 0 (goodput defaults off: hold until the hold timeout, as before)."""
    if factor <= 0:
        return None
    return max(floor_s, factor * idle_ttft_s)
