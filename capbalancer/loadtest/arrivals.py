"""When requests are sent: Poisson or gamma arrivals at a mean rate, all at once, or replayed from a trace.

Same convention as `vllm bench serve`: inter-arrival gaps are gamma distributed with shape `burstiness`
and mean `1/rate`. burstiness 1 is a Poisson process; below 1 arrivals bunch up, above 1 they even out.
The gaps' coefficient of variation is 1/sqrt(burstiness).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator


def inter_arrival_gaps_s(rate_per_s: float, burstiness: float = 1.0, seed: int = 0) -> Iterator[float]:
    """An endless, seeded stream of gaps between consecutive requests, in seconds (0 for rate inf)."""
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if rate_per_s <= 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {rate_per_s}")
    if math.isinf(rate_per_s):
        while True:
            yield 0.0
    # A generator of its own, so drawing workload lengths does not shift the arrival times: two runs with
    # the same seed send the same requests at the same moments whatever else differs.
    rng = random.Random(f"arrivals-{seed}")
    theta = 1.0 / (rate_per_s * burstiness)
    while True:
        yield rng.gammavariate(burstiness, theta)


def arrival_times_s(rate_per_s: float, burstiness: float = 1.0, seed: int = 0) -> Iterator[float]:
    """Send times after the start of the run; the first request goes at 0."""
    t = 0.0
    gaps = inter_arrival_gaps_s(rate_per_s, burstiness, seed)
    while True:
        yield t
        t += next(gaps)
