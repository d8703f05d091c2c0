"""Outlier ejection (Envoy-style), under every policy: a backend that keeps failing leaves the pool for a while.

Health polls miss the engines that hurt most: one whose `/health` says 200 while every request gets a 500,
or one that accepts requests and never answers. What the relay sees of real requests is the evidence here:

* each 5xx, timeout (first byte, stream idle, total, and the scheduler's first-token timer) or connect failure
  counts one failure; any answer below 500 resets the count (a 4xx is the client's fault, not the backend's);
* `consecutive_failures` in a row eject the backend for `base_ejection_s`, doubled at every ejection that
  follows without a success in between, up to `max_ejection_s`;
* at most `max_ejected_fraction` of a pool is ejected at once (rounded down, so a pool of one never loses its
  only backend): ejection must not turn a partial failure into a total one;
* when its time is up the backend is back on probation: it takes one request at a time, the first success ends
  the probation, and the first failure ejects it again at once (with the doubled time).

Pure and clock-driven like the rest of sched/: every call takes `now`, nothing reads a clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class OutlierSettings:
    consecutive_failures: int = 5  # failures in a row that eject a backend (0: never eject)
    base_ejection_s: float = 30.0  # the first ejection; each one after it, with no success between, doubles
    max_ejection_s: float = 300.0
    max_ejected_fraction: float = 0.5  # of a pool's backends, at most this many ejected at once (rounded down)
    # First-token timer: a request with no first token after max(min, factor × its predicted TTFT), capped at
    # max, is evidence against its backend at once, without waiting for the relay's first-byte timeout (60 s).
    first_token_timeout_min_s: float = 5.0
    first_token_timeout_factor: float = 5.0
    first_token_timeout_max_s: float = 30.0

    def first_token_timeout_s(self, predicted_ttft_s: float | None) -> float:
        predicted = predicted_ttft_s if predicted_ttft_s is not None and predicted_ttft_s > 0 else 0.0
        return min(self.first_token_timeout_max_s,
                   max(self.first_token_timeout_min_s, self.first_token_timeout_factor * predicted))


@dataclass(slots=True)
class OutlierRecord:
    consecutive_failures: int = 0
    ejections_in_a_row: int = 0  # ejections with no success between them: the backoff's exponent
    ejected_until_s: float | None = None
    probation: bool = False  # re-admitted, no success yet: one failure ejects again
    ejected_total: int = 0
    last_reason: str = ""


@dataclass(slots=True)
class OutlierDetector:
    settings: OutlierSettings = field(default_factory=OutlierSettings)
    records: dict[str, OutlierRecord] = field(default_factory=dict)

    def record(self, backend_id: str) -> OutlierRecord:
        rec = self.records.get(backend_id)
        if rec is None:
            rec = self.records[backend_id] = OutlierRecord()
        return rec

    def forget(self, backend_id: str) -> None:
        self.records.pop(backend_id, None)

    # --- evidence ------------------------------------------------------------------------------
    def on_success(self, backend_id: str, now: float) -> None:
        rec = self.records.get(backend_id)
        if rec is None:
            return
        rec.consecutive_failures = 0
        if rec.ejected_until_s is None:
            # A success outside an ejection ends the probation and the backoff: the backend is well again.
            rec.probation = False
            rec.ejections_in_a_row = 0

    def on_failure(self, backend_id: str, now: float, pool_members: Iterable[str], reason: str = "") -> bool:
        """Count one failure; True when it ejects the backend now. `pool_members`: the ids of its pool."""
        rec = self.record(backend_id)
        rec.last_reason = reason
        if self.ejected(backend_id, now):
            return False  # a request sent before the ejection ended late: already counted out
        rec.consecutive_failures += 1
        threshold = self.settings.consecutive_failures
        if threshold <= 0:
            return False
        if not (rec.probation or rec.consecutive_failures >= threshold):
            return False
        members = list(pool_members)
        allowed = math.floor(len(members) * self.settings.max_ejected_fraction + 1e-9)
        others_out = sum(1 for m in members if m != backend_id and self.ejected(m, now))
        if others_out + 1 > allowed:
            return False  # the pool keeps its minimum: this one stays, its failures keep counting
        duration = min(self.settings.max_ejection_s, self.settings.base_ejection_s * (2 ** rec.ejections_in_a_row))
        rec.ejections_in_a_row += 1
        rec.ejected_total += 1
        rec.ejected_until_s = now + duration
        rec.consecutive_failures = 0
        rec.probation = False
        return True

    # --- views -------------------------------------------------------------------------------------
    def ejected(self, backend_id: str, now: float) -> bool:
        """Ejected now. An ejection whose time is up turns into probation here (the clock moves only by calls)."""
        rec = self.records.get(backend_id)
        if rec is None or rec.ejected_until_s is None:
            return False
        if now < rec.ejected_until_s:
            return True
        rec.ejected_until_s = None
        rec.probation = True
        rec.consecutive_failures = 0
        return False

    def blocks(self, backend_id: str, now: float, inflight: int) -> bool:
        """Whether a new request may not go to this backend now: ejected, or on probation with a trial running."""
        rec = self.records.get(backend_id)
        if rec is None:
            return False
        if self.ejected(backend_id, now):
            return True
        return rec.probation and inflight > 0

    def next_readmission_s(self) -> float | None:
        times = [r.ejected_until_s for r in self.records.values() if r.ejected_until_s is not None]
        return min(times) if times else None

    def describe(self, backend_id: str, now: float) -> dict[str, object]:
        rec = self.records.get(backend_id) or OutlierRecord()
        ejected = self.ejected(backend_id, now)
        return {
            "ejected": ejected,
            "ejected_for_s": round(rec.ejected_until_s - now, 3) if ejected and rec.ejected_until_s else 0.0,
            "probation": rec.probation,
            "consecutive_failures": rec.consecutive_failures,
            "ejected_total": rec.ejected_total,
            "last_failure": rec.last_reason or None,
        }
