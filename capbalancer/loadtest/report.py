"""Print a run like `vllm bench serve` does, and write it as JSON.

JSON document (`--json OUT`), schema "capbalancer.loadtest/1":

    {
      "schema": "capbalancer.loadtest/1",
      "started_at": "2026-11-21T18:00:00+00:00",    # UTC, when the run began
      "duration_s": 12.3,                            # first send to last completion
      "stopped_by": "num_requests" | "duration" | "workload",
      "config": {url, api, model, endpoint, request_rate ("inf" or req/s), burstiness, max_concurrency,
                 num_requests, duration_s, seed, ignore_eos, temperature, request_timeout_s, trace_speed,
                 slo {ttft_ms?, tpot_ms?, e2el_ms?}, percentiles [..], workload {kind, ...}, label},
      "summary": {completed, failed, duration_s, total_input_tokens, total_output_tokens,
                  request_throughput (req/s), output_throughput (tok/s), total_token_throughput (tok/s),
                  request_goodput (req/s, null without an SLO), good_requests?, slo_attainment?,
                  max_concurrent_requests,
                  {mean,median,std,pNN}_{ttft,tpot,itl,e2el}_ms},
      "errors": {"http_503": 2, "timeout": 1, ...},
      "backends": {"<x-capbalancer-backend>": {requests, share, completed, output_tokens, mean_ttft_ms,
                   p99_ttft_ms, mean_tpot_ms, good_requests?}},     # empty without the proxy's header
      "timeline": {t_s [..], requests_per_s [..], output_tokens_per_s [..]},   # 1 s bins
      "requests": [{index, start_s, prompt_len, max_tokens, success, status, error, error_detail,
                    ttft_s, tpot_s, e2el_s, itl_s [..], output_tokens, output_tokens_source
                    ("usage" | "details" | "events"), prompt_tokens, backend}, ...]
    }

Times in per-request records are seconds; summary latencies are milliseconds (as vllm's).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from capbalancer.loadtest.runner import LoadtestResult
from capbalancer.loadtest.stats import LATENCY_METRICS, latency_samples, throughput_timeline

SCHEMA = "capbalancer.loadtest/1"

SUMMARY_KEYS = ("completed", "failed", "duration_s", "total_input_tokens", "total_output_tokens",
                "request_throughput", "output_throughput", "total_token_throughput", "request_goodput",
                "max_concurrent_requests")
RECORD_KEYS = ("index", "start_s", "prompt_len", "max_tokens", "success", "status", "error", "error_detail",
               "ttft_s", "tpot_s", "e2el_s", "itl_s", "output_tokens", "output_tokens_source",
               "prompt_tokens", "backend")


def result_document(result: LoadtestResult) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "started_at": result.started_at,
        "duration_s": result.duration_s,
        "stopped_by": result.stopped_by,
        "config": result.config,
        "summary": result.summary,
        "errors": result.errors,
        "backends": result.backends,
        "timeline": throughput_timeline(result.records),
        "requests": [r.to_dict() for r in result.records],
    }


def _json_safe(value: Any) -> Any:
    # JSON has no NaN; a metric with no samples is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_json(result: LoadtestResult, path: str | Path) -> None:
    Path(path).write_text(json.dumps(_json_safe(result_document(result)), indent=1))


def check_document(doc: Any) -> list[str]:
    """Problems with a document against the schema above (empty when it conforms)."""
    problems: list[str] = []
    if not isinstance(doc, dict):
        return ["document is not an object"]
    if doc.get("schema") != SCHEMA:
        problems.append(f"schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    for key, kind in (("started_at", str), ("duration_s", (int, float)), ("stopped_by", str),
                      ("config", dict), ("summary", dict), ("errors", dict), ("backends", dict),
                      ("timeline", dict), ("requests", list)):
        if not isinstance(doc.get(key), kind):
            problems.append(f"{key}: missing or not {kind}")
    summary = doc.get("summary") if isinstance(doc.get("summary"), dict) else {}
    for key in SUMMARY_KEYS:
        if key not in summary:
            problems.append(f"summary.{key}: missing")
    pcts = (doc.get("config") or {}).get("percentiles", [])
    for metric in LATENCY_METRICS:
        for stat in ("mean", "median", "std", *(f"p{int(p) if float(p).is_integer() else p}" for p in pcts)):
            if f"{stat}_{metric}_ms" not in summary:
                problems.append(f"summary.{stat}_{metric}_ms: missing")
    for i, rec in enumerate(doc.get("requests") or []):
        missing = [k for k in RECORD_KEYS if k not in rec]
        if missing:
            problems.append(f"requests[{i}]: missing {', '.join(missing)}")
            break
    return problems


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def format_report(result: LoadtestResult) -> str:
    s = result.summary
    width = 50
    lines = [f"{' Load test result ' + (result.label or ''):=^{width}}"]

    def row(name: str, value: Any, digits: int = 2) -> None:
        lines.append(f"{name:<38}{_fmt(value, digits):>12}")

    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    if result.summary.get("max_concurrent_requests") is not None:
        row("Maximum requests in flight:", s["max_concurrent_requests"])
    row("Benchmark duration (s):", s["duration_s"])
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", s["request_throughput"])
    if s.get("request_goodput") is not None:
        row("Request goodput (req/s):", s["request_goodput"])
        row("SLO attainment (%):", 100.0 * s.get("slo_attainment", 0.0))
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total token throughput (tok/s):", s["total_token_throughput"])
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    pcts = result.config.get("percentiles", [])
    # The JSON keeps vllm's 0 for a metric with no samples (a fixed shape); printed, that would read as a
    # measured 0.00 ms, so a metric nothing measured shows "-".
    measured = {m: bool(v) for m, v in latency_samples(result.records).items()}
    if s["completed"] == 0:
        lines.append("No request succeeded: no latency was measured.")
    for metric in LATENCY_METRICS:
        lines.append(f"{titles[metric]:-^{width}}")

        def stat(key: str, metric: str = metric) -> Any:
            return s[key] if measured[metric] else None

        row(f"Mean {metric.upper()} (ms):", stat(f"mean_{metric}_ms"))
        row(f"Median {metric.upper()} (ms):", stat(f"median_{metric}_ms"))
        for p in pcts:
            if p == 50:
                continue  # the median, printed above
            label = int(p) if float(p).is_integer() else p
            row(f"P{label} {metric.upper()} (ms):", stat(f"p{label}_{metric}_ms"))
    if result.errors:
        lines.append(f"{'Errors':-^{width}}")
        for kind, count in result.errors.items():
            row(f"{kind}:", count)
        first = next((r for r in result.records if r.error), None)
        if first is not None and first.error_detail:
            lines.append(f"  first: {first.error_detail[:200]}")
    if result.backends:
        lines.append(f"{'Per backend (x-capbalancer-backend)':-^{width}}")
        for name, b in result.backends.items():
            lines.append(f"{name:<24}{b['requests']:>6} req {100 * b['share']:>5.1f}%  "
                         f"TTFT {_fmt(b['mean_ttft_ms'], 0):>6} ms")
    lines.append("=" * width)
    return "\n".join(lines)
