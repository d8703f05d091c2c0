"""Summary statistics of a run, with the names `vllm bench serve` uses where the meaning is the same.

- request_throughput: completed requests / duration; output_throughput: output tokens / duration;
  total_token_throughput: (prompt + output tokens) / duration. The duration runs from the first send to
  the last completion.
- ttft_ms, tpot_ms, itl_ms, e2el_ms: mean, median, std and percentiles (numpy's linear interpolation, as
  vllm). TPOT of a request is (e2e - ttft) / (output_tokens - 1), defined for requests with 2+ tokens;
  ITL pools the gaps between text events of all requests.
- request_goodput: completed requests that met every SLO given, per second of duration (DistServe's
  definition, as `--goodput` in vllm); a one-token request has TPOT 0 for this check, as in vllm.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from capbalancer.loadtest.client import RequestRecord

DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass(frozen=True, slots=True)
class Slo:
    """Service-level objectives in milliseconds; None means not checked."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @property
    def empty(self) -> bool:
        return self.ttft_ms is None and self.tpot_ms is None and self.e2el_ms is None

    def met_by(self, record: RequestRecord) -> bool:
        if not record.success:
            return False
        if self.ttft_ms is not None and (record.ttft_s is None or record.ttft_s * 1e3 > self.ttft_ms):
            return False
        if self.tpot_ms is not None and (record.tpot_s or 0.0) * 1e3 > self.tpot_ms:
            return False
        if self.e2el_ms is not None and (record.e2el_s is None or record.e2el_s * 1e3 > self.e2el_ms):
            return False
        return True

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in (("ttft_ms", self.ttft_ms), ("tpot_ms", self.tpot_ms),
                                  ("e2el_ms", self.e2el_ms)) if v is not None}


def parse_slo(text: str) -> Slo:
    """`ttft=500,tpot=50,e2e=10000` (milliseconds; `e2el` is accepted for `e2e`, `:` for `=`)."""
    values: dict[str, float] = {}
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.replace(":", "=").partition("=")
        key = {"e2e": "e2el"}.get(key.strip().lower(), key.strip().lower())
        if not sep or key not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"SLO {part!r}: expected ttft=MS, tpot=MS or e2e=MS")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"SLO {part!r}: {value!r} is not a number of milliseconds") from None
        if ms <= 0:
            raise ValueError(f"SLO {part!r}: must be > 0 ms")
        values[f"{key}_ms"] = ms
    return Slo(**values)


def distribution_ms(values_s: Sequence[float], name: str,
                    percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, float]:
    """mean/median/std/pXX of a list of seconds, in milliseconds, keyed like vllm (`p99_ttft_ms`)."""
    out: dict[str, float] = {}
    if len(values_s) == 0:
        arr = np.zeros(1)  # vllm reports 0 for an empty metric; keeps the JSON shape fixed
    else:
        arr = np.asarray(values_s, dtype=float) * 1e3
    out[f"mean_{name}_ms"] = float(np.mean(arr))
    out[f"median_{name}_ms"] = float(np.median(arr))
    out[f"std_{name}_ms"] = float(np.std(arr))
    for p in percentiles:
        out[f"p{_pct_label(p)}_{name}_ms"] = float(np.percentile(arr, p))
    return out


def _pct_label(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def latency_samples(records: Iterable[RequestRecord]) -> dict[str, list[float]]:
    """Per-metric samples in seconds, from successful requests only."""
    out: dict[str, list[float]] = {m: [] for m in LATENCY_METRICS}
    for r in records:
        if not r.success:
            continue
        if r.ttft_s is not None:
            out["ttft"].append(r.ttft_s)
        tpot = r.tpot_s
        if tpot is not None:
            out["tpot"].append(tpot)
        out["itl"].extend(r.itl_s)
        if r.e2el_s is not None:
            out["e2el"].append(r.e2el_s)
    return out


def summarize(records: Sequence[RequestRecord], duration_s: float, slo: Slo | None = None,
              percentiles: Sequence[float] = DEFAULT_PERCENTILES,
              max_concurrent_requests: int | None = None) -> dict[str, float | int | None]:
    ok = [r for r in records if r.success]
    duration = max(duration_s, 1e-9)
    total_input = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    summary: dict[str, float | int | None] = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
        "max_concurrent_requests": max_concurrent_requests,
    }
    if slo is not None and not slo.empty:
        good = sum(1 for r in ok if slo.met_by(r))
        summary["good_requests"] = good
        summary["request_goodput"] = good / duration
        summary["slo_attainment"] = good / len(records) if records else 0.0
    else:
        summary["request_goodput"] = None
    samples = latency_samples(records)
    for name in LATENCY_METRICS:
        summary.update(distribution_ms(samples[name], name, percentiles))
    return summary


def errors_by_kind(records: Iterable[RequestRecord]) -> dict[str, int]:
    return dict(sorted(Counter(r.error for r in records if r.error is not None).items()))


def backend_shares(records: Sequence[RequestRecord], slo: Slo | None = None) -> dict[str, dict[str, float]]:
    """Requests per backend named by the proxy's header, with each one's share and latency."""
    named = [r for r in records if r.backend is not None]
    if not named:
        return {}
    out: dict[str, dict[str, float]] = {}
    for backend in sorted({r.backend for r in named if r.backend is not None}):
        mine = [r for r in named if r.backend == backend]
        ok = [r for r in mine if r.success]
        ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
        tpots = [t for t in (r.tpot_s for r in ok) if t is not None]
        row: dict[str, float] = {
            "requests": len(mine),
            "share": len(mine) / len(named),
            "completed": len(ok),
            "output_tokens": sum(r.output_tokens for r in ok),
            "mean_ttft_ms": float(np.mean(ttfts) * 1e3) if ttfts else math.nan,
            "p99_ttft_ms": float(np.percentile(ttfts, 99) * 1e3) if ttfts else math.nan,
            "mean_tpot_ms": float(np.mean(tpots) * 1e3) if tpots else math.nan,
        }
        if slo is not None and not slo.empty:
            row["good_requests"] = sum(1 for r in ok if slo.met_by(r))
        out[backend] = row
    return out


def throughput_timeline(records: Sequence[RequestRecord], bin_s: float = 1.0) -> dict[str, list[float]]:
    """Completed requests/s and output tokens/s in bins of bin_s from the run's start (for plots)."""
    token_times: list[float] = []
    token_weights: list[float] = []
    done_times: list[float] = []
    for r in records:
        if not r.success or r.ttft_s is None or r.e2el_s is None:
            continue
        done_times.append(r.start_s + r.e2el_s)
        # Text events land at start + ttft + cumulative ITL; an event may carry several tokens, so each
        # event weighs output_tokens / events.
        t = r.start_s + r.ttft_s
        events = [t]
        for gap in r.itl_s:
            t += gap
            events.append(t)
        token_times.extend(events)
        token_weights.extend([r.output_tokens / len(events)] * len(events))
    if not done_times:
        return {"t_s": [], "requests_per_s": [], "output_tokens_per_s": []}
    nbins = max(1, int(math.ceil(max(done_times) / bin_s)))
    edges = np.arange(nbins + 1) * bin_s
    req_hist, _ = np.histogram(done_times, bins=edges)
    tok_hist, _ = np.histogram(token_times, bins=edges, weights=token_weights)
    return {
        "t_s": [float(e) for e in edges[:-1]],
        "requests_per_s": [float(v) / bin_s for v in req_hist],
        "output_tokens_per_s": [float(v) / bin_s for v in tok_hist],
    }
