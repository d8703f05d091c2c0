"""The official TGI clients through the proxy against a simulated TGI: huggingface_hub.InferenceClient
(text_generation, streamed and not, with details; chat_completion) and the `text-generation` package's Client
(generate, generate_stream), which post to TGI's root route and read its list-shaped answer."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from faults import Proxy
from support import capbalancer, free_port, running

huggingface_hub = pytest.importorskip("huggingface_hub")
text_generation = pytest.importorskip("text_generation")


@pytest.fixture(scope="module")
def tgi_proxy() -> Iterator[Proxy]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = {"models": {"tgi-model": {"backends": [{"name": "tgi0", "url": url, "engine": "tgi"}]}}}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the clients talk to our URL only, never to the Hub
    with running(capbalancer("sim", "--engine", "tgi", "--profile", "l4/llama-3.1-8b-tp1", "--port", str(port),
                             "--model", "tgi-model"), ready_url=url + "/health"), Proxy(config=config) as proxy:
        yield proxy


def test_huggingface_hub_inference_client(tgi_proxy: Proxy):
    client = huggingface_hub.InferenceClient(base_url=tgi_proxy.url, timeout=30)
    text = client.text_generation("The capital of France is", max_new_tokens=4)
    assert isinstance(text, str) and text
    out = client.text_generation("Hello", max_new_tokens=3, details=True)
    assert out.generated_text and 1 <= out.details.generated_tokens <= 3
    tokens = list(client.text_generation("Hello", max_new_tokens=3, stream=True))
    assert 1 <= len(tokens) <= 3 and all(isinstance(t, str) for t in tokens)
    chat = huggingface_hub.InferenceClient(base_url=tgi_proxy.url + "/v1", timeout=30)
    reply = chat.chat_completion([{"role": "user", "content": "hi"}], model="tgi-model", max_tokens=3)
    assert reply.choices[0].message.content


def test_text_generation_client(tgi_proxy: Proxy):
    client = text_generation.Client(tgi_proxy.url, timeout=30)
    resp = client.generate("Why is the sky blue?", max_new_tokens=4)
    assert resp.generated_text and 1 <= resp.details.generated_tokens <= 4
    assert len(resp.details.tokens) == resp.details.generated_tokens
    streamed = list(client.generate_stream("Why is the sky blue?", max_new_tokens=4))
    assert streamed and streamed[-1].details is not None
    assert streamed[-1].details.generated_tokens == len(streamed)
    assert "".join(r.token.text for r in streamed) == streamed[-1].generated_text
