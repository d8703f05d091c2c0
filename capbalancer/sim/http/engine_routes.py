"""The vLLM OpenAI server's routes beyond completions and chat, minimal but shaped as vLLM answers them:
/v1/responses (create, retrieve, cancel), /v1/messages (Anthropic), /v1/embeddings,
/pooling, /classify, /score and /v1/score, /rerank, /v1/rerank and /v2/rerank, /v1/audio/transcriptions and
/translations (multipart), /invocations (SageMaker: dispatched on the body's shape), and LoRA adapters
(/v1/load_lora_adapter, /v1/unload_lora_adapter). Field names follow vllm/entrypoints/openai/protocol.py and
the pooling/score protocols; the values are synthetic.

Work goes through the engine model so that it costs what it would: generation routes generate tokens;
pooling routes (embeddings, score, rerank, classify) are a prefill and one step (max_tokens=1).
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
import uuid
from collections import OrderedDict
from typing import Any

import orjson
from aiohttp import web

from capbalancer.sim import tokenizer
from capbalancer.sim.http.instance import RequestStream
from capbalancer.sim.http.openai_api import (
    OpenAIRoutes,
    bad_request,
    count_text_tokens,
    error_response,
    read_json,
    tokens_text,
)

EMBEDDING_DIM = 8  # synthetic vectors: small, the shape is what matters
MAX_STORED_RESPONSES = 1024  # /v1/responses objects kept for retrieval (oldest dropped)
AUDIO_BYTES_PER_TOKEN = 640  # 16 kHz 16-bit mono is 32 kB/s; Whisper's encoder sees 50 frames/s
AUDIO_MAX_TOKENS = 16


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type="application/json")


def _texts(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [" " * (4 * len(value))]  # token ids: 4 characters each at the sim's ratio
    return None


def _vector(seed: str) -> list[float]:
    h = uuid.uuid5(uuid.NAMESPACE_OID, seed).bytes
    return [(b - 128) / 128.0 for b in h[:EMBEDDING_DIM]]


class EngineRoutes:
    """Adds the routes to an app; `api` gives the model check, request submission and waiting."""

    def __init__(self, api: OpenAIRoutes) -> None:
        self.api = api
        self.inst = api.inst
        self.responses: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def add_to(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/v1/responses", self.responses_create)
        r.add_get("/v1/responses/{response_id}", self.responses_retrieve)
        r.add_post("/v1/responses/{response_id}/cancel", self.responses_cancel)
        r.add_post("/v1/messages", self.messages)
        r.add_post("/v1/embeddings", self.embeddings)
        r.add_post("/pooling", self.pooling)
        r.add_post("/classify", self.classify)
        for path in ("/score", "/v1/score"):
            r.add_post(path, self.score)
        for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
            r.add_post(path, self.rerank)
        r.add_post("/v1/audio/transcriptions", self.audio)
        r.add_post("/v1/audio/translations", self.audio)
        r.add_post("/invocations", self.invocations)
        r.add_post("/v1/load_lora_adapter", self.load_lora)
        r.add_post("/v1/unload_lora_adapter", self.unload_lora)

    # --- helpers ---------------------------------------------------------------------------------
    async def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        err = self.api._check_model(body)
        return err if err is not None else body

    async def _run(self, prompt_tokens: int, max_tokens: int, body: dict[str, Any]) -> RequestStream | web.Response:
        stream = self.api._submit({**body, "max_tokens": max_tokens}, prompt_tokens, max_tokens)
        if isinstance(stream, web.Response):
            return stream
        await self.api._await_finish(stream)
        return stream

    async def _prefill(self, texts: list[str], body: dict[str, Any]) -> int | web.Response:
        """A pooling request through the engine (prefill and one step); returns its tokens. vLLM runs each input
        of a list as its own prompt, each within max_model_len (their sum may be far longer); here the inputs are
        packed into engine requests of at most one context each, run at once, so a batch of 100,000 short inputs
        costs its prefill without 100,000 engine requests."""
        counts = [count_text_tokens(t) for t in texts]
        room = self.inst.engine.max_model_len - 1  # each engine request also decodes one step
        too_long = next((c for c in counts if c > room), None)
        if too_long is not None:
            refused = await self._run(too_long, 1, {"ignore_eos": True})  # the engine's own 400, as vLLM words it
            if isinstance(refused, web.Response):
                return refused
        groups: list[int] = []
        for count in counts:
            if groups and groups[-1] + count <= room:
                groups[-1] += count
            else:
                groups.append(count)
        done = await asyncio.gather(*(self._run(g, 1, {"ignore_eos": True}) for g in groups))
        return next((d for d in done if isinstance(d, web.Response)), None) or sum(counts)

    def _model(self, body: dict[str, Any]) -> str:
        return body.get("model") or self.inst.model

    @staticmethod
    def _pool_usage(tokens: int) -> dict[str, Any]:
        return {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0, "prompt_tokens_details": None}

    # --- /v1/responses ---------------------------------------------------------------------------
    async def responses_create(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        value = body.get("input")
        if isinstance(value, list):  # a list of input items: count their text
            text = " ".join(str(item.get("content", "")) for item in value if isinstance(item, dict))
        elif isinstance(value, str):
            text = value
        else:
            return bad_request("input must be a string or a list of input items", "input")
        if isinstance(body.get("instructions"), str):
            text = body["instructions"] + text
        max_out = body.get("max_output_tokens") or 16
        if not isinstance(max_out, int) or max_out < 1:
            return bad_request("max_output_tokens must be a positive integer", "max_output_tokens")
        if body.get("stream"):
            return await self._responses_stream(request, body, count_text_tokens(text), max_out)
        done = await self._run(count_text_tokens(text), max_out, body)
        if isinstance(done, web.Response):
            return done
        return _json(self._store(self._response_object(body, max_out, f"resp_{uuid.uuid4().hex}",
                                                       f"msg_{uuid.uuid4().hex}", done)))

    def _response_object(self, body: dict[str, Any], max_out: int, rid: str, mid: str,
                         done: RequestStream | None) -> dict[str, Any]:
        """A Responses API object: completed with its output when `done`, else in progress and empty."""
        generated = done.generated if done is not None else 0
        prompt = done.prompt_tokens if done is not None else 0
        return {"id": rid, "object": "response", "created_at": int(time.time()), "model": self._model(body),
                "status": "completed" if done is not None else "in_progress", "background": False, "error": None,
                "incomplete_details": None,
                "instructions": body.get("instructions"), "max_output_tokens": max_out, "metadata": body.get("metadata"),
                "parallel_tool_calls": True, "previous_response_id": body.get("previous_response_id"),
                "reasoning": None, "service_tier": "auto", "store": body.get("store", True), "temperature": 1.0,
                "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "top_p": 1.0,
                "truncation": "disabled", "user": None,
                "output": [] if done is None else [
                    {"type": "message", "id": mid, "role": "assistant", "status": "completed",
                     "content": [{"type": "output_text", "text": tokens_text(0, generated), "annotations": [],
                                  "logprobs": None}]}],
                "usage": None if done is None else {
                    "input_tokens": prompt, "output_tokens": generated, "total_tokens": prompt + generated,
                    "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}}

    def _store(self, obj: dict[str, Any]) -> dict[str, Any]:
        if obj["store"]:
            self.responses[obj["id"]] = obj
            while len(self.responses) > MAX_STORED_RESPONSES:
                self.responses.popitem(last=False)
        return obj

    async def _responses_stream(self, request: web.Request, body: dict[str, Any], prompt_tokens: int,
                                max_out: int) -> web.StreamResponse:
        """The Responses API's typed SSE events (`event:` then `data:`), as vLLM's serving_responses sends:
        created, in_progress, the message item and its text part, one delta per step, done events, completed."""
        stream = self.api._submit({**body, "max_tokens": max_out}, prompt_tokens, max_out)
        if isinstance(stream, web.Response):
            return stream
        rid, mid = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream; charset=utf-8",
                                                       "Cache-Control": "no-cache"})
        seq = 0
        finished = False

        async def event(kind: str, payload: dict[str, Any]) -> None:
            nonlocal seq
            data = orjson.dumps({"type": kind, "sequence_number": seq, **payload})
            seq += 1
            await resp.write(b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n")

        try:
            await resp.prepare(request)
            started = self._response_object(body, max_out, rid, mid, None)
            await event("response.created", {"response": started})
            await event("response.in_progress", {"response": started})
            item = {"type": "message", "id": mid, "role": "assistant", "status": "in_progress", "content": []}
            await event("response.output_item.added", {"output_index": 0, "item": item})
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            await event("response.content_part.added", {"item_id": mid, "output_index": 0, "content_index": 0,
                                                        "part": part})
            sent = 0
            while not finished:
                got = await stream.queue.get()
                while got is not None and not stream.queue.empty():
                    got = stream.queue.get_nowait()
                finished = got is None
                upto = stream.generated if finished else got
                if upto > sent:
                    await event("response.output_text.delta", {"item_id": mid, "output_index": 0, "content_index": 0,
                                                               "delta": tokens_text(sent, upto), "logprobs": []})
                    sent = upto
            text = tokens_text(0, stream.generated)
            await event("response.output_text.done", {"item_id": mid, "output_index": 0, "content_index": 0,
                                                      "text": text, "logprobs": []})
            await event("response.content_part.done", {"item_id": mid, "output_index": 0, "content_index": 0,
                                                       "part": {**part, "text": text}})
            final = self._store(self._response_object(body, max_out, rid, mid, stream))
            await event("response.output_item.done", {"output_index": 0, "item": final["output"][0]})
            await event("response.completed", {"response": final})
            await resp.write_eof()
        finally:
            if not finished:
                self.inst.abort(stream.request_id)
        return resp

    def _stored(self, request: web.Request) -> dict[str, Any] | web.Response:
        rid = request.match_info["response_id"]
        obj = self.responses.get(rid)
        if obj is None:
            return error_response(404, f"Response with id '{rid}' not found.", "invalid_request_error", "response_id")
        return obj

    async def responses_retrieve(self, request: web.Request) -> web.Response:
        obj = self._stored(request)
        return obj if isinstance(obj, web.Response) else _json(obj)

    async def responses_cancel(self, request: web.Request) -> web.Response:
        obj = self._stored(request)
        if isinstance(obj, web.Response):
            return obj
        if not obj.get("background"):  # vLLM: only background responses can be cancelled
            return bad_request("Cannot cancel a synchronous response.", "response_id")
        obj["status"] = "cancelled"
        return _json(obj)

    # --- /v1/messages (Anthropic Messages API) ----------------------------------------------------
    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        messages = body.get("messages")
        max_tokens = body.get("max_tokens")
        if not isinstance(messages, list) or not isinstance(max_tokens, int) or max_tokens < 1:
            return bad_request("messages (a list) and max_tokens (a positive integer) are required")
        tokens = count_text_tokens(tokenizer.render_chat([m for m in messages if isinstance(m, dict)]))
        done = await self._run(tokens, max_tokens, body)
        if isinstance(done, web.Response):
            return done
        return _json({"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
                      "model": self._model(body), "content": [{"type": "text", "text": tokens_text(0, done.generated)}],
                      "stop_reason": "max_tokens" if done.finish_reason == "length" else "end_turn",
                      "stop_sequence": None,
                      "usage": {"input_tokens": done.prompt_tokens, "output_tokens": done.generated}})

    # --- pooling routes ----------------------------------------------------------------------------
    async def _pooling_input(self, request: web.Request, missing: str
                             ) -> tuple[dict[str, Any], list[str], int] | web.Response:
        """The body, its `input` texts and their prefilled token count, or the error answer (bad JSON, no input,
        engine refused)."""
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        texts = _texts(body.get("input"))
        if not texts:
            return bad_request(missing, "input")
        tokens = await self._prefill(texts, body)
        if isinstance(tokens, web.Response):
            return tokens
        return body, texts, tokens

    async def embeddings(self, request: web.Request) -> web.Response:
        read = await self._pooling_input(request, "input must be a string, a list of strings or a list of token ids")
        if isinstance(read, web.Response):
            return read
        body, texts, tokens = read
        b64 = body.get("encoding_format") == "base64"  # the openai SDK asks for base64 by default
        data = []
        for i, text in enumerate(texts):
            vec = _vector(text)
            emb: Any = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if b64 else vec
            data.append({"index": i, "object": "embedding", "embedding": emb})
        return _json({"id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                      "model": self._model(body), "data": data, "usage": self._pool_usage(tokens)})

    async def pooling(self, request: web.Request) -> web.Response:
        read = await self._pooling_input(request, "input is required")
        if isinstance(read, web.Response):
            return read
        body, texts, tokens = read
        return _json({"id": f"pool-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                      "model": self._model(body), "usage": self._pool_usage(tokens),
                      "data": [{"index": i, "object": "pooling", "data": _vector(t)} for i, t in enumerate(texts)]})

    async def classify(self, request: web.Request) -> web.Response:
        read = await self._pooling_input(request, "input is required")
        if isinstance(read, web.Response):
            return read
        body, texts, tokens = read
        data = []
        for i, t in enumerate(texts):
            p = (_vector(t)[0] + 1.0) / 2.0
            data.append({"index": i, "label": "LABEL_1" if p >= 0.5 else "LABEL_0", "probs": [1.0 - p, p],
                         "num_classes": 2})
        return _json({"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                      "model": self._model(body), "data": data, "usage": self._pool_usage(tokens)})

    async def score(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        first, second = _texts(body.get("text_1")), _texts(body.get("text_2"))
        if not first or not second:
            return bad_request("text_1 and text_2 are required", "text_1")
        if len(first) == 1:
            first = first * len(second)
        if len(first) != len(second):
            return bad_request("text_1 and text_2 must have the same length (or text_1 one item)", "text_2")
        tokens = await self._prefill([a + b for a, b in zip(first, second, strict=True)], body)
        if isinstance(tokens, web.Response):
            return tokens
        data = [{"index": i, "object": "score", "score": (_vector(a + b)[0] + 1.0) / 2.0}
                for i, (a, b) in enumerate(zip(first, second, strict=True))]
        return _json({"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                      "model": self._model(body), "data": data, "usage": self._pool_usage(tokens)})

    async def rerank(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        query, docs = body.get("query"), _texts(body.get("documents"))
        if not isinstance(query, str) or not docs:
            return bad_request("query (a string) and documents are required", "documents")
        tokens = await self._prefill([query + d for d in docs], body)
        if isinstance(tokens, web.Response):
            return tokens
        results = sorted(({"index": i, "document": {"text": d}, "relevance_score": (_vector(query + d)[0] + 1) / 2}
                          for i, d in enumerate(docs)), key=lambda r: -r["relevance_score"])
        top_n = body.get("top_n")
        if isinstance(top_n, int) and top_n > 0:
            results = results[:top_n]
        return _json({"id": f"rerank-{uuid.uuid4().hex}", "model": self._model(body),
                      "usage": {"total_tokens": tokens}, "results": results})

    # --- audio (multipart) -------------------------------------------------------------------------
    async def audio(self, request: web.Request) -> web.Response:
        if not request.content_type.startswith("multipart/"):
            return bad_request("audio requests are multipart/form-data", "file")
        form = await request.post()
        upload = form.get("file")
        if upload is None or not hasattr(upload, "file"):
            return bad_request("file is required", "file")
        size = len(upload.file.read())
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        err = self.api._check_model(fields)
        if err is not None:
            return err
        done = await self._run(max(1, size // AUDIO_BYTES_PER_TOKEN), AUDIO_MAX_TOKENS, {})
        if isinstance(done, web.Response):
            return done
        text = tokens_text(0, done.generated).strip()
        if fields.get("response_format") == "text":
            return web.Response(text=text, content_type="text/plain")
        return _json({"text": text, "usage": {"type": "duration", "seconds": max(1, size // 32000)}})

    # --- /invocations (SageMaker): the body's shape says which API ---------------------------------
    async def invocations(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        if "messages" in body:
            return await self.api.chat_completions(request)
        if "prompt" in body:
            return await self.api.completions(request)
        if "input" in body:
            return await self.embeddings(request)
        return bad_request("Cannot identify the request type from the body (messages, prompt or input)")

    # --- LoRA adapters -----------------------------------------------------------------------------
    async def load_lora(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str):
            return bad_request("Both 'lora_name' and 'lora_path' must be provided.")
        if name in self.inst.adapters:
            return bad_request(f"The lora adapter '{name}' has already been loaded.", "lora_name")
        self.inst.adapters[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        name = body.get("lora_name")
        if self.inst.adapters.pop(name, None) is None:
            return error_response(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError", "lora_name")
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")
