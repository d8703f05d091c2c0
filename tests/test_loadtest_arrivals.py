"""The arrival generator: mean rate and dispersion as vllm bench serve defines them."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from capbalancer.loadtest.arrivals import arrival_times_s, inter_arrival_gaps_s


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gaps_have_mean_one_over_rate_and_cv_one_over_sqrt_burstiness(burstiness: float):
    rate = 8.0
    gaps = np.array(list(itertools.islice(inter_arrival_gaps_s(rate, burstiness, seed=3), 40_000)))
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    cv = gaps.std() / gaps.mean()
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_poisson_counts_have_variance_equal_to_mean():
    # A Poisson process: counts per unit window have variance ≈ mean (dispersion index 1).
    times = np.array(list(itertools.takewhile(lambda t: t < 2000.0, arrival_times_s(5.0, 1.0, seed=1))))
    counts = np.histogram(times, bins=np.arange(0, 2001, 1.0))[0]
    assert counts.mean() == pytest.approx(5.0, rel=0.05)
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.15)


def test_seeded_and_independent_of_anything_else():
    a = list(itertools.islice(arrival_times_s(3.0, 0.5, seed=7), 50))
    b = list(itertools.islice(arrival_times_s(3.0, 0.5, seed=7), 50))
    c = list(itertools.islice(arrival_times_s(3.0, 0.5, seed=8), 50))
    assert a == b and a != c
    assert a[0] == 0.0 and all(y >= x for x, y in zip(a, a[1:], strict=False))


def test_infinite_rate_sends_everything_at_once_and_bad_values_are_refused():
    assert list(itertools.islice(arrival_times_s(math.inf), 5)) == [0.0] * 5
    with pytest.raises(ValueError):
        next(inter_arrival_gaps_s(0.0))
    with pytest.raises(ValueError):
        next(inter_arrival_gaps_s(1.0, burstiness=0.0))
