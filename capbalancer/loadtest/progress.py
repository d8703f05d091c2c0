"""A live tqdm bar on stderr for a running load test: completed, in flight, errors, current rate."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

from capbalancer.loadtest.runner import LiveCounters


class ProgressBar:
    """Callable progress hook. Shown only on a terminal (and not with --quiet): logs stay clean."""

    def __init__(self, total_requests: int | None, duration_s: float | None, label: str = "",
                 stream: TextIO | None = None, enabled: bool | None = None) -> None:
        stream = stream or sys.stderr
        if enabled is None:
            enabled = stream.isatty()
        self.enabled = enabled
        self._last_done = 0
        self._last_t = time.perf_counter()
        self._rate = 0.0
        self._bar: tqdm | None = None
        if enabled:
            # With only a duration, the bar counts requests without a total.
            self._bar = tqdm(total=total_requests, desc=label or "loadtest", unit="req", file=stream,
                             dynamic_ncols=True, leave=True, smoothing=0.1)
        self.duration_s = duration_s

    def __call__(self, counters: LiveCounters) -> None:
        if self._bar is None:
            return
        done = counters.completed + counters.failed
        now = time.perf_counter()
        if now - self._last_t >= 1.0:
            # An exponentially weighted rate of completions: what is happening now, not the run's mean.
            inst = (done - self._last_done) / (now - self._last_t)
            self._rate = inst if self._last_done == 0 else 0.7 * self._rate + 0.3 * inst
            self._last_done, self._last_t = done, now
        self._bar.n = done
        self._bar.set_postfix({"in_flight": counters.in_flight, "errors": counters.failed,
                               "req/s": f"{self._rate:.2f}"}, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
