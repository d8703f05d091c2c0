"""Engines that fail while /health is fine, and a prompt nobody can serve, through the live proxy (issue 14 §3-4).

    .venv/bin/python bench/faults_outlier.py [--seconds 20]

The rig of tests/test_faults_outlier.py with the default configuration (policy capacity, outlier defaults: first
token timer max(5 s, 5x predicted TTFT) capped 30 s, 5 failures eject for 30 s): two simulated vLLM instances
(`capbalancer sim --cluster`, test profile fast-13b) and one tests/faults.py server beside them with the same
profile, behind `capbalancer serve`. Closed-loop streaming chat clients (openai package).

  hung     the third engine accepts requests and never answers (/health 200): its share of the requests that
           start after 10 s (target < 5%)
  5xx      it answers 500 to every request (/health 200): the same share
  too long under a steady load, a prompt of ~37k estimated tokens (max_model_len 4096): the 400's latency, and the
           other requests' latency with and without such prompts arriving every 0.1 s
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from faults import FaultBackend, Proxy  # noqa: E402
from test_faults_outlier import config, load, share_after, sim_pair  # noqa: E402  (the test's rig)


def engine_share(kind: str, seconds: float) -> str:
    knobs = {"api": "hang"} if kind == "hung" else {"api": "status", "status": 500}
    workers, max_tokens, timeout_s = (12, 4, 8.0) if kind == "hung" else (24, 64, 10.0)
    with tempfile.TemporaryDirectory() as tmp, sim_pair(Path(tmp)) as sims, FaultBackend("bad", **knobs) as bad:
        with Proxy(config=config(sims, bad)) as proxy:
            share, late, results = share_after(bad, proxy, 10.0, seconds, workers=workers,
                                               client_timeout_s=timeout_s, max_tokens=max_tokens)
            total = bad.api_requests()
    ok = sum(1 for r in results if r[1] == "ok")
    return (f"| {kind} | {len(results)} | {ok} | {total} | {late} | {share * 100:.1f}% |")


def too_long(seconds: float) -> list[str]:
    import json

    with tempfile.TemporaryDirectory() as tmp, sim_pair(Path(tmp)) as sims:
        with Proxy(config=config(sims, None)) as proxy:
            body = {"model": "m", "messages": [{"role": "user", "content": "word " * 30000}], "max_tokens": 16}

            async def scenario(with_oversized: bool) -> tuple[list[float], list[float]]:
                refused: list[float] = []
                stop = time.monotonic() + seconds

                async def oversized() -> None:
                    while time.monotonic() < stop:
                        t0 = time.monotonic()
                        status, _, raw = await asyncio.to_thread(proxy.request, "POST", "/v1/chat/completions", body)
                        refused.append(time.monotonic() - t0)
                        assert status == 400 and json.loads(raw)["error"]["code"] == "context_length_exceeded"
                        await asyncio.sleep(0.1)

                timed: list[float] = []

                async def timed_load() -> None:
                    t0 = time.monotonic()
                    results = await load(proxy, seconds, workers=16, client_timeout_s=10.0, max_tokens=16)
                    assert all(r[1] == "ok" for r in results)
                    timed.append(len(results) / (time.monotonic() - t0))

                tasks = [timed_load()] + ([oversized()] if with_oversized else [])
                await asyncio.gather(*tasks)
                return refused, timed

            base_refused, base_rate = asyncio.run(scenario(False))
            refused, rate = asyncio.run(scenario(True))
    refused.sort()
    p50 = statistics.median(refused) * 1000
    p99 = refused[min(len(refused) - 1, int(0.99 * len(refused)))] * 1000
    return [f"oversized prompts refused: {len(refused)}, all 400 context_length_exceeded; latency p50 {p50:.1f} ms, "
            f"p99 {p99:.1f} ms (through HTTP on a shared 2-core box)",
            f"the other requests (16 closed-loop clients): {base_rate[0]:.1f} req/s alone, {rate[0]:.1f} req/s with the "
            f"oversized ones arriving every 0.1 s: mean latency {16000 / base_rate[0]:.0f} -> {16000 / rate[0]:.0f} ms"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    print("| engine | client requests | ok | requests the bad engine received | started after 10 s | "
          "its share of those |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in ("hung", "5xx"):
        print(engine_share(kind, args.seconds))
    print()
    for line in too_long(5.0):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
