"""Every engine route answered through the proxy by simulated vLLM, TGI and SGLang instances (one `sim
--cluster` process, one proxy, default policy), and the official openai client on each OpenAI route.

The pool is named `llama` (alias `chat`) while its vLLM instances serve `meta-llama/Llama-3.1-8B-Instruct`:
every request below that names the pool reaches the engine only if the proxy rewrote the name (the
simulator, like vLLM, answers 404 to any other).
"""

from __future__ import annotations

import io
import json
import struct
import time
import wave
from collections.abc import Iterator

import openai
import pytest
from faults import Proxy
from support import capbalancer, free_port, running

from capbalancer.server.routes import ROUTES
from capbalancer.sim import tokenizer

SERVED = "meta-llama/Llama-3.1-8B-Instruct"
PROFILE = "l4/llama-3.1-8b-tp1"
SGLANG = {"x-capbalancer-model": "sg-model"}
TGI = {"x-capbalancer-model": "tgi-model"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    ports = {name: free_port() for name in ("v0", "v1", "tgi0", "sg0")}
    engines = {"v0": "vllm", "v1": "vllm", "tgi0": "tgi", "sg0": "sglang"}
    models = {"v0": SERVED, "v1": SERVED, "tgi0": "tgi-model", "sg0": "sg-model"}
    path = tmp_path_factory.mktemp("routes") / "fleet.json"  # JSON is YAML
    path.write_text(json.dumps({"instances": [
        {"name": n, "engine": engines[n], "model": models[n], "profile": PROFILE, "port": p}
        for n, p in ports.items()]}))
    url = {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}
    config = {"models": {
        "llama": {"default": True, "aliases": ["chat"],
                  "backends": [{"name": "v0", "url": url["v0"]}, {"name": "v1", "url": url["v1"]}]},
        "tgi-model": {"backends": [{"name": "tgi0", "url": url["tgi0"], "engine": "tgi"}]},
        "sg-model": {"backends": [{"name": "sg0", "url": url["sg0"], "engine": "sglang"}]}}}
    with running(capbalancer("sim", "--cluster", str(path)), ready_url=url["sg0"] + "/health"), \
            Proxy(config=config) as proxy:
        _wait_discovered(proxy)
        yield proxy


def _wait_discovered(proxy: Proxy, timeout_s: float = 10.0) -> None:
    """The proxy learns each backend's served name from its /v1/models right after it starts."""
    deadline = time.monotonic() + timeout_s
    body = {"model": "chat", "prompt": "hi", "max_tokens": 1}
    while True:
        statuses = {proxy.request("POST", "/v1/completions", body)[0] for _ in range(4)}
        if statuses == {200} or time.monotonic() > deadline:
            assert statuses == {200}, statuses
            return
        time.sleep(0.1)


def _wav(seconds: float = 0.5) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(struct.pack("<h", 0) * int(16000 * seconds))
    return out.getvalue()


def _multipart(fields: dict[str, str], audio: bytes) -> tuple[bytes, str]:
    boundary = "capbtestboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                 f"Content-Type: audio/wav\r\n\r\n".encode() + audio + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


# One request per route of routes.ROUTES (the stateful and LoRA ones are exercised in their own tests).
SAMPLES: dict[tuple[str, str], tuple[dict | None, dict[str, str]]] = {
    ("POST", "/v1/completions"): ({"model": "chat", "prompt": "hello", "max_tokens": 3}, {}),
    ("POST", "/v1/chat/completions"): ({"model": "llama", "messages": [{"role": "user", "content": "hi"}],
                                        "max_tokens": 3}, {}),
    ("POST", "/v1/embeddings"): ({"model": "chat", "input": ["one", "two"]}, {}),
    ("POST", "/v1/responses"): ({"model": "chat", "input": "hello", "max_output_tokens": 3}, {}),
    ("POST", "/v1/messages"): ({"model": "chat", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]},
                               {}),
    ("POST", "/invocations"): ({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                               {}),
    ("POST", "/pooling"): ({"model": "chat", "input": "pool me"}, {}),
    ("POST", "/classify"): ({"model": "chat", "input": ["good", "bad"]}, {}),
    ("POST", "/score"): ({"model": "chat", "text_1": "q", "text_2": ["a", "b"]}, {}),
    ("POST", "/v1/score"): ({"model": "chat", "text_1": "q", "text_2": ["a", "b"]}, {}),
    ("POST", "/rerank"): ({"model": "chat", "query": "q", "documents": ["a", "b", "c"], "top_n": 2}, {}),
    ("POST", "/v1/rerank"): ({"model": "chat", "query": "q", "documents": ["a", "b"]}, {}),
    ("POST", "/v2/rerank"): ({"model": "chat", "query": "q", "documents": ["a", "b"]}, {}),
    ("POST", "/encode"): ({"text": "embed me"}, SGLANG),
    ("POST", "/generate"): ({"inputs": "hello", "parameters": {"max_new_tokens": 3}}, TGI),
    ("POST", "/generate_stream"): ({"inputs": "hello", "parameters": {"max_new_tokens": 3}}, TGI),
    ("POST", "/"): ({"inputs": "hello", "parameters": {"max_new_tokens": 3}}, TGI),
    ("POST", "/tokenize"): ({"model": "chat", "prompt": "count these tokens"}, {}),
    ("POST", "/detokenize"): ({"model": "chat", "tokens": tokenizer.encode("a few words")}, {}),
    ("GET", "/version"): (None, {}),
}
SEPARATE = {"/v1/responses/{response_id}", "/v1/responses/{response_id}/cancel", "/v1/audio/transcriptions",
            "/v1/audio/translations", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/load_lora_adapter",
            "/unload_lora_adapter"}


def test_every_route_has_a_sample_here_and_a_line_in_the_docs():
    from support import REPO

    doc = (REPO / "docs" / "routes.md").read_text()
    for rule in ROUTES:
        assert (rule.method, rule.path) in SAMPLES or rule.path in SEPARATE, rule
        assert f"`{rule.path}`" in doc, f"docs/routes.md does not list {rule.path}"


def test_every_route_answers_through_the_proxy(fleet: Proxy):
    for (method, path), (body, headers) in SAMPLES.items():
        status, hdrs, raw = fleet.request(method, path, body, headers)
        assert status == 200, (path, status, raw[:300])
        assert hdrs.get("x-capbalancer-backend"), path
        if path in ("/encode",):
            assert hdrs["x-capbalancer-backend"] == "sg0"
    # The shapes the engines answer, unchanged.
    status, _, raw = fleet.request("POST", "/", SAMPLES[("POST", "/")][0], TGI)
    assert isinstance(json.loads(raw), list) and "generated_text" in json.loads(raw)[0]  # TGI's root: a list
    status, _, raw = fleet.request("POST", "/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2}},
                                   SGLANG)
    assert status == 200 and json.loads(raw)["meta_info"]["completion_tokens"] == 2  # SGLang's /generate
    status, _, raw = fleet.request("POST", "/v1/chat/completions",
                                   {"model": "tgi-model", "messages": [{"role": "user", "content": "hi"}],
                                    "max_tokens": 2})
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"]  # TGI's Messages API
    assert fleet.request("GET", "/ping")[0] == 200 and fleet.request("POST", "/ping", {})[0] == 200
    tok = json.loads(fleet.request("POST", "/tokenize", {"model": "chat", "prompt": "x" * 40})[2])
    assert tok["count"] == 10 and len(tok["tokens"]) == 10


def test_unknown_paths_and_models_are_404_in_the_openai_shape(fleet: Proxy):
    status, _, raw = fleet.request("POST", "/v1/not-a-route", {"model": "chat"})
    assert status == 404 and json.loads(raw)["error"]["type"] == "not_found_error"
    status, _, raw = fleet.request("POST", "/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 404 and json.loads(raw)["error"]["code"] == "model_not_found"
    status, _, raw = fleet.request("GET", "/v1/responses/resp_unknown")
    assert status == 404 and json.loads(raw)["error"]["code"] == "not_found"


def test_responses_are_retrieved_from_the_backend_that_created_them(fleet: Proxy):
    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key="none", max_retries=0)
    created = []
    for i in range(4):
        raw = client.responses.with_raw_response.create(model="chat", input=f"question {i}", max_output_tokens=2)
        created.append((raw.parse(), raw.headers["x-capbalancer-backend"]))
    for resp, backend in created:
        assert resp.output_text
        raw = client.responses.with_raw_response.retrieve(resp.id)
        assert raw.headers["x-capbalancer-backend"] == backend and raw.parse().id == resp.id
        # vLLM refuses to cancel a finished synchronous response: the refusal comes from the creator.
        status, hdrs, body = fleet.request("POST", f"/v1/responses/{resp.id}/cancel", {})
        assert status == 400 and hdrs["x-capbalancer-backend"] == backend, body
    # A continuation goes where the previous response lives.
    for resp, backend in created:
        status, hdrs, _ = fleet.request("POST", "/v1/responses", {"model": "chat", "input": "more",
                                                                  "max_output_tokens": 2,
                                                                  "previous_response_id": resp.id})
        assert status == 200 and hdrs["x-capbalancer-backend"] == backend


def test_openai_client_on_every_openai_route(fleet: Proxy):
    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key="none", max_retries=0)
    c = client.completions.create(model="chat", prompt="hello there", max_tokens=4)
    assert c.choices[0].text and c.usage.completion_tokens >= 1
    chat = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.choices[0].message.content and chat.model == SERVED
    chunks = list(client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    emb = client.embeddings.create(model="chat", input=["a", "b", "c"])  # base64 by default, decoded by the SDK
    assert len(emb.data) == 3 and len(emb.data[0].embedding) == 8
    resp = client.responses.create(model="chat", input="hello", max_output_tokens=3)
    assert resp.output_text and client.responses.retrieve(resp.id).id == resp.id
    tr = client.audio.transcriptions.create(model="chat", file=("a.wav", _wav(), "audio/wav"))
    assert tr.text
    tl = client.audio.translations.create(model="chat", file=("a.wav", _wav(), "audio/wav"))
    assert tl.text


def test_audio_multipart_passes_through_with_the_model_rewritten(fleet: Proxy):
    body, ctype = _multipart({"model": "chat", "response_format": "text"}, _wav(1.0))
    status, hdrs, raw = fleet.request("POST", "/v1/audio/transcriptions", body, {"Content-Type": ctype})
    assert status == 200 and hdrs["Content-Type"].startswith("text/plain") and raw.strip(), raw
    status, _, raw = fleet.request("POST", "/v1/audio/transcriptions", b"not multipart",
                                   {"Content-Type": "application/json"})
    assert status == 400


def test_the_response_affinity_map_is_bounded_in_size_and_time():
    from capbalancer.server.affinity import ObjectAffinity

    m = ObjectAffinity(max_entries=3, ttl_s=10.0)
    for i in range(5):
        m.remember(f"resp_{i}", f"b{i}", now=float(i))
    assert len(m) == 3 and m.backend_of("resp_0", 5.0) is None and m.backend_of("resp_4", 5.0) == "b4"
    assert m.backend_of("resp_2", 12.5) is None and m.backend_of("resp_3", 12.5) == "b3"  # resp_2 expired at 12
    m.remember("resp_3", "b9", now=13.0)  # re-created: newest again, with a fresh TTL
    assert m.backend_of("resp_3", 22.0) == "b9" and m.backend_of("resp_4", 22.0) is None


def test_a_response_created_through_another_proxy_is_found_on_its_backend(fleet: Proxy):
    """Another worker or replica (here a second proxy process) never saw the object created: it asks the
    backends, finds the one holding it, and remembers it."""
    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key="none", max_retries=0)
    created = []
    for i in range(4):
        raw = client.responses.with_raw_response.create(model="chat", input=f"elsewhere {i}", max_output_tokens=2)
        created.append((raw.parse(), raw.headers["x-capbalancer-backend"]))
    with Proxy(config=fleet.config) as other:
        _wait_discovered(other)
        other_client = openai.OpenAI(base_url=other.url + "/v1", api_key="none", max_retries=0)
        for resp, backend in created:
            raw = other_client.responses.with_raw_response.retrieve(resp.id)
            assert raw.headers["x-capbalancer-backend"] == backend and raw.parse().id == resp.id
            status, hdrs, _ = other.request("POST", "/v1/responses", {"model": "chat", "input": "more",
                                                                      "max_output_tokens": 2,
                                                                      "previous_response_id": resp.id})
            assert status == 200 and hdrs["x-capbalancer-backend"] == backend
        status, _, raw = other.request("GET", "/v1/responses/resp_nobody_has_this")
        assert status == 404 and json.loads(raw)["error"]["code"] == "not_found"
        status, _, raw = other.request("POST", "/v1/responses", {"model": "chat", "input": "x",
                                                                 "previous_response_id": "resp_nobody"})
        assert status == 404 and json.loads(raw)["error"]["param"] == "previous_response_id"


def test_streamed_responses_are_pinned_from_their_first_event(fleet: Proxy):
    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key="none", max_retries=0)
    for i in range(4):
        events = list(client.responses.create(model="chat", input=f"stream {i}", max_output_tokens=3, stream=True))
        assert events[0].type == "response.created" and events[-1].type == "response.completed"
        done = events[-1].response
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert done.output_text == deltas and deltas
        # Known to the proxy from the stream's first event: retrieved from the backend that streamed it.
        assert client.responses.retrieve(done.id).output_text == deltas
