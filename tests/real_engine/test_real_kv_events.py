"""Precise prefix mode against real vLLMs: two servers publish their KV events (ZMQ, ipc sockets they bind), the
proxy subscribes and tokenizes with the model's own tokenizer. A prompt sent straight to engine "b", which the
proxy never saw, must reach the proxy's index through b's events alone; the same prompt sent through the proxy
then goes to b, where the engine's own counter shows the hit. The same for a chat conversation, whose prompt the
proxy renders through the model's chat template exactly as the engine does (checked token for token).
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from tokenizers import Tokenizer

from capbalancer.server.chat_template import ChatTemplate
from tests.real_engine.capture_kv_events import kv_events_args, post_json, prompt
from tests.real_engine.proxy import proxy
from tests.real_engine.server import SERVED_MODEL, ServerSpec, usable_cpus, vllm_servers
from tests.support import free_port

pytestmark = pytest.mark.real_engine
ADMIN_TOKEN = "kv-events-test"


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
    post_json(url + "/v1/completions", {"model": SERVED_MODEL, "prompt": text, "max_tokens": 2, "temperature": 0,
                                    "ignore_eos": True})


def _until(cond, what: str, timeout_s: float = 60.0, every=None, state=None) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, f"timed out: {what}" + (f" ({state()})" if state else "")
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
            engine_tokens = post_json(urls["b"] + "/tokenize", {"model": SERVED_MODEL, "prompt": text})["tokens"]
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

            # Chat: the proxy renders the model's chat template as the engine does, token for token ...
            first_turn = [{"role": "system", "content": "You answer in one word."},
                          {"role": "user", "content": prompt(8)}]
            engine_ids = post_json(urls["b"] + "/tokenize", {"model": SERVED_MODEL, "messages": first_turn})["tokens"]
            template = ChatTemplate.beside(tiny_model / "tokenizer.json")
            ours = Tokenizer.from_file(str(tiny_model / "tokenizer.json")).encode(
                template.render(first_turn), add_special_tokens=False).ids
            assert ours == engine_ids
            # ... so a conversation's first turn, served straight by one engine, steers its second turn there.
            # Four conversations, held by a, a, b, b: a proxy that could not match chat prompts would send them
            # by load or in turn, and not all four to their holders.
            for k, holder in enumerate(("a", "a", "b", "b")):
                other = "b" if holder == "a" else "a"
                turn = [{"role": "system", "content": "You answer in one word."},
                        {"role": "user", "content": prompt(20 + k)}]
                blocks = len(post_json(urls[holder] + "/tokenize", {"model": SERVED_MODEL, "messages": turn})["tokens"]
                             ) // 128
                # (the blocks the index gains can be fewer: the system message's first block is shared)
                batches = _admin(base)[holder]["kv_events"]["batches"]
                post_json(urls[holder] + "/v1/chat/completions", {"model": SERVED_MODEL, "messages": turn,
                                                              "max_tokens": 2, "temperature": 0})
                _until(lambda h=holder, n0=batches: _admin(base)[h]["kv_events"]["batches"] > n0,
                       f"{holder}'s KV events of the first turn at the proxy", state=lambda h=holder: _admin(base)[h])
                hits_holder, hits_other = _hits(urls[holder]), _hits(urls[other])
                raw = client.chat.completions.with_raw_response.create(
                    model=SERVED_MODEL, max_tokens=2, temperature=0,
                    messages=[*turn, {"role": "assistant", "content": "Yes"}, {"role": "user", "content": "Why?"}])
                assert raw.headers["x-capbalancer-backend"] == holder, k
                assert _hits(urls[holder]) - hits_holder >= blocks * 128
                assert _hits(urls[other]) == hits_other
