"""Markdown tables from the result files of bench/gpu/driver.py.

    python3 bench/gpu/summarize.py RES_DIR_OR_TAR [...]      (several: later files win for the same job)

Stdlib only (runs on the GPU machine too, where the driver calls it for $OUT/summary.md).
"""

from __future__ import annotations

import io
import json
import re
import sys
import tarfile
from pathlib import Path


def load_results(paths: list[str]) -> dict[str, dict]:
    """job name -> result document, from res/ folders or res-*.tar.gz archives."""
    out: dict[str, dict] = {}
    for p in paths:
        path = Path(p)
        if path.is_dir():
            d = path / "res" if (path / "res").is_dir() else path
            for f in sorted(d.glob("*.json")):
                out[f.stem] = json.loads(f.read_text())
        elif path.suffix in (".gz", ".tgz") or path.name.endswith(".tar.gz"):
            with tarfile.open(path) as tf:
                for m in tf.getmembers():
                    if m.isfile() and m.name.startswith("res/") and m.name.endswith(".json"):
                        out[Path(m.name).stem] = json.load(io.TextIOWrapper(tf.extractfile(m)))
    return out


def S(run: dict) -> dict:
    return (run.get("loadtest") or {}).get("summary") or {}


def f(v, d=1, pct=False):
    if v is None:
        return "–"
    if pct:
        return f"{100 * v:.1f}%"
    if isinstance(v, (int, float)):
        return f"{v:,.{d}f}"
    return str(v)


def instance_cols(doc: dict, key: str, fmt=lambda v: f"{v:.0f}") -> str:
    pi = doc.get("per_instance") or {}
    return "/".join(fmt(v.get(key, 0)) for v in pi.values())


def gauge_cols(doc: dict, key: str, fmt=lambda v: f"{v:.0f}") -> str:
    g = doc.get("gauges") or {}
    return "/".join("–" if v.get(key) is None else fmt(v[key]) for v in g.values())


def run_row(name: str, doc: dict, label: str, run: dict) -> str:
    s = S(run)
    return ("| " + " | ".join([
        name, doc.get("policy") or "direct", label,
        f(s.get("completed"), 0), f(s.get("request_throughput"), 2), f(s.get("output_throughput"), 0),
        f(s.get("request_goodput"), 2), f(s.get("slo_attainment"), pct=True),
        f(s.get("median_ttft_ms"), 0), f(s.get("p99_ttft_ms"), 0),
        f(s.get("median_tpot_ms"), 1), f(s.get("p99_tpot_ms"), 1),
        instance_cols(doc, "share", lambda v: f"{v:.2f}"),
        instance_cols(doc, "num_preemptions_total"),
        gauge_cols(doc, "num_requests_running_max"), gauge_cols(doc, "num_requests_waiting_max"),
        gauge_cols(doc, "kv_cache_usage_perc_max", lambda v: f"{100 * v:.0f}%"),
        prefix_hits(doc),
        str(run.get("rc")),
    ]) + " |")


HEADER = ("| job | policy | target | done | req/s | out tok/s | goodput req/s | SLO met | TTFT p50 ms | TTFT p99 ms "
          "| TPOT p50 ms | TPOT p99 ms | share A/B/C | preempt A/B/C | running max A/B/C | waiting max A/B/C "
          "| KV max A/B/C | prefix-cache hits | rc |")
SEP = "|" + "---|" * 3 + "---:|" * 10 + "---|" * 5 + "---:|---|"


def prefix_hits(doc: dict) -> str:
    """Share of prompt tokens vLLM found in its prefix cache during the run, all instances together."""
    pi = doc.get("per_instance") or {}
    q = sum(v.get("prefix_cache_queries_total", 0) for v in pi.values())
    h = sum(v.get("prefix_cache_hits_total", 0) for v in pi.values())
    return f"{100 * h / q:.0f}%" if q else "–"


def tables(results: dict[str, dict]) -> str:
    lines = []
    st = results.get("start")
    if st:
        lines.append(f"## Instances (mode {st.get('mode')}, layout {st.get('layout')}, started in {st.get('wall_s')} s)\n")
        lines.append("| instance | GPU | mem util | startup s | KV tokens | prefix caching |")
        lines.append("|---|---:|---:|---:|---:|---|")
        for n, i in st.get("instances", {}).items():
            info = i.get("cache_config_info") or ""
            kv = re.search(r'kv_cache_size_tokens="(\d+)"', info)
            pc = re.search(r'enable_prefix_caching="(\w+)"', info)
            lines.append(f"| {n} | {i.get('gpu')} | {i.get('util')} | {i.get('startup_s')} | "
                         f"{int(kv.group(1)):,} | {pc.group(1) if pc else '?'} |" if kv else
                         f"| {n} | {i.get('gpu')} | {i.get('util')} | {i.get('startup_s')} | ? | ? |")
        lines.append("")
    groups = [("Overhead at concurrency 1 (direct vs through capbalancer)", lambda n: n.startswith("overhead")),
              ("Direct single-instance runs", lambda n: n.startswith("direct")),
              ("Saturating closed loop through capbalancer", lambda n: n.startswith("sat_") or "_sat_" in n),
              # the prefix plan's jobs are named <workload>_poisson<F>_<policy> (mt_, sp_, nofix_)
              ("Poisson arrivals through capbalancer", lambda n: n.startswith("poisson") or "_poisson" in n)]
    for title, pred in groups:
        names = sorted(n for n in results if pred(n) and "runs" in results[n])
        if not names:
            continue
        lines += [f"## {title}\n", HEADER, SEP]
        for n in names:
            doc = results[n]
            for label, run in doc["runs"].items():
                lines.append(run_row(n, doc, label, run))
        lines.append("")
    failed = sorted(n for n in results if n.endswith(".failed"))
    if failed:
        lines.append("## Failed jobs\n")
        lines += [f"- {n}: {results[n].get('error', '')[:300]}" for n in failed]
        lines.append("")
    prof = results.get("profile")
    if prof:
        lines.append(f"## Profiling ({prof.get('wall_s')} s)\n")
        for n, p in prof.get("instances", {}).items():
            lines.append(f"- {n}: rc {p.get('rc')}")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    print(tables(load_results(sys.argv[1:])))


if __name__ == "__main__":
    main()
