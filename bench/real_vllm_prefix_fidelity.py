"""Prefix-cache fidelity of the simulator against a REAL vLLM (CPU build, prefix caching on, its default).

    .venv/bin/python bench/real_vllm_prefix_fidelity.py [--url URL] [--profile FILE] [--json out.json]

Two parts, each run on the real server and on `capbalancer sim --engine vllm` with the same profile (KV geometry
and block size of the real instance: 128-token blocks on the CPU build):

1. probe: one request at a time, cold prompts of several lengths (distinct first words) and each repeated at once
   (a hit of every full block but the last token's). TTFT real vs sim separates the per-request overhead from
   the per-token prefill cost, the two things the profile's step model must get right for hits to pay off.
2. replay: the same multi-turn sessions (`capbalancer loadtest --workload multi-turn`, a closed loop of users,
   the same seed) on both; hit rate from each engine's own counters (vllm:prefix_cache_hits_total over
   vllm:prefix_cache_queries_total, before/after), TTFT from the load test.

Targets (issue 13): hit rate and TTFT within 10%. The real engine tokenizes with its BPE (a synthetic word is one
token), the simulator at 4 bytes a token: prompts have about the same token counts, not the same ids.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import openai

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from capbalancer.profiling.schema import load_profile, save_profile  # noqa: E402
from tests.real_engine.load import cache_config, scrape  # noqa: E402
from tests.real_engine.server import SERVED_MODEL  # noqa: E402
from tests.real_engine.sim_server import sim_server  # noqa: E402
from tests.support import capbalancer  # noqa: E402

MEASURED = REPO / "tests" / "data" / "real" / "tiny-llama-cpu-measured.yaml"
PROBE_LENGTHS = (100, 300, 600, 900)  # prompt tokens (the real server's max_model_len is 1024)
WORDS = ("the", "and", "for", "are", "but", "not", "you", "all", "any", "can", "had", "her", "was", "one")
MULTI_TURN = "multi-turn:turns=3-6:user=lognormal:mean=60:sigma=0.6:max=200:system=40:think=0.2:max_context=900"


@dataclass
class Probe:
    target: str
    prompt_tokens: int
    cold_ttft_ms: float  # at the client
    warm_ttft_ms: float
    cold_prefill_ms: float  # the engine's own vllm:request_prefill_time_seconds (scheduled -> first token)
    warm_prefill_ms: float
    warm_hit_tokens: float  # vllm:prefix_cache_hits_total gained by the repeated request


@dataclass
class Replay:
    target: str
    requests: int
    hit_rate: float
    queried_tokens: int
    hit_tokens: int
    median_ttft_ms: float
    mean_ttft_ms: float
    p90_ttft_ms: float
    median_tpot_ms: float
    engine_queue_prefill_ms: float  # the engine's own mean queue + prefill time per request (its histograms)


def prompt_of(tokens: int, tag: int) -> str:
    # a distinct first word per prompt: nothing shared with any other prompt of the run
    return f"w{tag:05d} " + " ".join(WORDS[(tag + i) % len(WORDS)] for i in range(tokens - 1))


async def _ttft(client: openai.AsyncOpenAI, prompt: str) -> float:
    started = time.monotonic()
    stream = await client.completions.create(model=SERVED_MODEL, prompt=prompt, max_tokens=2, stream=True,
                                             extra_body={"ignore_eos": True})
    first = None
    async for chunk in stream:
        if first is None and chunk.choices:
            first = time.monotonic() - started
    return (first or 0.0) * 1000


def _engine_counters(url: str) -> tuple[float, float]:
    m = scrape(url)
    return m["vllm:request_prefill_time_seconds_sum"], m["vllm:prefix_cache_hits_total"]


def probe(url: str, target: str, repeats: int = 5, tag0: int = 0) -> list[Probe]:
    """One request at a time; the engine's prefill-time histogram and hit counter are read around each, so the
    engine's own share of the TTFT (queue to first token) is told apart from the HTTP/tokenizer front's."""

    async def timed(client: openai.AsyncOpenAI, prompt: str) -> tuple[float, float, float]:
        prefill0, hits0 = _engine_counters(url)
        ttft = await _ttft(client, prompt)
        await asyncio.sleep(0.05)  # the engine records the request's stats as it finishes
        prefill1, hits1 = _engine_counters(url)
        return ttft, (prefill1 - prefill0) * 1000, hits1 - hits0

    async def main() -> list[Probe]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        await _ttft(client, prompt_of(20, 99_999 - tag0))  # warm-up: first-call costs are not compared
        out = []
        tag = tag0
        for n in PROBE_LENGTHS:
            cold, warm = [], []
            for _ in range(repeats):
                tag += 1
                p = prompt_of(n, tag)
                cold.append(await timed(client, p))
                warm.append(await timed(client, p))
            med = [statistics.median(x[i] for x in rows) for rows in (cold, warm) for i in range(3)]
            out.append(Probe(target, n, med[0], med[3], med[1], med[4], med[5]))
        await client.close()
        return out

    return asyncio.run(main())


def replay(url: str, target: str, tmp: Path, requests: int, users: int, seed: int) -> Replay:
    before = scrape(url)
    report = tmp / f"replay-{target}.json"
    proc = subprocess.run(capbalancer("loadtest", url, "--workload", MULTI_TURN, "--request-rate", "inf",
                                      "--max-concurrency", str(users), "--num-requests", str(requests),
                                      "--output-len", "24", "--ignore-eos", "--seed", str(seed), "--quiet",
                                      "--model", SERVED_MODEL, "--json", str(report)),
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"loadtest on {target} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    after = scrape(url)
    q = int(after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"])
    h = int(after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"])
    s = json.loads(report.read_text())["summary"]

    def gained(name: str) -> float:
        return after[name] - before[name]

    n = gained("vllm:request_prefill_time_seconds_count") or 1.0
    engine_ms = (gained("vllm:request_prefill_time_seconds_sum") + gained("vllm:request_queue_time_seconds_sum")) / n
    return Replay(target, s["completed"], h / q if q else 0.0, q, h, s["median_ttft_ms"], s["mean_ttft_ms"],
                  s["p90_ttft_ms"], s["median_tpot_ms"], engine_ms * 1000)


@contextlib.contextmanager
def real_server(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    from tests.real_engine.install import ensure_installed
    from tests.real_engine.make_model import ensure_model
    from tests.real_engine.server import ServerSpec, usable_cpus, vllm_servers
    from tests.support import free_port

    python = ensure_installed()
    with vllm_servers(python, ensure_model(python), [ServerSpec(name="large", cpu=usable_cpus()[0])],
                      [free_port()]) as servers:
        yield servers[0].url


def sim_profile(url: str, source: Path, out: Path) -> Path:
    """The step model of `source`, with the real instance's KV size and block size."""
    cfg = cache_config(url)
    prof = load_profile(source)
    prof = replace(prof, name="cpu-1core/tiny-llama-prefix", kv_capacity_tokens=int(cfg["kv_cache_size_tokens"]),
                   block_size=int(cfg["block_size"]), engine_flags={})
    save_profile(prof, out)
    return out


def fit_engine_prefill(probes: list[Probe]) -> dict[str, float]:
    """Least squares of the real engine's cold prefill time on prompt tokens: (fixed, per token)."""
    xs = [float(p.prompt_tokens) for p in probes if p.target == "real"]
    ys = [p.cold_prefill_ms / 1000 for p in probes if p.target == "real"]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return {"prefill_seconds_per_token": max(slope, 0.0), "fixed_seconds": max(my - slope * mx, 0.0)}


def fit_frontend(real: list[Probe], bare_sim: list[Probe]) -> dict[str, float]:
    """The real API server's time the simulator lacks: least squares, over the probe's cold and repeated
    prompts, of (real client TTFT - real engine prefill) - (the same on the sim without a front end), on prompt
    tokens: (seconds a request, seconds a prompt token). What both share (client, HTTP, the first decode step's
    hand-back) cancels."""
    sim_by = {p.prompt_tokens: p for p in bare_sim}
    xs, ys = [], []
    for r in real:
        s = sim_by[r.prompt_tokens]
        for real_gap, sim_gap in ((r.cold_ttft_ms - r.cold_prefill_ms, s.cold_ttft_ms - s.cold_prefill_ms),
                                  (r.warm_ttft_ms - r.warm_prefill_ms, s.warm_ttft_ms - s.warm_prefill_ms)):
            xs.append(float(r.prompt_tokens))
            ys.append((real_gap - sim_gap) / 1000)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs))
    return {"frontend_seconds": max(my - slope * mx, 0.0), "frontend_seconds_per_prompt_token": slope}


def _ratio(sim: float, real: float) -> str:
    return f"{sim / real:.2f}" if real else "n/a"


def markdown(probes: list[Probe], replays: list[Replay]) -> str:
    rows = ["| prompt tokens | hit tokens when repeated real / sim | client TTFT ms cold: real / sim | repeated: "
            "real / sim | engine prefill ms cold: real / sim | repeated: real / sim |", "|---:|---|---|---|---|---|"]
    by = {(p.target, p.prompt_tokens): p for p in probes}
    for n in PROBE_LENGTHS:
        r, s = by[("real", n)], by[("sim", n)]
        rows.append(f"| {n} | {r.warm_hit_tokens:.0f} / {s.warm_hit_tokens:.0f} | {r.cold_ttft_ms:.1f} / "
                    f"{s.cold_ttft_ms:.1f} | {r.warm_ttft_ms:.1f} / {s.warm_ttft_ms:.1f} | {r.cold_prefill_ms:.1f} / "
                    f"{s.cold_prefill_ms:.1f} | {r.warm_prefill_ms:.1f} / {s.warm_prefill_ms:.1f} |")
    rows += ["", "| multi-turn replay | requests | hit rate (hit / queried tokens) | client TTFT ms median / mean / p90 "
             "| engine queue + prefill ms, mean | TPOT ms median |", "|---|---:|---|---|---|---|"]
    for r in replays:
        rows.append(f"| {r.target} | {r.requests} | {r.hit_rate:.3f} ({r.hit_tokens}/{r.queried_tokens}) | "
                    f"{r.median_ttft_ms:.1f} / {r.mean_ttft_ms:.1f} / {r.p90_ttft_ms:.1f} | "
                    f"{r.engine_queue_prefill_ms:.1f} | {r.median_tpot_ms:.1f} |")
    rr = {r.target: r for r in replays}
    if "real" in rr and "sim" in rr:
        real, sim = rr["real"], rr["sim"]
        rows.append(f"\nsim/real: hit rate {_ratio(sim.hit_rate, real.hit_rate)}, client TTFT median "
                    f"{_ratio(sim.median_ttft_ms, real.median_ttft_ms)}, mean {_ratio(sim.mean_ttft_ms, real.mean_ttft_ms)}; "
                    f"engine queue + prefill mean {_ratio(sim.engine_queue_prefill_ms, real.engine_queue_prefill_ms)}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running real vLLM (default: start one)")
    parser.add_argument("--profile", type=Path, default=MEASURED, help="step model for the sim")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--users", type=int, default=2)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--profile-live", action="store_true",
                        help="profile the real instance now (capbalancer profile) and give the sim that profile")
    parser.add_argument("--fit-prefill", action="store_true",
                        help="give the sim the prefill cost per token the real ENGINE shows in the probe (its own "
                             "prefill-time histogram over the cold prompts), not the client-side fit")
    parser.add_argument("--fit-frontend", action="store_true",
                        help="give the sim the real API server's front-end time (sim profile frontend_seconds and "
                             "_per_prompt_token), fit on the probe against a sim probe without it")
    parser.add_argument("--skip-probe", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    started = time.monotonic()
    probes: list[Probe] = []
    replays: list[Replay] = []
    with real_server(args.url) as url, tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        source = args.profile
        if args.profile_live:
            from real_vllm_fidelity import profile_real

            source, fit_text = tmp / "live.yaml", ""
            _, fit_text = profile_real(url, source)
            print(fit_text.strip())
            args.profile = source
        prof = sim_profile(url, source, tmp / "sim.yaml")
        if not args.skip_probe:
            probes += probe(url, "real")
            if args.fit_prefill:
                fitted = fit_engine_prefill(probes)
                save_profile(replace(load_profile(prof), step=replace(load_profile(prof).step, **fitted)), prof)
            if args.fit_frontend:
                with sim_server(prof) as sim_url:
                    bare = probe(sim_url, "sim-bare")
                front = fit_frontend([p for p in probes if p.target == "real"], bare)
                print(f"front end fit: {front['frontend_seconds'] * 1000:.1f} ms + "
                      f"{front['frontend_seconds_per_prompt_token'] * 1e6:.1f} us/token")
                save_profile(replace(load_profile(prof), **front), prof)
        replays.append(replay(url, "real", tmp, args.requests, args.users, args.seed))
        with sim_server(prof) as sim_url:
            if not args.skip_probe:
                probes += probe(sim_url, "sim")
            replays.append(replay(sim_url, "sim", tmp, args.requests, args.users, args.seed))
        final = load_profile(prof)
        step = final.step
    print(f"profile {args.profile.name}: {step}; front end {final.frontend_seconds * 1000:.1f} ms + "
          f"{final.frontend_seconds_per_prompt_token * 1e6:.1f} us/token")
    print(markdown(probes, replays) if probes else markdown([], replays).split("\n\n", 1)[-1])
    print(f"({time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"step": asdict(step), "frontend_seconds": final.frontend_seconds,
                                         "frontend_seconds_per_prompt_token": final.frontend_seconds_per_prompt_token,
                                         "probes": [asdict(p) for p in probes],
                                         "replays": [asdict(r) for r in replays]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
