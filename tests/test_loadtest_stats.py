"""Load-test statistics against hand-computed cases."""

from __future__ import annotations

import pytest

from capbalancer.loadtest.client import RequestRecord
from capbalancer.loadtest.stats import (
    Slo,
    backend_shares,
    distribution_ms,
    errors_by_kind,
    parse_slo,
    summarize,
    throughput_timeline,
)


def rec(index: int, ttft_s: float, e2el_s: float, tokens: int, itl: list[float] | None = None,
        backend: str | None = None, start_s: float = 0.0, prompt_len: int = 10) -> RequestRecord:
    return RequestRecord(index=index, start_s=start_s, prompt_len=prompt_len, max_tokens=tokens, success=True,
                         status=200, ttft_s=ttft_s, e2el_s=e2el_s, itl_s=itl or [], output_tokens=tokens,
                         backend=backend)


def failed(index: int, kind: str) -> RequestRecord:
    return RequestRecord(index=index, start_s=0.0, prompt_len=10, max_tokens=5, error=kind)


def test_tpot_is_decode_time_over_tokens_after_the_first():
    r = rec(0, ttft_s=0.5, e2el_s=2.5, tokens=11)
    assert r.tpot_s == pytest.approx(0.2)  # (2.5 - 0.5) / (11 - 1)
    assert rec(1, 0.5, 0.5, tokens=1).tpot_s is None  # undefined for a single token


def test_percentiles_interpolate_linearly_like_numpy_and_vllm():
    # 1..10 ms: p50 = 5.5, p90 = 9.1, p99 = 9.91 (linear between order statistics)
    d = distribution_ms([i / 1000 for i in range(1, 11)], "ttft", (50, 90, 99))
    assert d["mean_ttft_ms"] == pytest.approx(5.5)
    assert d["median_ttft_ms"] == pytest.approx(5.5)
    assert d["p50_ttft_ms"] == pytest.approx(5.5)
    assert d["p90_ttft_ms"] == pytest.approx(9.1)
    assert d["p99_ttft_ms"] == pytest.approx(9.91)
    assert d["std_ttft_ms"] == pytest.approx(2.8722813, rel=1e-6)
    assert distribution_ms([], "itl", (99,))["p99_itl_ms"] == 0.0


def test_summary_throughput_goodput_and_itl_pooling():
    records = [
        rec(0, ttft_s=0.1, e2el_s=1.1, tokens=11, itl=[0.1] * 10, prompt_len=100),   # tpot 100 ms
        rec(1, ttft_s=0.3, e2el_s=2.3, tokens=11, itl=[0.2] * 10, prompt_len=100),   # tpot 200 ms
        rec(2, ttft_s=0.2, e2el_s=0.2, tokens=1, prompt_len=100),                    # tpot n/a
        failed(3, "timeout"),
    ]
    s = summarize(records, duration_s=4.0, slo=Slo(ttft_ms=250, tpot_ms=150), percentiles=(50,))
    assert s["completed"] == 3 and s["failed"] == 1
    assert s["total_input_tokens"] == 300 and s["total_output_tokens"] == 23
    assert s["request_throughput"] == pytest.approx(0.75)
    assert s["output_throughput"] == pytest.approx(23 / 4)
    assert s["total_token_throughput"] == pytest.approx(323 / 4)
    # request 0 meets both; 1 misses ttft and tpot; 2 meets ttft and has no tpot (counts as 0, as vllm)
    assert s["good_requests"] == 2
    assert s["request_goodput"] == pytest.approx(0.5)
    assert s["slo_attainment"] == pytest.approx(0.5)
    assert s["mean_tpot_ms"] == pytest.approx(150.0)
    assert s["mean_itl_ms"] == pytest.approx(150.0)  # 10 gaps of 100 ms and 10 of 200 ms
    assert s["mean_ttft_ms"] == pytest.approx(200.0)
    assert s["median_e2el_ms"] == pytest.approx(1100.0)
    assert summarize(records, 4.0)["request_goodput"] is None  # no SLO, no goodput


def test_slo_parsing_and_e2e_objective():
    slo = parse_slo("ttft=500, tpot:50,e2e=10000")
    assert slo == Slo(ttft_ms=500, tpot_ms=50, e2el_ms=10000)
    assert not Slo(e2el_ms=1000).met_by(rec(0, 0.1, 1.5, 5))
    assert Slo(e2el_ms=2000).met_by(rec(0, 0.1, 1.5, 5))
    assert not Slo(e2el_ms=2000).met_by(failed(1, "http_503"))
    for bad in ("ttft", "foo=3", "ttft=-1", "ttft=abc"):
        with pytest.raises(ValueError):
            parse_slo(bad)


def test_errors_and_backend_shares():
    records = [rec(0, 0.1, 1.0, 5, backend="fast"), rec(1, 0.3, 1.0, 5, backend="fast"),
               rec(2, 0.5, 2.0, 5, backend="slow"), failed(3, "http_503"), failed(4, "http_503"),
               failed(5, "timeout")]
    assert errors_by_kind(records) == {"http_503": 2, "timeout": 1}
    shares = backend_shares(records)
    assert shares["fast"]["requests"] == 2 and shares["fast"]["share"] == pytest.approx(2 / 3)
    assert shares["fast"]["mean_ttft_ms"] == pytest.approx(200.0)
    assert shares["slow"]["share"] == pytest.approx(1 / 3)
    assert backend_shares([rec(0, 0.1, 1.0, 5)]) == {}


def test_throughput_timeline_counts_tokens_where_they_were_generated():
    # One request: first token at 0.5 s, then 4 events 0.5 s apart (1.0, 1.5, 2.0, 2.5) -> done at 2.5 s.
    r = rec(0, ttft_s=0.5, e2el_s=2.5, tokens=10, itl=[0.5] * 4)  # 5 events carrying 2 tokens each
    t = throughput_timeline([r], bin_s=1.0)
    assert t["t_s"] == [0.0, 1.0, 2.0]
    assert t["output_tokens_per_s"] == pytest.approx([2.0, 4.0, 4.0])
    assert t["requests_per_s"] == [0.0, 0.0, 1.0]
