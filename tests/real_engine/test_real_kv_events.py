"""Precise prefix mode against real vLLMs: two servers publish their KV events (ZMQ, ipc sockets they bind), the
proxy subscribes and tokenizes with the model's own tokenizer. A prompt sent straight to engine "b", which the
proxy never saw, must reach the proxy's index through b's events alone; the same prompt sent through the proxy
then goes to b, where the engine's own counter shows the hit.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.real_engine.capture_kv_events import kv_events_args, prompt
from tests.real_engine.proxy import proxy
from tests.real_engine.server import SERVED_MODEL, ServerSpec, usable_cpus, vllm_servers
from tests.support import free_port

pytestmark = pytest.mark.real_engine
ADMIN_TOKEN = "kv-events-test"


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _admin(base: str) -> dict:
    req = urllib.request.Request(base + "/admin/backends", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())["backends"]


def _hits(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:prefix_cache_hits_total{"))


def _complete(url: str, text: str) -> None:
    _post(url + "/v1/completions", {"model": SERVED_MODEL, "prompt": text, "max_tokens": 2, "temperature": 0,
                                    "ignore_eos": True})


def _until(cond, what: str, timeout_s: float = 60.0, every=None) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, f"timed out: {what}"
        if every is not None:
            every()
        time.sleep(0.2)


def test_the_engines_events_steer_a_request_to_where_its_prefix_is(vllm_python: Path, tiny_model: Path,
                                                                    tmp_path: Path) -> None:
    cpus = usable_cpus()
    sockets = {name: f"ipc://{tmp_path}/{name}.sock" for name in ("a", "b")}
    specs = [ServerSpec(name=name, cpu=cpus[i % len(cpus)], extra_args=kv_events_args(sockets[name]))
             for i, name in enumerate(("a", "b"))]
    with vllm_servers(vllm_python, tiny_model, specs, [free_port(), free_port()], tmp_path) as servers:
        urls = {s.name: s.url for s in servers}
        with proxy(tmp_path, urls, "capacity",
                   backend_options={name: {"kv_events": sockets[name]} for name in urls},
                   model_options={"tokenizer": str(tiny_model / "tokenizer.json")},
                   env={"CAPBALANCER_ADMIN_TOKEN": ADMIN_TOKEN}) as base:
            # Each subscription is live once a batch has come through (ZMQ drops what precedes it): send each
            # engine a throwaway prompt until its events show up at the proxy.
            for name, url in urls.items():
                seeds = iter(range(100, 400))
                _until(lambda n=name: (_admin(base)[n].get("kv_events") or {}).get("batches", 0) > 0,
                       f"{name}'s KV events at the proxy",
                       every=lambda u=url, s=seeds: _complete(u, prompt(next(s), 60)))
            text = prompt(7)  # ~740 tokens: five full 128-token engine blocks
            engine_tokens = _post(urls["b"] + "/tokenize", {"model": SERVED_MODEL, "prompt": text})["tokens"]
            full_engine_blocks = len(engine_tokens) // 128
            before = _admin(base)["b"]["prefix_index"]["blocks"]
            _complete(urls["b"], text)  # straight to the engine: only its events can tell the proxy
            _until(lambda: _admin(base)["b"]["prefix_index"]["blocks"] >= before + full_engine_blocks * 8,
                   "b's stored blocks in the proxy's index")
            row = _admin(base)["b"]
            assert row["prefix_index"]["precise"] and row["kv_events"]["errors"] == 0
            hits_a, hits_b = _hits(urls["a"]), _hits(urls["b"])
            client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
            raw = client.completions.with_raw_response.create(model=SERVED_MODEL, prompt=text + " and one more",
                                                              max_tokens=2, temperature=0)
            assert raw.headers["x-capbalancer-backend"] == "b"
            assert _hits(urls["b"]) - hits_b >= full_engine_blocks * 128  # the engine really found it cached
            assert _hits(urls["a"]) == hits_a
