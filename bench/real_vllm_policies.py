"""round_robin vs capacity through capbalancer, in front of two REAL vLLM (CPU build) servers whose KV
caches differ (large: 262,144 tokens; small: 2,048 tokens, which preempts under load).

The same closed-loop load (N requests, C in flight, 250 prompt + 300 output tokens, ignore_eos) goes
through `capbalancer serve --policy P` for each policy; preemptions are read from each engine's own
vllm:num_preemptions_total before and after, and goodput from `capbalancer loadtest --slo`.

    .venv/bin/python -m tests.real_engine.serve_pair &          # or let this script start them
    .venv/bin/python bench/real_vllm_policies.py [--urls large=URL,small=URL] [--json out/real_policies.json]

The capacity policy gets profiles: the step model measured with `capbalancer profile` on a real instance
(tests/data/real/tiny-llama-cpu-measured.yaml, or --profile-live), and each instance's own KV size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from capbalancer.profiling.schema import load_profile, save_profile  # noqa: E402
from tests.real_engine.load import cache_config, scrape  # noqa: E402
from tests.real_engine.proxy import proxy  # noqa: E402
from tests.support import capbalancer  # noqa: E402

# 8 requests of 550 tokens (round_robin's half of 16 in flight) need twice the small cache's 2,048 tokens;
# with 150-token prompts round_robin preempted too little for the comparison to be clear (runs of 2026-11-21).
PROMPT_TOKENS = 250
SLO = "ttft=2000,tpot=60"  # ms; the tiny model decodes at ~4-15 ms/token on one core when not preempted


@dataclass
class PolicyRun:
    policy: str
    requests: int
    concurrency: int
    completed: int
    failed: int
    duration_s: float
    preemptions: dict[str, int]
    requests_by_backend: dict[str, int]
    request_goodput: float
    slo_attainment: float
    output_throughput: float
    mean_ttft_ms: float
    p90_ttft_ms: float
    mean_tpot_ms: float

    @property
    def total_preemptions(self) -> int:
        return sum(self.preemptions.values())


MEASURED_PROFILE = REPO / "tests" / "data" / "real" / "tiny-llama-cpu-measured.yaml"


def make_profiles(backends: Mapping[str, str], out: Path, live: bool = False) -> dict[str, Path]:
    """Profiles for the capacity policy: the step model measured on a real CPU instance (the recorded one,
    or with live=True a fresh `capbalancer profile` of the large instance), each with its own KV size as
    the instance reports it. The comparison is about routing; profiling has its own test."""
    source = MEASURED_PROFILE
    if live:
        source = out / "measured.yaml"
        for _attempt in range(5):  # a starved API server can spoil a probe (see test_real_profile.py)
            proc = subprocess.run(capbalancer("profile", "--url", backends["large"], "--engine", "vllm", "--gpu",
                                              "cpu-1core", "--max-concurrency", "16", "--out", str(source)),
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode == 0:
                break
        else:
            raise RuntimeError(f"profiling {backends['large']} failed:\n{proc.stdout}\n{proc.stderr}")
    measured = load_profile(source)
    paths = {}
    for name, url in backends.items():
        kv = int(cache_config(url)["kv_cache_size_tokens"])
        paths[name] = out / f"{name}.yaml"
        save_profile(replace(measured, name=f"cpu-1core/tiny-llama-{name}", kv_capacity_tokens=kv, engine_flags={},
                             notes=f"step model from {source.name}; KV {kv} tokens from {url}"), paths[name])
    return paths


def preemptions(backends: Mapping[str, str]) -> dict[str, int]:
    return {name: int(scrape(url)["vllm:num_preemptions_total"]) for name, url in backends.items()}


def run_policy(policy: str, backends: Mapping[str, str], profiles: Mapping[str, Path], tmp: Path,
               requests: int, concurrency: int) -> PolicyRun:
    before = preemptions(backends)
    report_path = tmp / f"loadtest-{policy}.json"
    with proxy(tmp, backends, policy, profiles) as url:
        proc = subprocess.run(capbalancer("loadtest", url, "--request-rate", "inf", "--num-requests", str(requests),
                                          "--max-concurrency", str(concurrency), "--prompt-len", str(PROMPT_TOKENS),
                                          "--output-len", "300", "--ignore-eos", "--quiet", "--slo", SLO,
                                          "--label", policy, "--json", str(report_path)),
                              capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"loadtest through {policy} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    after = preemptions(backends)
    report = json.loads(report_path.read_text())
    s = report["summary"]
    return PolicyRun(policy=policy, requests=requests, concurrency=concurrency, completed=s["completed"],
                     failed=s["failed"], duration_s=s["duration_s"],
                     preemptions={k: after[k] - before[k] for k in backends},
                     requests_by_backend={k: v["requests"] for k, v in report["backends"].items()},
                     request_goodput=s["request_goodput"], slo_attainment=s["slo_attainment"],
                     output_throughput=s["output_throughput"], mean_ttft_ms=s["mean_ttft_ms"],
                     p90_ttft_ms=s["p90_ttft_ms"], mean_tpot_ms=s["mean_tpot_ms"])


def compare(backends: Mapping[str, str], tmp: Path, requests: int = 48, concurrency: int = 16,
            policies: tuple[str, ...] = ("round_robin", "capacity"),
            profiles: Mapping[str, Path] | None = None) -> list[PolicyRun]:
    profiles = profiles or make_profiles(backends, tmp)
    return [run_policy(p, backends, profiles, tmp, requests, concurrency) for p in policies]


def markdown(runs: list[PolicyRun]) -> str:
    rows = ["| policy | preemptions (small/large) | requests to small/large | goodput req/s | SLO met | "
            "output tok/s | mean TTFT ms | p90 TTFT ms | mean TPOT ms |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        rows.append(f"| {r.policy} | {r.total_preemptions} ({r.preemptions.get('small', 0)}/"
                    f"{r.preemptions.get('large', 0)}) | {r.requests_by_backend.get('small', 0)}/"
                    f"{r.requests_by_backend.get('large', 0)} | {r.request_goodput:.2f} | {r.slo_attainment:.0%} | "
                    f"{r.output_throughput:.0f} | {r.mean_ttft_ms:.0f} | {r.p90_ttft_ms:.0f} | {r.mean_tpot_ms:.1f} |")
    return "\n".join(rows)


@contextlib.contextmanager
def real_backends(urls: str | None) -> Iterator[dict[str, str]]:
    if urls:
        yield dict(item.split("=", 1) for item in urls.split(","))
        return
    from tests.real_engine.conftest import SMALL_KV_BLOCKS
    from tests.real_engine.install import ensure_installed
    from tests.real_engine.make_model import ensure_model
    from tests.real_engine.server import ServerSpec, usable_cpus, vllm_servers
    from tests.support import free_port

    python = ensure_installed()
    cpus = usable_cpus()
    specs = [ServerSpec(name="large", cpu=cpus[0]),
             ServerSpec(name="small", cpu=cpus[1 % len(cpus)], num_gpu_blocks=SMALL_KV_BLOCKS)]
    with vllm_servers(python, ensure_model(python), specs, [free_port(), free_port()]) as servers:
        yield {s.name: s.url for s in servers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", help="large=URL,small=URL of running servers (default: start them)")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--profile-live", action="store_true",
                        help="profile the large instance now instead of using the recorded profile")
    parser.add_argument("--json", type=Path, help="write the runs here")
    args = parser.parse_args()
    started = time.monotonic()
    runs: list[PolicyRun] = []
    with real_backends(args.urls) as backends, tempfile.TemporaryDirectory() as tmp:
        profiles = make_profiles(backends, Path(tmp), live=args.profile_live)
        for _ in range(args.repeats):
            runs += compare(backends, Path(tmp), args.requests, args.concurrency, profiles=profiles)
    print(markdown(runs))
    print(f"({time.monotonic() - started:.0f}s; SLO {SLO} ms; {args.requests} requests, {args.concurrency} in flight, "
          f"{PROMPT_TOKENS} prompt + 300 output tokens)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([{**asdict(r), "total_preemptions": r.total_preemptions} for r in runs],
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
