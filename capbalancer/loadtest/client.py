"""One streamed request, timed: build the body for the API flavour, read the SSE stream, classify failures.

Timing follows `vllm bench serve`: TTFT is the time from sending to the first event that carries text;
each later text event adds one inter-token latency (an event may carry several tokens when the engine
batches its stream). Output tokens come from the stream's `usage` when the server sends it (requested
with `stream_options.include_usage`), else from TGI's `details.generated_tokens`, else one per text event.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from capbalancer.loadtest.workloads import RequestSpec

APIS = ("completions", "chat", "tgi")
DEFAULT_ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions", "tgi": "/generate_stream"}
BACKEND_HEADER = "x-capbalancer-backend"

# Error kinds a record can carry (besides "http_<status>").
ERROR_KINDS = ("timeout", "connect", "disconnect", "bad_stream", "stream_error", "client_error")


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request. Times in seconds; `start_s` is from the start of the run."""

    index: int
    start_s: float
    prompt_len: int
    max_tokens: int
    success: bool = False
    status: int | None = None
    error: str | None = None  # kind: "http_503", "timeout", "connect", "disconnect", "bad_stream", ...
    error_detail: str = ""
    ttft_s: float | None = None
    e2el_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    output_tokens_source: str = "events"  # "usage" | "details" | "events"
    prompt_tokens: int | None = None  # as the server reported it, when it did
    backend: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first: (e2e - ttft) / (output_tokens - 1)."""
        if self.ttft_s is None or self.e2el_s is None or self.output_tokens <= 1:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "start_s": self.start_s, "prompt_len": self.prompt_len,
            "max_tokens": self.max_tokens, "success": self.success, "status": self.status,
            "error": self.error, "error_detail": self.error_detail, "ttft_s": self.ttft_s,
            "tpot_s": self.tpot_s, "e2el_s": self.e2el_s, "itl_s": self.itl_s,
            "output_tokens": self.output_tokens, "output_tokens_source": self.output_tokens_source,
            "prompt_tokens": self.prompt_tokens, "backend": self.backend,
        }


@dataclass(frozen=True, slots=True)
class ApiSettings:
    api: str  # "completions" | "chat" | "tgi"
    url: str  # full URL of the streaming endpoint
    model: str | None
    ignore_eos: bool = False
    temperature: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


def endpoint_url(base_url: str, api: str, endpoint: str | None = None) -> str:
    """`http://h:p`, `http://h:p/` or `http://h:p/v1` plus the API's path (or an explicit endpoint)."""
    if api not in APIS:
        raise ValueError(f"api must be one of {', '.join(APIS)}, got {api!r}")
    base = base_url.rstrip("/")
    path = endpoint or DEFAULT_ENDPOINTS[api]
    if base.endswith("/v1") and path.startswith("/v1/"):
        base = base[: -len("/v1")]
    return base + path


def request_body(settings: ApiSettings, spec: RequestSpec) -> dict[str, Any]:
    if settings.api == "tgi":
        params: dict[str, Any] = {"max_new_tokens": spec.output_len, "details": True}
        if settings.temperature > 0:
            params["temperature"] = settings.temperature
            params["do_sample"] = True
        return {"inputs": spec.prompt, "parameters": params}
    body: dict[str, Any] = {
        "max_tokens": spec.output_len,
        "temperature": settings.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if settings.model:
        body["model"] = settings.model
    if settings.ignore_eos:
        body["ignore_eos"] = True  # a vLLM/SGLang extension; sent only when asked for
    if settings.api == "chat":
        body["messages"] = list(spec.messages) if spec.messages else [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    if spec.session_id is not None:
        body["user"] = spec.session_id  # the OpenAI field routers key sessions on
    return body


class _StreamState:
    """Accumulates one stream's events; decides the output token count at the end."""

    __slots__ = ("send_t", "last_t", "ttft_s", "itl_s", "events", "usage_tokens", "details_tokens",
                 "prompt_tokens", "done", "error")

    def __init__(self, send_t: float) -> None:
        self.send_t = send_t
        self.last_t = send_t
        self.ttft_s: float | None = None
        self.itl_s: list[float] = []
        self.events = 0
        self.usage_tokens: int | None = None
        self.details_tokens: int | None = None
        self.prompt_tokens: int | None = None
        self.done = False
        self.error: str | None = None

    def text_event(self, now: float) -> None:
        if self.ttft_s is None:
            self.ttft_s = now - self.send_t
        else:
            self.itl_s.append(now - self.last_t)
        self.last_t = now
        self.events += 1

    def handle(self, api: str, data: dict[str, Any], now: float) -> None:
        if "error" in data and data.get("error"):
            err = data["error"]
            self.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            return
        if api == "tgi":
            token = data.get("token") or {}
            # Every non-special token is an event, even one with empty text: it cost a decode step.
            if token and not token.get("special", False):
                self.text_event(now)
            if data.get("generated_text") is not None:
                self.done = True
                details = data.get("details") or {}
                if isinstance(details.get("generated_tokens"), int):
                    self.details_tokens = details["generated_tokens"]
            return
        usage = data.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.usage_tokens = usage["completion_tokens"]
            if isinstance(usage.get("prompt_tokens"), int):
                self.prompt_tokens = usage["prompt_tokens"]
        for choice in data.get("choices") or ():
            if api == "chat":
                text = (choice.get("delta") or {}).get("content")
            else:
                text = choice.get("text")
            if text:
                self.text_event(now)


async def send_request(session: aiohttp.ClientSession, settings: ApiSettings, spec: RequestSpec,
                       index: int, run_start: float, timeout_s: float) -> RequestRecord:
    """Send one request and time its stream; never raises for a failed request (the record says why)."""
    send_t = time.perf_counter()
    record = RequestRecord(index=index, start_s=send_t - run_start, prompt_len=spec.prompt_len,
                           max_tokens=spec.output_len)
    state = _StreamState(send_t)
    body = orjson.dumps(request_body(settings, spec))
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **settings.headers}
    if spec.session_id is not None:
        headers["x-session-id"] = spec.session_id
    try:
        async with asyncio.timeout(timeout_s) if hasattr(asyncio, "timeout") else _Deadline(timeout_s):
            async with session.post(settings.url, data=body, headers=headers) as resp:
                record.status = resp.status
                record.backend = resp.headers.get(BACKEND_HEADER)
                if resp.status != 200:
                    detail = (await resp.content.read(2048)).decode(errors="replace")
                    record.error = f"http_{resp.status}"
                    record.error_detail = detail.strip()[:500]
                    record.e2el_s = time.perf_counter() - send_t
                    return record
                await _read_sse(resp, settings.api, state)
    except (TimeoutError, asyncio.TimeoutError):
        record.error = "timeout"
        record.error_detail = f"no complete response within {timeout_s:g} s"
    except aiohttp.ClientConnectorError as exc:
        record.error = "connect"
        record.error_detail = str(exc)
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError,
            ConnectionResetError) as exc:
        record.error = "disconnect"
        record.error_detail = f"{type(exc).__name__}: {exc}"
    except aiohttp.ClientError as exc:
        record.error = "client_error"
        record.error_detail = f"{type(exc).__name__}: {exc}"
    except _BadStream as exc:
        record.error = "bad_stream"
        record.error_detail = str(exc)
    end_t = time.perf_counter()
    record.e2el_s = end_t - send_t
    record.ttft_s = state.ttft_s
    record.itl_s = state.itl_s
    record.prompt_tokens = state.prompt_tokens
    if state.usage_tokens is not None:
        record.output_tokens, record.output_tokens_source = state.usage_tokens, "usage"
    elif state.details_tokens is not None:
        record.output_tokens, record.output_tokens_source = state.details_tokens, "details"
    else:
        record.output_tokens = state.events
    if record.error is None:
        if state.error is not None:
            record.error, record.error_detail = "stream_error", state.error[:500]
        elif not state.done:
            record.error, record.error_detail = "disconnect", "stream ended before its final event"
        elif state.ttft_s is None:
            record.error, record.error_detail = "bad_stream", "stream carried no text"
    record.success = record.error is None
    return record


class _BadStream(Exception):
    pass


class _Deadline:
    """asyncio.timeout for Python 3.10."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None
        self._fired = False

    async def __aenter__(self) -> None:
        self._task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(self.timeout_s, self._fire)

    def _fire(self) -> None:
        self._fired = True
        if self._task is not None:
            self._task.cancel()

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        if self._handle is not None:
            self._handle.cancel()
        if exc_type is asyncio.CancelledError and self._fired:
            raise asyncio.TimeoutError
        return False


async def _read_sse(resp: aiohttp.ClientResponse, api: str, state: _StreamState) -> None:
    buffer = b""
    async for chunk in resp.content.iter_any():
        now = time.perf_counter()
        buffer += chunk
        # SSE events end with a blank line; servers use \n\n (some \r\n\r\n).
        while True:
            cut = buffer.find(b"\n")
            if cut < 0:
                break
            line, buffer = buffer[:cut].strip(), buffer[cut + 1:]
            if not line or line.startswith(b":"):
                continue
            if not line.startswith(b"data:"):
                continue  # "event:", "id:", "retry:" carry nothing we time
            payload = line[5:].strip()
            if payload == b"[DONE]":
                state.done = True
                continue
            try:
                data = orjson.loads(payload)
            except orjson.JSONDecodeError:
                raise _BadStream(f"not JSON: {payload[:200]!r}") from None
            if not isinstance(data, dict):
                raise _BadStream(f"not a JSON object: {payload[:200]!r}")
            state.handle(api, data, now)
    if buffer.strip():
        line = buffer.strip()
        if line.startswith(b"data:") and line[5:].strip() == b"[DONE]":
            state.done = True
