"""Multi-turn sessions through capbalancer in front of two REAL vLLM (CPU build) servers with prefix caching on
(vLLM's default): large (262,144 KV tokens) and small (2,048, preempts under load). Per policy: goodput under the
SLO, TTFT, the requests each instance got, preemptions and the prefix-cache hit rate from the engines' own counters
(vllm:prefix_cache_hits_total over vllm:prefix_cache_queries_total, both instances, before/after). Each run starts
with empty caches (POST /reset_prefix_cache, served with VLLM_SERVER_DEV_MODE=1), so no policy hits what an
earlier one cached.

    .venv/bin/python -m tests.real_engine.serve_pair &          # or let this script start them
    .venv/bin/python bench/real_vllm_prefix_policies.py [--urls large=URL,small=URL] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from real_vllm_policies import make_profiles, real_backends  # noqa: E402

from tests.real_engine.load import scrape  # noqa: E402
from tests.real_engine.proxy import proxy  # noqa: E402
from tests.support import capbalancer  # noqa: E402

# Conversations of 3-6 turns whose context grows to at most 900 tokens (the servers' max_model_len is 1024): one
# conversation fills half the small instance's cache.
WORKLOAD = "multi-turn:turns=3-6:user=lognormal:mean=80:sigma=0.6:max=250:system=60:think=0.3:max_context=900"
SLO = "ttft=2000,tpot=60"  # ms, as bench/real_vllm_policies.py
POLICIES = ("round_robin", "cache_aware", "capacity")


@dataclass
class PrefixPolicyRun:
    policy: str
    completed: int
    failed: int
    duration_s: float
    request_goodput: float
    slo_attainment: float
    median_ttft_ms: float
    p90_ttft_ms: float
    hit_rate: float
    requests_by_backend: dict[str, int]
    preemptions: dict[str, int]


def reset_prefix_caches(backends: Mapping[str, str]) -> None:
    for url in backends.values():
        req = urllib.request.Request(url + "/reset_prefix_cache", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()


def counters(backends: Mapping[str, str]) -> dict[str, dict[str, float]]:
    return {name: scrape(url) for name, url in backends.items()}


def run_policy(policy: str, backends: Mapping[str, str], profiles: Mapping[str, Path], tmp: Path, requests: int,
               users: int, seed: int) -> PrefixPolicyRun:
    reset_prefix_caches(backends)
    before = counters(backends)
    report_path = tmp / f"loadtest-{policy}.json"
    with proxy(tmp, backends, policy, profiles) as url:
        proc = subprocess.run(capbalancer("loadtest", url, "--workload", WORKLOAD, "--request-rate", "inf",
                                          "--max-concurrency", str(users), "--num-requests", str(requests),
                                          "--output-len", "64", "--ignore-eos", "--seed", str(seed), "--quiet",
                                          "--slo", SLO, "--label", policy, "--json", str(report_path)),
                              capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"loadtest through {policy} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    after = counters(backends)

    def delta(name: str) -> dict[str, int]:
        return {k: int(after[k][name] - before[k][name]) for k in backends}

    queries, hits = delta("vllm:prefix_cache_queries_total"), delta("vllm:prefix_cache_hits_total")
    report = json.loads(report_path.read_text())
    s = report["summary"]
    total_q = sum(queries.values())
    return PrefixPolicyRun(policy=policy, completed=s["completed"], failed=s["failed"], duration_s=s["duration_s"],
                           request_goodput=s["request_goodput"], slo_attainment=s["slo_attainment"],
                           median_ttft_ms=s["median_ttft_ms"], p90_ttft_ms=s["p90_ttft_ms"],
                           hit_rate=sum(hits.values()) / total_q if total_q else 0.0,
                           requests_by_backend={k: v["requests"] for k, v in report["backends"].items()},
                           preemptions=delta("vllm:num_preemptions_total"))


def compare(backends: Mapping[str, str], tmp: Path, requests: int = 48, users: int = 8, seed: int = 5,
            policies: tuple[str, ...] = POLICIES) -> list[PrefixPolicyRun]:
    profiles = make_profiles(backends, tmp)
    return [run_policy(p, backends, profiles, tmp, requests, users, seed) for p in policies]


def markdown(runs: list[PrefixPolicyRun]) -> str:
    rows = ["| policy | hit rate | goodput req/s | SLO met | TTFT ms p50 / p90 | requests small/large | "
            "preemptions small/large |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        rows.append(f"| {r.policy} | {r.hit_rate:.3f} | {r.request_goodput:.2f} | {r.slo_attainment:.0%} | "
                    f"{r.median_ttft_ms:.0f} / {r.p90_ttft_ms:.0f} | {r.requests_by_backend.get('small', 0)}/"
                    f"{r.requests_by_backend.get('large', 0)} | {r.preemptions.get('small', 0)}/"
                    f"{r.preemptions.get('large', 0)} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", help="large=URL,small=URL of running servers, started with VLLM_SERVER_DEV_MODE=1")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    started = time.monotonic()
    with real_backends(args.urls) as backends, tempfile.TemporaryDirectory() as tmp:
        runs = compare(backends, Path(tmp), args.requests, args.users, args.seed)
    print(markdown(runs))
    print(f"({time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=1) + "\n")


if __name__ == "__main__":
    main()
