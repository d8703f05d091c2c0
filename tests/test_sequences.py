"""`n` and `best_of` count in the cost: the proxy's Demand bounds the output of every sequence, and the
simulator generates each (its usage, and its engine's token counter, say so)."""

from __future__ import annotations

import json
import re
import urllib.request

from aiohttp.test_utils import make_mocked_request
from faults import Proxy
from support import capbalancer, free_port, running

from capbalancer.config import parse_config
from capbalancer.server.app import build_state
from capbalancer.server.proxy import build_demand
from capbalancer.server.route_parsing import parse_route


def _parsed(path: str, body: dict) -> object:
    return parse_route(path, json.dumps(body).encode(), "application/json")


def test_sequences_are_read_from_every_flavour():
    assert _parsed("/v1/completions", {"prompt": "x", "n": 3}).sequences == 3
    assert _parsed("/v1/completions", {"prompt": "x", "n": 2, "best_of": 5}).sequences == 5
    assert _parsed("/v1/chat/completions", {"messages": [], "n": 4}).sequences == 4
    assert _parsed("/generate", {"inputs": "x", "parameters": {"best_of": 2}}).sequences == 2
    assert _parsed("/generate", {"text": "x", "sampling_params": {"n": 3}}).sequences == 3
    assert _parsed("/v1/completions", {"prompt": "x", "n": "lots"}).sequences == 1  # the engine's 400
    assert _parsed("/v1/embeddings", {"input": "x", "n": 3}).sequences == 1


def test_the_demand_bounds_every_sequence():
    config = parse_config({"models": {"m": {"default_max_tokens": 100,
                                            "backends": [{"url": "http://127.0.0.1:9", "name": "b0"}]}}})
    state = build_state(config)
    pool = config.models["m"]
    request = make_mocked_request("POST", "/v1/completions", headers={})
    one = build_demand(state, request, pool, _parsed("/v1/completions", {"prompt": "x", "max_tokens": 8}))
    four = build_demand(state, request, pool, _parsed("/v1/completions", {"prompt": "x", "max_tokens": 8, "n": 4}))
    default = build_demand(state, request, pool, _parsed("/v1/completions", {"prompt": "x", "best_of": 3}))
    assert (one.max_tokens, four.max_tokens, default.max_tokens) == (8, 32, 300)


def _generated(url: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    return float(re.search(r"^vllm:generation_tokens_total\{[^}]*\} (\S+)$", text, re.M).group(1))


def test_the_simulator_generates_every_sequence_through_the_proxy():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running(capbalancer("sim", "--profile", "l4/llama-3.1-8b-tp1", "--port", str(port), "--model", "m"),
                 ready_url=url + "/health"), \
            Proxy(config={"models": {"m": {"backends": [{"name": "b0", "url": url}]}}}) as proxy:
        before = _generated(url)
        status, _, raw = proxy.request("POST", "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 4,
                                                                  "n": 3, "ignore_eos": True})
        body = json.loads(raw)
        assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2]
        assert body["usage"]["completion_tokens"] == 12 and _generated(url) - before == 12
        status, _, raw = proxy.request("POST", "/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 2,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
        events = [json.loads(line[5:]) for line in raw.decode().splitlines()
                  if line.startswith("data:") and "[DONE]" not in line]
        assert status == 200 and {c["index"] for e in events for c in e["choices"]} == {0, 1}
        assert events[-1]["usage"]["completion_tokens"] == 4


def test_a_context_length_check_sees_one_sequence_not_their_sum():
    from capbalancer.profiling.schema import Profile, StepTimeModel
    from capbalancer.sched.scheduler import Scheduler
    from capbalancer.sched.types import BackendSpec, Demand, PoolSettings, Reject

    profile = Profile(name="p", gpu="g", model="m", tp=1, engine="vllm", kv_capacity_tokens=65536,
                      step=StepTimeModel(0.01, 1e-5, 1e-4, 1e-8), max_model_len=4096)
    sched = Scheduler([PoolSettings(name="m")])
    sched.add_backend(BackendSpec(backend_id="b0", pool="m", profile=profile), 0.0)

    def demand(i: int, sequences: int, max_tokens: int) -> Demand:
        return Demand(request_id=f"r{i}", pool="m", prompt_tokens=3000, max_tokens=max_tokens * sequences,
                      arrival_s=0.0, sequences=sequences)

    # 4 x 1000 output tokens: each sequence (3000 + 1000) fits the 4096 context; their sum would not.
    assert not isinstance(sched.submit(demand(1, 4, 1000), 0.0), Reject)
    assert sched.submit(demand(2, 4, 1200), 0.0).status == 400  # one sequence alone is too long
