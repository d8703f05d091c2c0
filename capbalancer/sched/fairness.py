"""Fair shedding across request sizes: under overload every prompt-size class loses the same share.

Goodput admission refuses what cannot start in time, and a long prompt is the first to fail that test: it
needs more KV room and a longer prefill, so left alone an overloaded fleet serves a cheaper mix (measured on a
KV-short fleet at 2x: 75% of short prompts within the SLO, 35% of long ones). Users of a long-context
application see that as an outage. So by default the hold queue is fair across size classes:

* each request falls in a class by prompt length (powers of two from 1,024 tokens: < 1k, 1-2k, 2-4k, ...);
* per class, time-decayed counts of requests that arrived and requests that started (were dispatched);
* a class served less than the best-served one by more than `margin` is *under-served*: its requests go ahead
  of the others in the hold queue and are not refused on the queue's drain estimate (they will be first);
* a class served more than the worst-served one by more than `margin` is *over-served*: while the pool is
  backlogged its newcomers are refused (429) at once, which leaves the room to the others.

`fair_shedding: 0` keeps the cost-weighted behaviour (whatever is cheapest to serve in time is served), which
gives the most goodput. Pure and clock-driven: every input carries its time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SMALLEST_LONG_PROMPT_TOKENS = 1024  # class 0 is every prompt below this; each class above doubles it
MAX_CLASS = 5  # 32k tokens and longer share one class
DEFAULT_MARGIN = 0.05
DEFAULT_RAMP = 0.1


@dataclass(slots=True)
class _ClassCounts:
    arrived: float = 0.0  # time-decayed counts
    started: float = 0.0
    at_s: float = 0.0  # when they were last decayed

    def decay_to(self, now: float, window_s: float) -> None:
        dt = now - self.at_s
        if dt > 0:
            k = math.exp(-dt / window_s)
            self.arrived *= k
            self.started *= k
            self.at_s = now


@dataclass(slots=True)
class FairShare:
    margin: float = DEFAULT_MARGIN  # service ratios this close count as equal (no action)
    window_s: float = 30.0  # time constant of the decayed counts: long enough to span a burst
    min_arrivals: float = 8.0  # a class judged on fewer (decayed) arrivals is left alone
    ramp: float = DEFAULT_RAMP  # past the margin by this much, every over-served newcomer is shed
    classes: dict[int, _ClassCounts] = field(default_factory=dict)
    shed_credit: float = 0.0

    @staticmethod
    def size_class(prompt_tokens: int) -> int:
        if prompt_tokens < SMALLEST_LONG_PROMPT_TOKENS:
            return 0
        return min(MAX_CLASS, 1 + int(math.log2(prompt_tokens / SMALLEST_LONG_PROMPT_TOKENS)))

    def _counts(self, prompt_tokens: int, now: float) -> _ClassCounts:
        c = self.size_class(prompt_tokens)
        counts = self.classes.get(c)
        if counts is None:
            counts = self.classes[c] = _ClassCounts(at_s=now)
        counts.decay_to(now, self.window_s)
        return counts

    def on_arrival(self, prompt_tokens: int, now: float) -> None:
        self._counts(prompt_tokens, now).arrived += 1.0

    def on_start(self, prompt_tokens: int, now: float) -> None:
        self._counts(prompt_tokens, now).started += 1.0

    def _ratios(self, now: float) -> dict[int, float]:
        out = {}
        for c, counts in self.classes.items():
            counts.decay_to(now, self.window_s)
            if counts.arrived >= self.min_arrivals:
                out[c] = min(1.0, counts.started / counts.arrived)
        return out

    def standing(self, prompt_tokens: int, now: float) -> int:
        """-1: its class is under-served (goes first); +1: over-served (shed while backlogged); 0: neither."""
        ratios = self._ratios(now)
        mine = ratios.get(self.size_class(prompt_tokens))
        if mine is None or len(ratios) < 2:
            return 0
        if mine < max(ratios.values()) - self.margin:
            return -1
        if mine > min(ratios.values()) + self.margin:
            return 1
        return 0

    def any_under_served(self, now: float) -> bool:
        """Whether some class is under-served now: its newcomers skip the queue (the front door must let the
        scheduler judge them, server/overload.py)."""
        ratios = self._ratios(now)
        return len(ratios) >= 2 and min(ratios.values()) < max(ratios.values()) - self.margin

    def should_shed(self, prompt_tokens: int, now: float) -> bool:
        """Whether to refuse this over-served newcomer: a share of them that grows with how far its class is
        ahead of the worst-served one (all of them `ramp` past the margin), spread evenly by a running credit
        rather than drawn at random. Shedding every one at once overshoots: the room it frees takes a while to
        reach the under-served class, and meanwhile its own ratio falls below theirs (levelling down)."""
        ratios = self._ratios(now)
        mine = ratios.get(self.size_class(prompt_tokens))
        if mine is None or len(ratios) < 2:
            return False
        excess = mine - min(ratios.values()) - self.margin
        if excess <= 0:
            return False
        self.shed_credit += min(1.0, excess / self.ramp)
        if self.shed_credit >= 1.0:
            self.shed_credit -= 1.0
            return True
        return False

    def describe(self, now: float) -> dict[str, float]:
        """Service ratio per class (for /admin and benches): key = the class's smallest prompt, in tokens."""
        return {str(0 if c == 0 else SMALLEST_LONG_PROMPT_TOKENS << (c - 1)): round(r, 3)
                for c, r in sorted(self._ratios(now).items())}
