"""The proxy's fleet wiring end to end: what a backend's /metrics says, and what the monitor makes of it,
reaches the scheduler. Real `capbalancer serve` processes in front of real backend processes on 127.0.0.1,
read through /admin/backends."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from backends import Backend
from faults import ADMIN_TOKEN_ENV, Proxy
from support import capbalancer, free_port, running

from capbalancer.profiling.schema import load_profile

FAST = str(Path(__file__).parent / "data" / "profiles" / "fast-13b.yaml")
TOKEN = "admin-tok"

# A vLLM page without `vllm:cache_config_info` (a server that hides it, or a scrape filter that drops it):
# the KV usage arrives as a fraction with no capacity to turn it into tokens.
USAGE_ONLY_PAGE = (
    "# TYPE vllm:num_requests_running gauge\n"
    'vllm:num_requests_running{model_name="m"} 0\n'
    "# TYPE vllm:num_requests_waiting gauge\n"
    'vllm:num_requests_waiting{model_name="m"} 0\n'
    "# TYPE vllm:kv_cache_usage_perc gauge\n"
    'vllm:kv_cache_usage_perc{model_name="m"} 0.25\n'
)


def fleet_config(backends: list[dict[str, Any]]) -> dict[str, Any]:
    return {"models": {"m": {"policy": "round_robin", "backends": backends}},
            "health": {"interval_s": 0.2, "timeout_s": 1.0},
            "admin": {"token_env": ADMIN_TOKEN_ENV}}


def wait_backend(proxy: Proxy, name: str, ready: Any, timeout_s: float = 15.0) -> dict[str, Any]:
    """Poll /admin/backends until `ready(row)` holds for backend `name`; that row."""
    deadline = time.monotonic() + timeout_s
    row: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status, body = proxy.admin("GET", "backends")
        assert status == 200, body
        row = body["backends"].get(name, {})
        if row and ready(row):
            return row
        time.sleep(0.1)
    raise AssertionError(f"backend {name} never got there; last /admin/backends row: {row}\n{proxy.log()[-3000:]}")


def test_profile_capacity_turns_a_reported_usage_fraction_into_tokens(tmp_path: Path) -> None:
    page = tmp_path / "metrics.txt"
    page.write_text(USAGE_ONLY_PAGE)
    capacity = load_profile(FAST).kv_capacity_tokens
    with Backend(name="v", metrics_file=str(page)) as be:
        config = fleet_config([{"url": be.url, "name": "v", "engine": "vllm", "profile": FAST}])
        with Proxy(config=config, admin_token=TOKEN) as proxy:
            row = wait_backend(proxy, "v", lambda r: r["snapshot"] is not None)
    assert row["snapshot"]["kv_usage_fraction"] == 0.25
    # Without the profile's capacity the snapshot has none, and the scheduler ignores the observed usage.
    assert row["snapshot"]["kv_capacity_tokens"] == capacity
    assert row["kv_used_estimate_tokens"] == round(0.25 * capacity)


def test_detected_engine_reaches_the_scheduler_and_the_admin_api() -> None:
    """`engine: auto` in front of a simulated vLLM process: the monitor's detection replaces the "openai"
    stand-in in the scheduler's backend spec, for a backend from the config file and one added by the
    admin API, and /admin/backends shows both the engine in use and the configured "auto"."""
    port = free_port()
    sim = f"http://127.0.0.1:{port}"
    with running(capbalancer("sim", "--engine", "vllm", "--profile", FAST, "--port", str(port), "--model", "m"),
                 ready_url=f"{sim}/health"):
        with Proxy(config=fleet_config([{"url": sim, "name": "v", "engine": "auto"}]), admin_token=TOKEN) as proxy:
            row = wait_backend(proxy, "v", lambda r: r["engine"] != "openai")
            assert (row["engine"], row["engine_configured"]) == ("vllm", "auto")
            # The snapshot came through the vLLM adapter: the engine's own capacity and load.
            assert row["snapshot"]["kv_capacity_tokens"] == load_profile(FAST).kv_capacity_tokens

            status, body = proxy.admin("POST", "backends", {"url": sim, "name": "w", "engine": "auto"})
            assert status == 201, body
            row = wait_backend(proxy, "w", lambda r: r["engine"] != "openai")
            assert (row["engine"], row["engine_configured"]) == ("vllm", "auto")
            status, _, raw = proxy.request("POST", "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 3})
            assert status == 200, raw


def test_gpu_group_steers_requests_off_the_card_a_busy_engine_shares() -> None:
    """Three simulated vLLM processes with one profile: a on a card of its own, b and c configured as sharing
    one (`gpu_group`). Another client keeps c busy. The capacity policy, told about the card, sends short
    requests to a and none to b, whose steps would wait for c's; told nothing, it splits them between the
    two idle engines a and b."""
    import contextlib
    import threading
    import urllib.request

    from openai import OpenAI

    ports = [free_port() for _ in range(3)]
    urls = dict(zip("abc", (f"http://127.0.0.1:{p}" for p in ports), strict=True))

    def load_c() -> None:
        body = json.dumps({"model": "m", "prompt": "hello " * 200, "max_tokens": 1500, "ignore_eos": True,
                           "stream": True}).encode()
        req = urllib.request.Request(urls["c"] + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with contextlib.suppress(Exception), urllib.request.urlopen(req, timeout=120) as resp:
            while resp.read(4096):
                pass

    def backends_hit(gpu_groups: dict[str, str]) -> list[str]:
        rows = [{"url": urls[n], "name": n, "engine": "vllm", "profile": FAST,
                 **({"gpu_group": gpu_groups[n]} if n in gpu_groups else {})} for n in "abc"]
        config = fleet_config(rows)
        # Calibration off: it would correct only the engines that served (a), from requests so short that HTTP
        # overhead dominates them; this test is about the shared-card term alone.
        config["models"]["m"].update(policy="capacity", policy_options={"calibrate": 0})
        with Proxy(config=config, admin_token=TOKEN) as proxy:
            wait_backend(proxy, "c", lambda r: (r["snapshot"] or {}).get("running", 0) >= 4)
            rows = proxy.admin("GET", "backends")[1]["backends"]
            assert rows["b"]["shares_gpu_with"] == (["c"] if gpu_groups else [])
            client = OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=30)
            hits = []
            for _ in range(8):
                raw = client.completions.with_raw_response.create(model="m", prompt="hi", max_tokens=2)
                hits.append(raw.headers["x-capbalancer-backend"])
            return hits

    with contextlib.ExitStack() as stack:
        for p in ports:
            stack.enter_context(running(capbalancer("sim", "--engine", "vllm", "--profile", FAST, "--port", str(p),
                                                    "--model", "m"),
                                        ready_url=f"http://127.0.0.1:{p}/health"))
        for _ in range(6):
            threading.Thread(target=load_c, daemon=True).start()
        told = backends_hit({"b": "card1", "c": "card1"})
        untold = backends_hit({})
    assert told == ["a"] * 8, told
    assert "b" in untold and "c" not in untold, untold
