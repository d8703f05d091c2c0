"""OpenAI-compatible routes as vLLM serves them (SGLang serves the same shapes): completions and chat
completions (stream and not, `usage`, `stream_options.include_usage`), /v1/models, and vLLM's error
bodies (`{"error": {"message", "type", "param", "code"}}`). Field for field as a real vLLM 0.32 answers
(captured in tests/data/real/vllm-cpu-*.json|sse; vllm/entrypoints/openai/protocol.py defines them).

Prompts are tokenized by the simulator's tokenizer (sim/tokenizer.py: 4 bytes per token, what `capbalancer
loadtest`'s synthetic prompts and the proxy's default estimate assume), so the engine's prefix cache sees token
ids; chat messages go through its chat template. Generated text is one four-character word per token.
`/tokenize` and `/detokenize` answer as vLLM's do.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import orjson
from aiohttp import web

from capbalancer.sim import tokenizer
from capbalancer.sim.engine import RequestTooLong
from capbalancer.sim.http.instance import RequestStream, SimInstance

_WORDS = tokenizer.WORDS
# vLLM sets no bound on `n`; the simulator fans a request out into that many engine requests held in memory, so
# it refuses more than OpenAI's own limit (128) rather than let one request exhaust the process.
MAX_SEQUENCES = 128


def count_text_tokens(text: str) -> int:
    return tokenizer.count_tokens(text)


def token_text(index: int) -> str:
    return _WORDS[index % len(_WORDS)]


def tokens_text(start: int, end: int) -> str:
    return "".join(_WORDS[i % len(_WORDS)] for i in range(start, end))


def error_response(status: int, message: str, err_type: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def bad_request(message: str, param: str | None = None) -> web.Response:
    return error_response(400, message, "BadRequestError", param)


async def read_json(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        return bad_request(f"Invalid JSON body: {exc}")
    if not isinstance(body, dict):
        return bad_request("The request body must be a JSON object")
    return body


class OpenAIRoutes:
    def __init__(self, inst: SimInstance, owned_by: str = "vllm") -> None:
        self.inst = inst
        self.owned_by = owned_by
        self.created = int(time.time())
        self.fingerprint = f"{owned_by}-sim-{uuid.uuid4().hex[:8]}"

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)

    # --- /tokenize, /detokenize (vLLM's serving_tokenization) ------------------------------------
    async def tokenize(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        if (err := self._check_model(body)) is not None:
            return err
        if isinstance(body.get("messages"), list):
            if (err := _check_messages(body["messages"])) is not None:
                return err
            ids = tokenizer.encode(tokenizer.render_chat(body["messages"],
                                                         bool(body.get("add_generation_prompt", True))))
        elif isinstance(body.get("prompt"), str):
            ids = tokenizer.encode(body["prompt"])
        else:
            return bad_request("give a prompt string or messages", "prompt")
        return web.json_response({"count": len(ids), "max_model_len": self.inst.engine.max_model_len,
                                  "tokens": ids, "token_strs": None})

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        if (err := self._check_model(body)) is not None:
            return err
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            return bad_request("tokens must be a list of token ids", "tokens")
        try:
            return web.json_response({"prompt": tokenizer.decode(ids)})
        except ValueError as exc:
            return bad_request(str(exc), "tokens")

    async def models(self, request: web.Request) -> web.Response:
        inst = self.inst
        card = {"id": inst.model, "object": "model", "created": self.created, "owned_by": self.owned_by,
                "root": inst.model, "parent": None, "max_model_len": inst.engine.max_model_len,
                "permission": [{"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission",
                                "created": self.created, "allow_create_engine": False, "allow_sampling": True,
                                "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                                "allow_fine_tuning": False, "organization": "*", "group": None,
                                "is_blocking": False}]}
        cards = [card] + [{**card, "id": name, "root": path, "parent": inst.model, "permission": card["permission"]}
                          for name, path in inst.adapters.items()]
        return web.json_response({"object": "list", "data": cards}, dumps=lambda o: orjson.dumps(o).decode())

    # --- common ----------------------------------------------------------------------------------
    def _check_model(self, body: dict[str, Any]) -> web.Response | None:
        model = body.get("model")
        if model is not None and model != self.inst.model and model not in self.inst.adapters:
            return error_response(404, f"The model `{model}` does not exist. Valid aliases: {self.inst.model}.",
                                  "NotFoundError", "model")
        return None

    def _max_tokens(self, body: dict[str, Any], prompt_tokens: int, default: int | None) -> int | web.Response:
        value = body.get("max_completion_tokens", body.get("max_tokens", default))
        if value is None:
            value = self.inst.engine.max_model_len - prompt_tokens
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return bad_request(f"max_tokens must be at least 1, got {value}.", "max_tokens")
        return value

    def _submit(self, body: dict[str, Any], prompt_tokens: int, default_max_tokens: int | None,
                token_ids: list[int] | None = None) -> RequestStream | web.Response:
        """The request's max_tokens checked, then the request into the engine; a 400 for either."""
        max_tokens = self._max_tokens(body, prompt_tokens, default_max_tokens)
        if isinstance(max_tokens, web.Response):
            return max_tokens
        seed = body.get("seed")
        try:
            return self.inst.submit(prompt_tokens, max_tokens, ignore_eos=bool(body.get("ignore_eos", False)),
                                    seed=seed if isinstance(seed, int) else None, token_ids=token_ids)
        except RequestTooLong as exc:
            return bad_request(str(exc), exc.param)

    def _submit_all(self, body: dict[str, Any], prompt_tokens: int, default_max_tokens: int | None,
                    token_ids: list[int] | None = None) -> list[RequestStream] | web.Response:
        """`max(n, best_of)` sequences of one prompt, each its own request in the engine, as vLLM's v1 fans
        a request out into child requests (the children after the first find the prompt in the prefix cache
        when it is on)."""
        counts = []
        for key in ("n", "best_of"):
            value = body.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                return bad_request(f"{key} must be at least 1, got {value}.", key)
            if value is not None and value > MAX_SEQUENCES:
                return bad_request(f"{key} must be at most {MAX_SEQUENCES}, got {value}.", key)
            counts.append(value or 1)
        seed = body.get("seed")
        streams: list[RequestStream] = []
        for i in range(max(counts)):
            child = body if i == 0 else {**body, "seed": seed + i if isinstance(seed, int) else None}
            stream = self._submit(child, prompt_tokens, default_max_tokens, token_ids)
            if isinstance(stream, web.Response):
                for s in streams:
                    self.inst.abort(s.request_id)
                return stream
            streams.append(stream)
        return streams

    @staticmethod
    def _usage_all(streams: list[RequestStream], details: bool = True) -> dict[str, Any]:
        generated = sum(s.generated for s in streams)
        prompt = streams[0].prompt_tokens
        usage: dict[str, Any] = {"prompt_tokens": prompt, "total_tokens": prompt + generated,
                                 "completion_tokens": generated}
        if details:
            usage["prompt_tokens_details"] = None
            usage["completion_tokens_details"] = None
        return usage

    async def _run_streams(self, request: web.Request, streams: list[RequestStream], chunk_of,
                           usage_chunk, first_chunk_of) -> web.StreamResponse:
        """n > 1 sequences in one SSE stream: each choice's deltas as they come, tagged with its index."""
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream; charset=utf-8",
                                                       "Cache-Control": "no-cache"})
        lock = asyncio.Lock()
        done: set[str] = set()

        async def one(index: int, stream: RequestStream) -> None:
            sent = 0
            while True:
                item = await stream.queue.get()
                while item is not None and not stream.queue.empty():
                    item = stream.queue.get_nowait()
                upto = stream.generated if item is None else item
                if upto > sent or item is None:
                    async with lock:
                        await resp.write(chunk_of(tokens_text(sent, upto),
                                                  stream.finish_reason if item is None else None, index))
                    sent = upto
                if item is None:
                    done.add(stream.request_id)
                    return

        try:
            await resp.prepare(request)
            if first_chunk_of is not None:
                for i in range(len(streams)):
                    await resp.write(first_chunk_of(i))
            await asyncio.gather(*(one(i, s) for i, s in enumerate(streams)))
            if usage_chunk is not None:
                await resp.write(usage_chunk())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        finally:
            for s in streams:
                if s.request_id not in done:
                    self.inst.abort(s.request_id)
        return resp

    async def _await_all(self, streams: list[RequestStream]) -> None:
        await asyncio.gather(*(self._await_finish(s) for s in streams))

    @staticmethod
    def _usage(stream: RequestStream, details: bool = True) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": stream.prompt_tokens,
                                 "total_tokens": stream.prompt_tokens + stream.generated,
                                 "completion_tokens": stream.generated}
        if details:  # the non-streaming body carries these; the final usage chunk of a stream does not
            usage["prompt_tokens_details"] = None
            usage["completion_tokens_details"] = None
        return usage

    async def _collect(self, stream: RequestStream) -> None:
        while True:
            item = await stream.queue.get()
            if item is None:
                return

    async def _run_stream(self, request: web.Request, stream: RequestStream, chunk_of, usage_chunk,
                          first_chunk: bytes | None) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream; charset=utf-8",
                                                       "Cache-Control": "no-cache"})
        finished = False
        try:
            await resp.prepare(request)
            if first_chunk is not None:
                await resp.write(first_chunk)
            sent = 0
            while not finished:
                item = await stream.queue.get()
                # Tokens that arrived together go out as one delta, as vLLM does when it falls behind.
                upto = stream.generated if item is None else item
                while not stream.queue.empty():
                    nxt = stream.queue.get_nowait()
                    if nxt is None:
                        item = None
                    else:
                        upto = nxt
                if item is None:
                    finished = True
                    upto = stream.generated
                if upto > sent or finished:
                    reason = stream.finish_reason if finished else None
                    await resp.write(chunk_of(tokens_text(sent, upto), reason))
                    sent = upto
            if usage_chunk is not None:
                await resp.write(usage_chunk())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        finally:
            if not finished:
                self.inst.abort(stream.request_id)
        return resp

    async def _await_finish(self, stream: RequestStream) -> None:
        done = False
        try:
            await self._collect(stream)
            done = True
        finally:
            if not done:
                with contextlib.suppress(Exception):
                    self.inst.abort(stream.request_id)

    # --- /v1/completions ----------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        if (err := self._check_model(body) or _check_stream_options(body)) is not None:
            return err
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            token_ids = tokenizer.encode(prompt) or None
            prompt_tokens = count_text_tokens(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            token_ids = prompt
            prompt_tokens = len(prompt)
        else:
            return bad_request("prompt must be a string or a list of token ids (one prompt per request)", "prompt")
        await self.inst.front_end(prompt_tokens)
        # max_tokens: OpenAI's and vLLM's default for completions
        streams = self._submit_all(body, prompt_tokens, 16, token_ids)
        if isinstance(streams, web.Response):
            return streams
        stream = streams[0]
        returned = streams[:body.get("n") or 1]  # best_of generates more than it returns
        rid = f"cmpl-{stream.request_id}"
        created = int(time.time())
        model = body.get("model") or self.inst.model
        if not body.get("stream"):
            await self._await_all(streams)
            out = {"id": rid, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"index": i, "text": tokens_text(0, s.generated), "logprobs": None,
                                "finish_reason": s.finish_reason, "stop_reason": None, "token_ids": None,
                                "prompt_logprobs": None, "prompt_token_ids": None, "routed_experts": None}
                               for i, s in enumerate(returned)],
                   "service_tier": None, "system_fingerprint": self.fingerprint, "usage": self._usage_all(streams),
                   "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}
            return web.Response(body=orjson.dumps(out), content_type="application/json")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk_of(text: str, reason: str | None, index: int = 0) -> bytes:
            obj = {"id": rid, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason,
                                "stop_reason": None, "prompt_token_ids": None, "token_ids": None}]}
            return b"data: " + orjson.dumps(obj) + b"\n\n"

        def usage_chunk() -> bytes:
            obj = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                   "usage": self._usage_all(streams, details=False), "system_fingerprint": self.fingerprint}
            return b"data: " + orjson.dumps(obj) + b"\n\n"

        if len(streams) > 1:
            return await self._run_streams(request, streams, chunk_of, usage_chunk if include_usage else None, None)
        return await self._run_stream(request, stream, chunk_of, usage_chunk if include_usage else None, None)

    # --- /v1/chat/completions ------------------------------------------------------------------
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        if (err := self._check_model(body) or _check_stream_options(body)) is not None:
            return err
        messages = body.get("messages")
        if (err := _check_messages(messages)) is not None:
            return err
        token_ids = tokenizer.encode(tokenizer.render_chat(messages))
        await self.inst.front_end(len(token_ids))
        # max_tokens: vLLM's is up to the context when unset; chat has no best_of
        streams = self._submit_all({k: v for k, v in body.items() if k != "best_of"}, len(token_ids), None,
                                   token_ids)
        if isinstance(streams, web.Response):
            return streams
        stream = streams[0]
        rid = f"chatcmpl-{stream.request_id}"
        created = int(time.time())
        model = body.get("model") or self.inst.model
        if not body.get("stream"):
            await self._await_all(streams)

            def message(s: RequestStream) -> dict[str, Any]:
                return {"role": "assistant", "content": tokens_text(0, s.generated), "refusal": None,
                        "annotations": None, "audio": None, "function_call": None, "reasoning": None}

            out = {"id": rid, "object": "chat.completion", "created": created, "model": model,
                   "choices": [{"index": i, "message": message(s), "logprobs": None,
                                "finish_reason": s.finish_reason, "stop_reason": None, "token_ids": None,
                                "routed_experts": None} for i, s in enumerate(streams)],
                   "service_tier": None, "system_fingerprint": self.fingerprint, "usage": self._usage_all(streams),
                   "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None,
                   "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}
            return web.Response(body=orjson.dumps(out), content_type="application/json")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk_of(text: str, reason: str | None, index: int = 0) -> bytes:
            choice: dict[str, Any] = {"index": index, "delta": {"content": text}, "logprobs": None,
                                      "finish_reason": reason}
            if reason is not None:
                choice["stop_reason"] = None
            choice["token_ids"] = None
            obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [choice]}
            return b"data: " + orjson.dumps(obj) + b"\n\n"

        def usage_chunk() -> bytes:
            obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [], "usage": self._usage_all(streams, details=False),
                   "system_fingerprint": self.fingerprint}
            return b"data: " + orjson.dumps(obj) + b"\n\n"

        def first_of(index: int) -> bytes:
            return b"data: " + orjson.dumps({
                "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}], "prompt_token_ids": None, "prompt_text": None}) + b"\n\n"

        usage = usage_chunk if include_usage else None
        if len(streams) > 1:
            return await self._run_streams(request, streams, chunk_of, usage, first_of)
        return await self._run_stream(request, stream, chunk_of, usage, first_of(0))


def _check_stream_options(body: dict[str, Any]) -> web.Response | None:
    """vLLM validates `stream_options` as an object (or null) before anything reaches the engine."""
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return bad_request("stream_options must be an object", "stream_options")
    return None


def _check_messages(messages: Any) -> web.Response | None:
    """The shape vLLM's request model accepts: a non-empty list of objects whose content is text, a list of
    parts, or absent."""
    if not isinstance(messages, list) or not messages:
        return bad_request("messages must be a non-empty list", "messages")
    if not all(isinstance(m, dict) for m in messages):
        return bad_request("each message must be an object", "messages")
    if not all(m.get("content") is None or isinstance(m.get("content"), (str, list)) for m in messages):
        return bad_request("a message's content must be a string or a list of content parts", "messages")
    return None
