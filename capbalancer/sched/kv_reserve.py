"""How much of its requests' remaining KV growth a backend keeps free, learned online from the engine itself.

`capacity` admits a request only while the KV in use, plus a share (`kv_growth_reserve`, 0.5 by default) of
the growth its requests in flight are still expected to add, stays under the watermark. Requests finish at
different times, so their final sizes are never all held at once; how much of the growth ever is held depends
on how staggered the batch is and how wide the output lengths spread, which no constant knows. Fixed at 0.5, a
long-generation batch ran at ~70% of the size vLLM reaches (0.91x the KV-aware baselines' throughput on a
KV-short fleet), while 0.15 reached 1.01x with a few hundred preemptions.

So each backend scales the configured share by a factor learned from its snapshots (AIMD on the engine's
preemption counter): while the backend refuses requests for KV (the reserve is what binds) and has not
preempted for a while, the factor creeps down; when the counter moves it backs off (x1.1 + 0.01, at most every
5 s: one storm spans several snapshots). The reserve thus settles near where the engine starts to preempt, per
backend, for the traffic it really gets: a few preemptions a minute, which cost less than a smaller batch
(measured: throughput at saturation 1.00-1.01x the best baseline with half its preemptions). An engine that
reports no preemption counter keeps the configured share.
Pure: it moves only on the snapshots it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

SCALE_MIN = 0.0  # down to no reserve at all, where the engine never preempts for it
SCALE_MAX = 2.0  # nor above the whole of it
CREEP_PER_S = 0.02  # while KV-bound and quiet: from 1.0 to 0 in 50 s, about as slow as a batch's growth shows
BACK_OFF = 1.1  # on new preemptions (a few hundred in a long-generation run cost less than a smaller batch)
BACK_OFF_ADD = 0.01  # and this much more, so that a factor crept down to 0 comes back
BACK_OFF_EVERY_S = 5.0  # at most once in this long: one storm spans several snapshots
QUIET_AFTER_BACK_OFF_S = 10.0  # no creeping down this soon after backing off


@dataclass(slots=True)
class KvReserveScale:
    scale: float = 1.0
    last_preemptions: int | None = None
    last_at_s: float | None = None
    last_back_off_s: float = float("-inf")
    backoffs: int = 0  # times it backed off (for /admin and tests)
    # Set by the capacity model when this backend refused a request for KV since the last snapshot: the
    # reserve, not the batch's size or a latency objective, is what limits it.
    memory_bound: bool = False

    def observe(self, preemptions_total: int | None, now: float) -> None:
        """A new snapshot of the engine: back off on new preemptions, else creep down while KV-bound."""
        bound, self.memory_bound = self.memory_bound, False
        if preemptions_total is None:
            return
        last, self.last_preemptions = self.last_preemptions, preemptions_total
        last_at, self.last_at_s = self.last_at_s, now
        if last is None or last_at is None or preemptions_total < last:  # first snapshot, or a restart
            return
        if preemptions_total > last:
            if now - self.last_back_off_s >= BACK_OFF_EVERY_S:
                self.scale = min(SCALE_MAX, self.scale * BACK_OFF + BACK_OFF_ADD)
                self.last_back_off_s = now
                self.backoffs += 1
        elif bound and now - self.last_back_off_s >= QUIET_AFTER_BACK_OFF_S:
            self.scale = max(SCALE_MIN, self.scale - CREEP_PER_S * (now - last_at))

    def reserve(self, configured: float) -> float:
        """The share of remaining growth to keep free: the configured one scaled, never above all of it."""
        r = configured * self.scale
        return r if r < 1.0 else 1.0
