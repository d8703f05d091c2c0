"""Request parsing per API flavour: just enough of the body to pick a pool and estimate the request's cost.

The body is forwarded as received; we read `model`, the prompt's size, the output bound and `stream`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from capbalancer.sched.prefix_hash import PrefixKey, text_block_hashes, token_block_hashes
from capbalancer.sched.prefix_index import prefix_salt
from capbalancer.server.errors import ProxyError

# API flavour of each proxied path.
OPENAI_PATHS = {"/v1/completions": "openai", "/v1/chat/completions": "openai", "/v1/embeddings": "embeddings"}
TGI_PATHS = {"/generate": "tgi", "/generate_stream": "tgi"}


@dataclass(slots=True)
class ParsedRequest:
    model: str | None  # None: the default pool
    prompt_chars: int
    max_tokens: int | None  # None: the pool's default
    stream: bool
    api: str  # openai | tgi | embeddings
    prompt_text: str | None = None  # only when asked for (token counting and the prefix key)
    user: str | None = None  # the OpenAI `user` field: a session hint for prefix affinity
    token_ids: list[int] | None = None  # set when a local tokenizer counted the prompt
    # Sequences generated per prompt (`n`, `best_of`; TGI's `best_of`): each costs its own output and KV.
    sequences: int = 1
    previous_id: str | None = None  # /v1/responses `previous_response_id`: only its backend holds it
    # A chat request's messages and template switches (kept with the text): with the pool's tokenizer, the proxy
    # renders the model's chat template over them, as the engine does (server/chat_template.py).
    messages: Any = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    cache_salt: str | None = None  # vLLM's per-request prefix-cache salt: prompts of other salts never share blocks


MAX_SESSION_ID_CHARS = 256


def session_of(header: str | None, parsed: ParsedRequest) -> str | None:
    """The request's session: `x-session-id`, else the OpenAI `user` field; bounded in size."""
    value = header or parsed.user
    return value[:MAX_SESSION_ID_CHARS] if value else None


def prefix_key(parsed: ParsedRequest, pool: str, aliases: tuple[str, ...] = ()) -> PrefixKey:
    """The prompt's chained block hashes: over token ids when a tokenizer gave them (16-token blocks, as
    vLLM's), else over the text in 64-character blocks. Salted by the pool, and by the name a request gives
    beyond the pool's own (a LoRA adapter, or another model behind a catch-all pool), as the engine's own
    hash includes the adapter: different models never share an entry."""
    adapter = None if parsed.model in (None, pool, *aliases) else parsed.model
    salt = prefix_salt(pool, adapter, parsed.cache_salt)
    if parsed.token_ids is not None:
        return token_block_hashes(parsed.token_ids, salt=salt)
    if parsed.prompt_text:
        return text_block_hashes(parsed.prompt_text, salt=salt)
    return PrefixKey()


def parse_body(path: str, raw: bytes, keep_text: bool = False) -> ParsedRequest:
    if not raw:
        raise ProxyError(400, "request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProxyError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ProxyError(400, "request body must be a JSON object", code="invalid_json")
    api = OPENAI_PATHS.get(path) or TGI_PATHS[path]
    if api == "tgi":
        parsed = _parse_tgi(path, body)
        if keep_text:
            parsed.prompt_text = body["inputs"]
        return parsed
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise ProxyError(400, "'model' must be a non-empty string", param="model", code="invalid_model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ProxyError(400, "'stream' must be true or false", param="stream")
    if path == "/v1/chat/completions":
        chars = _messages_chars(body.get("messages"))
    elif path == "/v1/embeddings":
        chars = _content_chars(body.get("input"))
    else:
        chars = _content_chars(body.get("prompt"))
    max_tokens = body.get("max_completion_tokens")
    param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = body.get("max_tokens"), "max_tokens"
    max_tokens = _check_max_tokens(max_tokens, param)
    text = None
    if keep_text:
        text = _messages_text(body.get("messages")) if path == "/v1/chat/completions" else _content_text(
            body.get("input") if path == "/v1/embeddings" else body.get("prompt"))
    user = body.get("user")
    cache_salt = body.get("cache_salt")
    parsed = ParsedRequest(model=model, prompt_chars=chars, max_tokens=max_tokens, stream=bool(stream), api=api,
                           prompt_text=text, user=user if isinstance(user, str) else None,
                           sequences=sequences_of(body) if api != "embeddings" else 1,
                           cache_salt=cache_salt if isinstance(cache_salt, str) else None)
    if keep_text and path == "/v1/chat/completions":
        parsed.messages = body.get("messages")
        continue_final = body.get("continue_final_message") is True
        parsed.continue_final_message = continue_final
        # vLLM: a generation prompt by default, never with continue_final_message
        parsed.add_generation_prompt = body.get("add_generation_prompt") is not False and not continue_final
    return parsed


# OpenAI's own limit on `n`. vLLM sets none and fans a request out into that many engine requests at once, so
# one request with n = 10^9 exhausts an engine's memory (measured: the simulator's process, 24 GB, killed by the
# kernel); the proxy refuses it, as OpenAI does, before it reaches any backend.
MAX_SEQUENCES = 128


def sequences_of(params: dict[str, Any]) -> int:
    """How many sequences a request generates: the larger of `n` and `best_of` (best_of are all generated,
    n returned). More than MAX_SEQUENCES is a 400 here; other invalid values count as 1: the engine answers
    them with its own 400."""
    count = 1
    for key in ("n", "best_of"):
        value = params.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > count:
            if value > MAX_SEQUENCES:
                raise ProxyError(400, f"'{key}' must be at most {MAX_SEQUENCES}, got {value}", param=key)
            count = value
    return count


def _content_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(item for item in value if isinstance(item, str))
    return ""


def _messages_text(messages: Any) -> str:
    parts: list[str] = []
    for m in messages if isinstance(messages, list) else ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "\n".join(parts)


def _parse_tgi(path: str, body: dict[str, Any]) -> ParsedRequest:
    inputs = body.get("inputs")
    if not isinstance(inputs, str):
        raise ProxyError(400, "'inputs' must be a string", param="inputs")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProxyError(400, "'parameters' must be an object", param="parameters")
    max_tokens = _check_max_tokens(params.get("max_new_tokens"), "parameters.max_new_tokens")
    stream = path == "/generate_stream" or body.get("stream") is True
    return ParsedRequest(model=None, prompt_chars=len(inputs), max_tokens=max_tokens, stream=stream, api="tgi",
                         sequences=sequences_of(params))


def _check_max_tokens(value: Any, param: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ProxyError(400, f"'{param}' must be a positive integer", param=param)
    return value


def _content_chars(value: Any) -> int:
    """Characters of a prompt/input that may be a string, a list of strings, or token id lists."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        total = 0
        for item in value:
            if isinstance(item, str):
                total += len(item)
            elif isinstance(item, int):
                total += 4  # a token id: one token, ~4 characters at the default ratio
            elif isinstance(item, list):
                total += 4 * len(item)
        return total
    return 0


def _messages_chars(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    total = 0
    for m in messages:
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):  # multi-part content: count the text parts
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += len(part["text"])
        total += 4  # role and framing tokens
    return total
