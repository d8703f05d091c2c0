"""Three real proxy processes in front of one simulated engine with a small KV cache, sharing through a real
redis-server (or not): with sharing they fill it together as one proxy would; without, each fills it alone
and the engine preempts. Real sockets, the official OpenAI client, the default policy."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
from backends import ProxyProcess
from support import capbalancer, free_port, running

from capbalancer.cluster.localstore import LocalRedis

TINY_KV = str(Path(__file__).parent / "data" / "profiles" / "tiny-kv.yaml")  # 2048 KV tokens
PROMPT = "word " * 200  # ~250 tokens, a distinct first block each (no shared prefix)
N_REQUESTS = 24
SPACING_S = 0.01
MAX_TOKENS = 40  # ~290 KV tokens a request at the end: ~7 fit the 2048-token cache
ADMIN_TOKEN = "t0ken"


def _preemptions(engine_url: str) -> float:
    with urllib.request.urlopen(engine_url + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("vllm:num_preemptions_total"):
                return float(line.rpartition(" ")[2])
    raise AssertionError("no preemption counter")


def _engine_requests(engine_url: str) -> float:
    """Requests on the engine now: running + waiting."""
    total = 0.0
    with urllib.request.urlopen(engine_url + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{")):
                total += float(line.rpartition(" ")[2])
    return total


def _remote_inflight(proxy: ProxyProcess) -> int:
    req = urllib.request.Request(proxy.url + "/admin/backends", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return int(json.loads(resp.read())["backends"]["e"]["remote_inflight"])


def _run(engine_url: str, sharing: dict | None) -> tuple[float, float, int]:
    """N_REQUESTS spread over three proxies (one every SPACING_S): engine preemptions, the most requests on the
    engine at once, the most remote in-flight requests one proxy saw."""
    config = {"health": {"interval_s": 1.0},
              "models": {"m": {"default": True, "backends": [{"url": engine_url, "name": "e", "profile": TINY_KV}]}}}
    before = _preemptions(engine_url)
    proxies = [ProxyProcess({**config, **({"sharing": {**sharing, "replica_id": f"p{i}"}} if sharing else {})},
                            env={"CAPBALANCER_ADMIN_TOKEN": ADMIN_TOKEN}) for i in range(3)]
    try:
        for p in proxies:
            p.start()
        if sharing:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not all(
                    json.loads(urllib.request.urlopen(p.url + "/ready", timeout=5).read())["sharing"]["other_replicas"]
                    == 2 for p in proxies):
                time.sleep(0.05)
        clients = [openai.OpenAI(base_url=p.url + "/v1", api_key="k", max_retries=0, timeout=60) for p in proxies]

        def one(i: int) -> int:
            out = clients[i % 3].completions.create(model="m", prompt=f"request {i}: {PROMPT}", max_tokens=MAX_TOKENS,
                                                    extra_body={"ignore_eos": True})
            return out.usage.completion_tokens

        def watch() -> float:
            most = 0.0
            while not all(f.done() for f in futures) or len(futures) < N_REQUESTS:
                most = max(most, _engine_requests(engine_url))
                time.sleep(0.005)
            return most

        futures: list = []
        with ThreadPoolExecutor(N_REQUESTS + 1) as pool:
            watcher = pool.submit(watch)
            for i in range(N_REQUESTS):
                futures.append(pool.submit(one, i))
                time.sleep(SPACING_S)
            seen_remote = max(_remote_inflight(p) for p in proxies)
            most_on_engine = watcher.result()
            assert [f.result() for f in futures] == [MAX_TOKENS] * N_REQUESTS
        return _preemptions(engine_url) - before, most_on_engine, seen_remote
    finally:
        for p in proxies:
            p.stop()


def test_three_replicas_sharing_fill_a_small_engine_as_one_would():
    port = free_port()
    engine_url = f"http://127.0.0.1:{port}"
    with running(capbalancer("sim", "--profile", TINY_KV, "--port", str(port), "--model", "m"),
                 ready_url=f"{engine_url}/health"), LocalRedis() as store:
        shared, shared_most, seen_remote = _run(engine_url, {"store_url": store.url, "interval_ms": 10,
                                                             "staleness_ms": 500})
        unshared, unshared_most, _ = _run(engine_url, None)
    assert seen_remote > 0  # each proxy counted the others' requests on the engine
    # Shared: the three fill the engine as one proxy would (~7 fit); alone, each believes the cache is its own
    # until the next poll (measured: 9 vs 21-24 on the engine at once, 3 vs 4-5 preemptions).
    assert shared_most <= 12, shared_most
    assert unshared_most >= 1.5 * shared_most, (shared_most, unshared_most)
    assert shared <= unshared, (shared, unshared)
