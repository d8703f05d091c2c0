"""Whether a held request should wait for the backend that holds its prefix rather than go where room is now.

A request held at the proxy leaves the queue the moment some backend has room. Under saturation that backend is
whichever frees a seat first, rarely the one holding the request's prefix, so released conversations lose their
cache and recompute it (measured, bench/prefix.py at 3x load on the Hels pair: 28% of turns moved backend under
`capacity` against 10% under llm_d). The answer comes from the same cost model, never a pin: the holder's
predicted end-to-end time, counting the wait until enough of its running requests finish to make room, against
the best backend with room now (whose score already carries the prefill it would recompute and the stall it
causes there). The request waits only when the holder wins and the wait still leaves time, past its TTFT
deadline, to fall back to that backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from capbalancer.sched.backend import BackendState
from capbalancer.sched.capacity import CapacityModel
from capbalancer.sched.types import Demand


@dataclass(frozen=True, slots=True)
class HolderWait:
    wait_s: float  # until the holder is predicted to have room for the request
    ttft_s: float  # the request's TTFT there, the wait included
    e2e_s: float  # its routing score there (predicted end-to-end seconds), the wait included


def holder_wait(model: CapacityModel, holder: BackendState, demand: Demand, expected_output_tokens: int,
                now: float) -> HolderWait | None:
    """What `demand` would see on `holder` (which has no room now) once room frees there; None when nothing runs
    there to free it."""
    est = model.estimate(holder, demand, expected_output_tokens, now)
    running = min(est.seqs_after - 1, est.seats)
    if running <= 0 or est.tpot_s <= 0:
        return None
    # Running requests finish at about `running` per (expected output x TPOT) seconds, one at a time.
    per_finish_s = max(1, expected_output_tokens) * est.tpot_s / running
    seats_short = max(0, est.seqs_after - est.seats)
    kv_short = 0
    if est.kv_capacity_tokens is not None and est.seqs_after > 0:
        excess = est.kv_projected_tokens - est.kv_capacity_tokens * model.settings.kv_high_watermark
        if excess > 0:
            kv_short = math.ceil(excess / max(1.0, est.kv_projected_tokens / est.seqs_after))
    # No room now means at least one request must finish first, even when only the TPOT objective says no.
    wait_s = max(1, seats_short, kv_short) * per_finish_s
    # The estimate already counts a wait for a seat (seats_short of them, at the seats' rate): replace it.
    counted_s = seats_short * max(1, expected_output_tokens) * est.tpot_s / max(1, est.seats)
    extra_s = wait_s - counted_s if wait_s > counted_s else 0.0
    return HolderWait(wait_s=wait_s, ttft_s=est.ttft_s + extra_s,
                      e2e_s=est.e2e_s + model.settings.ttft_weight * extra_s)


def should_wait(model: CapacityModel, holder: BackendState, best: BackendState, best_score_s: float,
                demand: Demand, expected_output_tokens: int, now: float) -> bool:
    """True when `demand` is better off waiting for `holder` than starting on `best` now, and the wait leaves
    time to start on `best` after all before the deadline."""
    w = holder_wait(model, holder, demand, expected_output_tokens, now)
    if w is None or w.e2e_s >= best_score_s:
        return False
    if demand.deadline_s is None:
        return True
    fallback_ttft_s = model.estimate(best, demand, expected_output_tokens, now).ttft_s
    return now + w.wait_s + max(w.ttft_s - w.wait_s, fallback_ttft_s) <= demand.deadline_s
