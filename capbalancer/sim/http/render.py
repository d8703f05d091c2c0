"""vLLM's render routes on the simulated engine: `POST /v1/completions/render` and `/v1/chat/completions/render`.

A real vLLM (0.3x) answers them with what it would run, tokenized but not generated: the request as token ids plus
its sampling parameters (its `GenerateRequest`: a list of them for completions, one object for chat). vllm-router's
`cache_aware` and `kv_aware` policies call render on a worker for every request to get the token ids they match
prefixes on (measured: one render per request, then `/tokenize` if render fails), so a peer router in front of the
simulator needs them to route as it does in front of vLLM. The ids are the simulator's tokenizer's, the ones its
prefix cache keys on. Rendering is the API server's work: it costs the instance's front-end time.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from capbalancer.sim import tokenizer
from capbalancer.sim.http.openai_api import OpenAIRoutes, bad_request, read_json


def _sampling_params(body: dict[str, Any], default_max_tokens: int | None) -> dict[str, Any]:
    """The request's sampling parameters as vLLM renders them (the fields a router could look at)."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default_max_tokens))
    return {"n": body.get("n") or 1, "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
            "max_tokens": max_tokens, "seed": body.get("seed"), "ignore_eos": bool(body.get("ignore_eos", False)),
            "stop": body.get("stop") or []}


def _rendered(api: OpenAIRoutes, body: dict[str, Any], ids: list[int], default_max_tokens: int | None
              ) -> dict[str, Any]:
    return {"request_id": uuid.uuid4().hex, "token_ids": ids, "token_offsets": None, "features": None,
            "sampling_params": _sampling_params(body, default_max_tokens), "model": body.get("model") or api.inst.model,
            "stream": bool(body.get("stream", False)), "cache_salt": body.get("cache_salt")}


def add_render_routes(app: web.Application, api: OpenAIRoutes) -> None:
    async def completions_render(request: web.Request) -> web.Response:
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        if (err := api._check_model(body)) is not None:
            return err
        prompt = body.get("prompt")
        prompts = prompt if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt) \
            else [prompt]
        out = []
        for p in prompts:
            if isinstance(p, str):
                ids = tokenizer.encode(p)
            elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                ids = list(p)
            else:
                return bad_request("prompt must be a string, a list of token ids, or a list of those", "prompt")
            if not ids:
                return bad_request("No token_ids rendered", "prompt")
            await api.inst.front_end(len(ids))
            out.append(_rendered(api, body, ids, 16))
        return web.json_response(out)

    async def chat_render(request: web.Request) -> web.Response:
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        if (err := api._check_model(body)) is not None:
            return err
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return bad_request("messages must be a non-empty list of objects", "messages")
        ids = tokenizer.encode(tokenizer.render_chat(messages, bool(body.get("add_generation_prompt", True))))
        await api.inst.front_end(len(ids))
        return web.json_response(_rendered(api, body, ids, None))

    app.router.add_post("/v1/completions/render", completions_render)
    app.router.add_post("/v1/chat/completions/render", chat_render)
