"""One discrete-event run as a table row, shared by the DES benchmarks (bench/policies.py, bench/gpu_share.py)."""

from __future__ import annotations

from typing import Any

from capbalancer.sim.des import DesResult


def des_row(result: DesResult) -> dict[str, Any]:
    """The summary figures every DES table shows: counts, throughput, goodput, TTFT/TPOT percentiles, preemptions."""
    s = result.summary
    return {
        "completed": s.get("completed"), "failed": s.get("failed"),
        "request_throughput": s.get("request_throughput"), "output_throughput": s.get("output_throughput"),
        "request_goodput": s.get("request_goodput"), "slo_attainment": s.get("slo_attainment"),
        "p50_ttft_ms": s.get("p50_ttft_ms"), "p99_ttft_ms": s.get("p99_ttft_ms"),
        "p50_tpot_ms": s.get("p50_tpot_ms"), "p99_tpot_ms": s.get("p99_tpot_ms"),
        "preemptions": s.get("preemptions"), "held": s.get("held"),
        "wall_s": result.wall_seconds,
    }


def steady_throughput(records: list[Any]) -> tuple[float, float]:
    """(output tokens/s, requests/s) between the 10th and 90th percentile completion: the saturated middle of a
    run, without the ramp-up or the drain (when only the slowest instance is still working)."""
    done = sorted((r.start_s + r.e2el_s, r.output_tokens) for r in records if r.success and r.e2el_s is not None)
    if len(done) < 10:
        return 0.0, 0.0
    lo, hi = done[len(done) // 10][0], done[(9 * len(done)) // 10 - 1][0]
    window = [tok for t, tok in done if lo < t <= hi]
    return (sum(window) / (hi - lo), len(window) / (hi - lo)) if hi > lo else (0.0, 0.0)
