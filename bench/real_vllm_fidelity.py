"""Simulator fidelity against a REAL vLLM (CPU build): profile the real instance with `capbalancer profile`,
serve `capbalancer sim --engine vllm` with that profile, replay the same workloads on both, and compare
TTFT, TPOT, output throughput and preemptions.

    .venv/bin/python bench/real_vllm_fidelity.py [--urls large=URL,small=URL] [--json out/real_fidelity.json]

Workloads (closed loop, ignore_eos, ~150 prompt + 200 output tokens; the loadtest's seed fixes lengths):
  single   - 1 in flight: unloaded TTFT and time per output token
  batch8   - 8 in flight on the large instance: continuous batching
  kv-short - 16 in flight on the small (16-block) instance: KV overflow, waiting and preemption
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from real_vllm_policies import real_backends  # noqa: E402

from capbalancer.profiling.schema import Profile, load_profile, save_profile  # noqa: E402
from tests.real_engine.load import cache_config, scrape  # noqa: E402
from tests.real_engine.sim_server import sim_server  # noqa: E402
from tests.support import capbalancer  # noqa: E402

# vLLM's CPU platform defaults for an OpenAI server (vllm/engine/arg_utils.py), which /metrics does not show.
CPU_MAX_NUM_SEQS = 128
CPU_MAX_NUM_BATCHED_TOKENS = 2048


@dataclass(frozen=True)
class Workload:
    name: str
    instance: str  # large | small
    requests: int
    concurrency: int
    prompt_len: int = 150
    output_len: int = 200


WORKLOADS = (Workload("single", "large", 8, 1), Workload("batch8", "large", 32, 8),
             Workload("kv-short", "small", 32, 16))


@dataclass
class Measured:
    workload: str
    target: str  # real | sim
    mean_ttft_ms: float
    median_ttft_ms: float
    mean_tpot_ms: float
    median_tpot_ms: float
    output_throughput: float
    duration_s: float
    preemptions: int | None


def profile_real(url: str, out: Path) -> tuple[Profile, str]:
    for _attempt in range(3):  # a starved API server can spoil one probe on a busy machine
        proc = subprocess.run(capbalancer("profile", "--url", url, "--engine", "vllm", "--gpu", "cpu-1core",
                                          "--max-concurrency", "16", "--out", str(out)),
                              capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            profile = load_profile(out)
            # The CPU platform's batch limits are not on /metrics; the profiler cannot read them.
            profile = replace(profile, max_num_seqs=CPU_MAX_NUM_SEQS,
                              max_num_batched_tokens=CPU_MAX_NUM_BATCHED_TOKENS)
            save_profile(profile, out)
            return profile, proc.stdout
    raise RuntimeError(f"profiling {url} failed:\n{proc.stdout}\n{proc.stderr}")


def loadtest(url: str, w: Workload, report: Path) -> dict:
    proc = subprocess.run(capbalancer("loadtest", url, "--request-rate", "inf", "--num-requests", str(w.requests),
                                      "--max-concurrency", str(w.concurrency), "--prompt-len", str(w.prompt_len),
                                      "--output-len", str(w.output_len), "--ignore-eos", "--quiet",
                                      "--json", str(report)),
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"loadtest {w.name} on {url} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(report.read_text())["summary"]


def measure(url: str, w: Workload, target: str, tmp: Path) -> Measured:
    before = scrape(url)["vllm:num_preemptions_total"]
    s = loadtest(url, w, tmp / f"{w.name}-{target}.json")
    after = scrape(url)["vllm:num_preemptions_total"]
    return Measured(workload=w.name, target=target, mean_ttft_ms=s["mean_ttft_ms"], median_ttft_ms=s["median_ttft_ms"],
                    mean_tpot_ms=s["mean_tpot_ms"], median_tpot_ms=s["median_tpot_ms"],
                    output_throughput=s["output_throughput"], duration_s=s["duration_s"],
                    preemptions=int(after - before))


def run(backends: dict[str, str], tmp: Path) -> tuple[Profile, str, list[Measured]]:
    profile, fit_text = profile_real(backends["large"], tmp / "large.yaml")
    small_kv = int(cache_config(backends["small"])["kv_cache_size_tokens"])
    profiles = {"large": tmp / "large.yaml", "small": tmp / "small.yaml"}
    save_profile(replace(profile, name="cpu-1core/tiny-llama-small", kv_capacity_tokens=small_kv, engine_flags={}),
                 profiles["small"])
    results: list[Measured] = []
    for w in WORKLOADS:
        results.append(measure(backends[w.instance], w, "real", tmp))
        with sim_server(profiles[w.instance]) as sim_url:
            results.append(measure(sim_url, w, "sim", tmp))
    return profile, fit_text, results


def _gap(sim: float, real: float) -> str:
    return f"{(sim - real) / real:+.0%}" if real else "n/a"


def markdown(results: list[Measured]) -> str:
    # Medians: on a shared machine a few starved requests pull the real means far from the typical request.
    rows = ["| workload | median TTFT ms real / sim (gap) | median TPOT ms real / sim (gap) | "
            "output tok/s real / sim (gap) | preemptions real / sim |", "|---|---|---|---|---|"]
    by = {(m.workload, m.target): m for m in results}
    for w in WORKLOADS:
        r, s = by[(w.name, "real")], by[(w.name, "sim")]
        rows.append(f"| {w.name} ({w.concurrency} in flight, {w.instance}) | {r.median_ttft_ms:.0f} / "
                    f"{s.median_ttft_ms:.0f} ({_gap(s.median_ttft_ms, r.median_ttft_ms)}) | {r.median_tpot_ms:.1f} / "
                    f"{s.median_tpot_ms:.1f} ({_gap(s.median_tpot_ms, r.median_tpot_ms)}) | "
                    f"{r.output_throughput:.0f} / {s.output_throughput:.0f} "
                    f"({_gap(s.output_throughput, r.output_throughput)}) | {r.preemptions} / {s.preemptions} |")
    return "\n".join(rows)


@contextlib.contextmanager
def _tmpdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", help="large=URL,small=URL of running servers (default: start them)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep-profile", type=Path, help="copy the measured profile here")
    args = parser.parse_args()
    started = time.monotonic()
    with real_backends(args.urls) as backends, _tmpdir() as tmp:
        profile, fit_text, results = run(backends, tmp)
        if args.keep_profile:
            args.keep_profile.write_text((tmp / "large.yaml").read_text())
    print(fit_text.strip())
    print(markdown(results))
    print(f"({time.monotonic() - started:.0f}s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"profile": profile.to_dict(), "results": [asdict(m) for m in results]},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
