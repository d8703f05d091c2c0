"""`n` and `best_of` count in the cost: the proxy's Demand bounds the output of every sequence, and the
simulator generates each (its usage, and its engine's token counter, say so)."""

from __future__ import annotations

import contextlib
import json
import re
import urllib.request
from collections.abc import Iterator

import pytest
from aiohttp.test_utils import make_mocked_request
from faults import Proxy
from support import capbalancer, free_port, post_json, running

from capbalancer.config import parse_config
from capbalancer.server.app import build_state
from capbalancer.server.errors import ProxyError
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


def test_more_sequences_than_openai_allows_is_a_400():
    assert _parsed("/v1/completions", {"prompt": "x", "n": 128}).sequences == 128
    for path, body, param in (("/v1/completions", {"prompt": "x", "n": 129}, "n"),
                              ("/v1/chat/completions", {"messages": [], "best_of": 10**9}, "best_of"),
                              ("/generate", {"inputs": "x", "parameters": {"best_of": 1000}}, "best_of"),
                              ("/generate", {"text": "x", "sampling_params": {"n": 10**6}}, "n")):
        with pytest.raises(ProxyError) as err:
            _parsed(path, body)
        assert (err.value.status, err.value.param) == (400, param)


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


@contextlib.contextmanager
def sim_behind_proxy() -> Iterator[tuple[str, Proxy]]:
    """One simulated vLLM (model `m`) and a proxy in front of it with the default policy: (sim URL, proxy)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running(capbalancer("sim", "--profile", "l4/llama-3.1-8b-tp1", "--port", str(port), "--model", "m"),
                 ready_url=url + "/health"), \
            Proxy(config={"models": {"m": {"backends": [{"name": "b0", "url": url}]}}}) as proxy:
        yield url, proxy


def test_the_simulator_generates_every_sequence_through_the_proxy():
    with sim_behind_proxy() as (url, proxy):
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


def test_a_request_for_a_billion_sequences_is_refused_and_nothing_dies():
    """Found by hand: n = 10^9 through `make run`'s embedded simulated cluster grew the process to 24 GB until the
    kernel killed it, proxy and all. Now the proxy answers 400 (OpenAI's limit is 128) without asking any backend,
    and the simulator refuses it too (as it refuses a `stream_options` that is not an object, which raised a 500)."""
    with sim_behind_proxy() as (url, proxy):
        before = _generated(url)
        status, _, raw = proxy.request("POST", "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 2,
                                                                  "n": 10**9})
        error = json.loads(raw)["error"]
        assert status == 400 and error["param"] == "n" and "128" in error["message"]
        status, _, raw = proxy.request("POST", "/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 129})
        assert status == 400 and json.loads(raw)["error"]["param"] == "n"
        # The simulator on its own: no 500, no process grown without bound (129, not 10^9: should this check ever
        # regress, the test fails instead of exhausting the machine's memory).
        for body, param in (({"model": "m", "prompt": "hi", "max_tokens": 2, "n": 129}, "n"),
                            ({"model": "m", "prompt": "hi", "max_tokens": 2, "stream": True,
                              "stream_options": "x"}, "stream_options")):
            status, answer = post_json(url + "/v1/completions", body)
            assert status == 400 and answer["error"]["param"] == param
        status, answer = post_json(url + "/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": {"a": 1}}], "max_tokens": 2})
        assert status == 400 and answer["error"]["param"] == "messages"
        status, answer = post_json(url + "/tokenize", {"model": "m", "messages": [None]})  # was a 500
        assert status == 400 and answer["error"]["param"] == "messages"
        assert _generated(url) == before  # nothing reached the engine
        status, _, _ = proxy.request("POST", "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 2})
        assert status == 200 and proxy.alive()
