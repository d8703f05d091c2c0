"""Parsing the bodies of every scheduled route (see routes.py): the model, the prompt's size, the output bound,
`stream` and the sequence count, and nothing more. The core three APIs and TGI's go through parsing.py;
this module adds the rest of the vLLM/SGLang/TGI surface and picks a flavour where one path serves two
(TGI's and SGLang's `/generate`; SageMaker's `/invocations`).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from capbalancer.server.errors import ProxyError
from capbalancer.server.parsing import (
    ParsedRequest,
    _check_max_tokens,
    _content_chars,
    _content_text,
    _messages_chars,
    _messages_text,
    parse_body,
    sequences_of,
)

# Bytes of audio per prompt token: 16 kHz 16-bit mono is 32 kB/s and Whisper's encoder sees 50 frames/s.
# Compressed formats carry more audio per byte; this is a rough bound the online estimate does not refine.
AUDIO_BYTES_PER_TOKEN = 640
CHARS_PER_TOKEN = 4  # the estimator's starting ratio: audio's token estimate is expressed in its unit
# The `model` field of a multipart form: the SDKs send fields before the file, so it is near the start.
_MULTIPART_MODEL = re.compile(rb'name="model"\r\n(?:[^\r\n]*\r\n)*?\r\n([^\r\n]{1,512})\r\n')
MULTIPART_MODEL_SCAN_BYTES = 64 * 1024

# Pooling routes: their text fields, all prompt; they generate nothing.
_POOLING_FIELDS = {
    "/pooling": ("input",), "/classify": ("input",), "/encode": ("text", "input"),
    "/score": ("text_1", "text_2"), "/v1/score": ("text_1", "text_2"),
    "/rerank": ("query", "documents"), "/v1/rerank": ("query", "documents"), "/v2/rerank": ("query", "documents"),
}


def _json_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise ProxyError(400, "request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProxyError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ProxyError(400, "request body must be a JSON object", code="invalid_json")
    return body


def _model(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise ProxyError(400, "'model' must be a non-empty string", param="model", code="invalid_model")
    return model


def _stream(body: dict[str, Any]) -> bool:
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ProxyError(400, "'stream' must be true or false", param="stream")
    return bool(stream)


def parse_route(path: str, raw: bytes, content_type: str) -> ParsedRequest:
    """The request as the scheduler needs it, for any scheduled route (ProxyError 400 when unreadable)."""
    if path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
        return parse_audio(raw, content_type)
    if path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/generate_stream"):
        return parse_body(path, raw, keep_text=True)
    body = _json_object(raw)
    if path == "/generate":  # TGI's body has `inputs`; SGLang's has `text` or `input_ids`
        if "inputs" in body:
            return parse_body(path, raw, keep_text=True)
        return _parse_sglang(body)
    if path == "/":  # TGI's compat route: /generate's body, streamed when "stream": true
        return parse_body("/generate", raw, keep_text=True)
    if path == "/invocations":  # SageMaker: vLLM picks the API from the body's shape, as we do
        for key, as_path in (("messages", "/v1/chat/completions"), ("prompt", "/v1/completions"),
                             ("input", "/v1/embeddings"), ("inputs", "/generate")):
            if key in body:
                return parse_body(as_path, raw, keep_text=True)
        raise ProxyError(400, "/invocations: cannot tell the API from the body (messages, prompt, input or inputs)")
    if path == "/v1/responses":
        return _parse_responses(body)
    if path == "/v1/messages":
        return _parse_messages(body)
    fields = _POOLING_FIELDS.get(path)
    if fields is not None:
        text = "\n".join(_content_text(body.get(f)) for f in fields)
        chars = sum(_content_chars(body.get(f)) for f in fields)
        return ParsedRequest(model=_model(body), prompt_chars=chars, max_tokens=1, stream=False, api="embeddings",
                             prompt_text=text)
    # tokenize/detokenize and other light routes: only the model matters
    return ParsedRequest(model=_model(body), prompt_chars=0, max_tokens=1, stream=False, api="embeddings")


def _parse_sglang(body: dict[str, Any]) -> ParsedRequest:
    text, ids = body.get("text"), body.get("input_ids")
    if not isinstance(text, str) and not isinstance(ids, list):
        raise ProxyError(400, "/generate needs TGI's 'inputs' or SGLang's 'text' or 'input_ids'", param="inputs")
    params = body.get("sampling_params") or {}
    if not isinstance(params, dict):
        raise ProxyError(400, "'sampling_params' must be an object", param="sampling_params")
    max_tokens = _check_max_tokens(params.get("max_new_tokens"), "sampling_params.max_new_tokens")
    return ParsedRequest(model=_model(body), prompt_chars=_content_chars(text if isinstance(text, str) else ids),
                         max_tokens=max_tokens, stream=_stream(body), api="openai",
                         prompt_text=text if isinstance(text, str) else None, sequences=sequences_of(params))


def _parse_responses(body: dict[str, Any]) -> ParsedRequest:
    value = body.get("input")
    if isinstance(value, list):  # input items: messages (content a string or parts) and others
        text = _messages_text(value)
        chars = _messages_chars(value)
    else:
        text = _content_text(value)
        chars = len(text)
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        text = instructions + "\n" + text
        chars += len(instructions)
    user, previous = body.get("user"), body.get("previous_response_id")
    return ParsedRequest(model=_model(body), prompt_chars=chars,
                         max_tokens=_check_max_tokens(body.get("max_output_tokens"), "max_output_tokens"),
                         stream=_stream(body), api="openai", prompt_text=text,
                         user=user if isinstance(user, str) else None,
                         previous_id=previous if isinstance(previous, str) and previous else None)


def _parse_messages(body: dict[str, Any]) -> ParsedRequest:
    """Anthropic's Messages API: `system` (a string or text blocks), `messages`, `max_tokens` (required)."""
    messages = body.get("messages")
    system = body.get("system")
    system_text = system if isinstance(system, str) else _messages_text([{"content": system}])
    text = system_text + "\n" + _messages_text(messages)
    return ParsedRequest(model=_model(body), prompt_chars=len(system_text) + _messages_chars(messages),
                         max_tokens=_check_max_tokens(body.get("max_tokens"), "max_tokens"), stream=_stream(body),
                         api="openai", prompt_text=text)


def parse_audio(raw: bytes, content_type: str) -> ParsedRequest:
    """A multipart transcription/translation: the model from its form field, the prompt from the audio's size."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise ProxyError(400, "audio requests must be multipart/form-data", param="file")
    found = _MULTIPART_MODEL.search(raw, 0, MULTIPART_MODEL_SCAN_BYTES)
    model = found.group(1).decode("utf-8", "replace") if found else None
    tokens = max(1, len(raw) // AUDIO_BYTES_PER_TOKEN)
    stream = b'name="stream"\r\n\r\ntrue' in raw[:MULTIPART_MODEL_SCAN_BYTES]
    return ParsedRequest(model=model, prompt_chars=tokens * CHARS_PER_TOKEN, max_tokens=None, stream=stream,
                         api="openai")


def rewrite_model(path: str, raw: bytes, content_type: str, served: str) -> bytes:
    """The body with its `model` set to `served` (the name the chosen backend serves under)."""
    if path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
        found = _MULTIPART_MODEL.search(raw, 0, MULTIPART_MODEL_SCAN_BYTES)
        if found is None:
            return raw
        return raw[:found.start(1)] + served.encode() + raw[found.end(1):]
    body = orjson.loads(raw)
    body["model"] = served
    return orjson.dumps(body)
