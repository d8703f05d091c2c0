"""The discrete-event runner and the live path agree: same fleet file, same scheduler policy, same requests.

Live: `capbalancer sim --cluster FILE` (real sockets, scaled real time) behind `capbalancer serve --config`
(the proxy driving the Scheduler on the wall clock). DES: `run_des` on the same fleet file, with the
instances slowed by their time_scale as the live simulator runs them. Requests go one after another, so
each finds its engine idle and the per-request results are determined by the routing and the profiles.
"""

import asyncio
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml
from support import capbalancer, free_port, running

from capbalancer.sim.des import instances_from_fleet, run_des

PROFILES = Path(__file__).parent / "data" / "profiles"
N, PROMPT_TOKENS, OUTPUT_TOKENS, SCALE = 6, 200, 10, 3.0


def test_des_and_live_proxy_give_the_same_per_request_results(tmp_path):
    sim_ports = [free_port(), free_port()]
    proxy_port = free_port()
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"model": "m", "instances": [
        {"name": "fast", "engine": "vllm", "port": sim_ports[0], "profile": str(PROFILES / "fast-13b.yaml"),
         "time_scale": SCALE},
        {"name": "slow", "engine": "vllm", "port": sim_ports[1], "profile": str(PROFILES / "slow-13b.yaml"),
         "time_scale": SCALE}]}))
    proxy_cfg = tmp_path / "proxy.yaml"
    proxy_cfg.write_text(yaml.safe_dump({"server": {"port": proxy_port}, "fleet": "fleet.yaml",
                                         "models": {"m": {"policy": "round_robin"}}}))

    des = run_des(instances_from_fleet(fleet, apply_time_scale=True),
                  f"concurrency=1,n={N},prompt={PROMPT_TOKENS},output={OUTPUT_TOKENS},seed=1", "round_robin")

    base = f"http://127.0.0.1:{proxy_port}"
    with running(capbalancer("sim", "--cluster", str(fleet)), ready_url=f"http://127.0.0.1:{sim_ports[1]}/health"), \
            running(capbalancer("serve", "--config", str(proxy_cfg)), ready_url=f"{base}/health"):

        async def one(s: aiohttp.ClientSession, i: int) -> dict:
            # distinct first tokens: the engines' prefix caches stay cold, as in the DES (no token ids there)
            body = {"model": "m", "prompt": f"{i:04d}" + "abcd" * (PROMPT_TOKENS - 1), "max_tokens": OUTPUT_TOKENS,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            started = time.monotonic()
            ttft = None
            usage = None
            async with s.post(f"{base}/v1/completions", json=body) as r:
                assert r.status == 200
                backend = r.headers.get("x-capbalancer-backend")
                async for line in r.content:
                    if not line.startswith(b"data: {"):
                        continue
                    event = orjson.loads(line[6:])
                    if ttft is None and event["choices"]:
                        ttft = time.monotonic() - started
                    if event.get("usage"):
                        usage = event["usage"]
            return {"backend": backend, "ttft": ttft, "e2e": time.monotonic() - started, "usage": usage}

        async def main() -> list[dict]:
            async with aiohttp.ClientSession() as s:
                return [await one(s, i) for i in range(N)]

        live = asyncio.run(main())

    assert [r["backend"] for r in live] == [r.backend for r in des.records]
    assert [r["usage"]["completion_tokens"] for r in live] == [r.output_tokens for r in des.records]
    assert [r["usage"]["prompt_tokens"] for r in live] == [r.prompt_tokens for r in des.records]
    for got, rec in zip(live, des.records, strict=True):
        # generous: the proxy hop, polling and two shared cores add noise to each live figure
        assert got["ttft"] == pytest.approx(rec.ttft_s, rel=0.25, abs=0.3)
        assert got["e2e"] == pytest.approx(rec.e2el_s, rel=0.2, abs=0.4)
    # and the two instances are told apart the same way in both: the slow one's first token comes later
    slow = [r for r in live if r["backend"] == "slow"]
    fast = [r for r in live if r["backend"] == "fast"]
    assert min(r["ttft"] for r in slow) > max(r["ttft"] for r in fast)
