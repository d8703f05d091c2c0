"""Upstream side of the relay: one keep-alive connection pool per backend, headers, timeouts, token counts.

Bytes are never decoded or re-encoded (DESIGN invariant 5): `auto_decompress=False`, and no
Accept-Encoding is added that the client did not send, so what the engine wrote is what the client reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
import orjson
from multidict import CIMultiDict, CIMultiDictProxy, istr

from capbalancer.config import BackendConfig, ServerSettings, Timeouts
from capbalancer.server.limits import is_fd_exhaustion
from capbalancer.server.upstream_http import (
    ConnectError,
    ConnectTimeout,
    ProtocolError,
    ResponseTooLarge,
    ServerDisconnected,
    UpstreamHTTPError,
    UpstreamPool,
)

# RFC 9110 7.6.1 hop-by-hop headers, plus those aiohttp computes itself for the message it sends.
HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length", "expect"))
# Response headers aiohttp's server writes itself (duplicates would confuse clients).
RESPONSE_DROP = HOP_BY_HOP | frozenset(("date", "server"))
INTERNAL_PREFIX = "x-capbalancer-"
AUTHORIZATION = istr("authorization")
# Request headers the relay never copies from the client: hop-by-hop, and those it writes itself.
_REQUEST_SKIP = HOP_BY_HOP | frozenset(("x-request-id",))


class UpstreamError(Exception):
    """The attempt failed before its response began. `retryable`: the request never reached the engine."""

    def __init__(self, status: int, message: str, *, retryable: bool, backend_down: bool, code: str,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retryable = retryable
        self.backend_down = backend_down  # the scheduler should mark the backend down now
        self.code = code
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class Upstream:
    """One backend's connection pools and settings.

    `pool` (upstream_http) carries the relayed requests; `session` (aiohttp) the rare admin pass-through
    GETs (/v1/models and the like), where convenience matters more than microseconds.
    """

    name: str
    base_url: str
    session: aiohttp.ClientSession
    pool: UpstreamPool
    timeouts: Timeouts
    api_key: str | None
    api_key_mode: str  # replace | passthrough

    @classmethod
    def create(cls, b: BackendConfig, server: ServerSettings | None = None) -> Upstream:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60.0, ttl_dns_cache=300,
                                         enable_cleanup_closed=False)
        # The request's own timeouts are enforced by the relay (first byte, idle gap, total); the
        # session only bounds the TCP connect.
        timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=b.timeouts.connect_s, sock_read=None)
        session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                                        cookie_jar=aiohttp.DummyCookieJar(), raise_for_status=False)
        limits = server or ServerSettings()
        pool = UpstreamPool(b.url, connect_timeout_s=b.timeouts.connect_s, max_idle=256,
                            max_header_bytes=limits.max_upstream_header_bytes, max_headers=limits.max_upstream_headers)
        return cls(name=b.name, base_url=b.url, session=session, pool=pool, timeouts=b.timeouts,
                   api_key=b.resolved_api_key(), api_key_mode=b.api_key_mode)

    def request_headers(self, client: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
        """The same headers as `request_header_list`, for the aiohttp session (admin pass-through GETs)."""
        return CIMultiDict(self.request_header_list(client, request_id))

    def request_header_list(self, client: CIMultiDictProxy[str], request_id: str,
                            drop_client_auth: bool = False) -> list[tuple[str, str]]:
        """`request_headers` as a list for upstream_http (which writes Host and Content-Length itself).

        `drop_client_auth`: the client's Authorization is a credential for the proxy (client keys are on),
        never to be forwarded to an engine, whatever the backend's api_key_mode."""
        out: list[tuple[str, str]] = []
        listed = client.get("connection")
        extra = frozenset(h.strip().lower() for h in listed.split(",")) if listed else frozenset()
        replace_key = self.api_key is not None and self.api_key_mode == "replace"
        content_type = False
        for key, value in client.items():
            low = key.lower()
            if low in _REQUEST_SKIP or (extra and low in extra) or low.startswith(INTERNAL_PREFIX):
                continue
            if low == "authorization" and (replace_key or drop_client_auth):
                continue
            if low == "content-type":
                content_type = True
            out.append((key, value))
        if replace_key:
            out.append(("Authorization", f"Bearer {self.api_key}"))
        if not content_type:
            out.append(("Content-Type", "application/json"))
        out.append(("X-Request-Id", request_id))
        return out

    async def close(self) -> None:
        await self.pool.close()
        await self.session.close()


def response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    listed = upstream.get("connection")
    extra = frozenset(h.strip().lower() for h in listed.split(",")) if listed else frozenset()
    for key, value in upstream.items():
        low = key.lower()
        if low in RESPONSE_DROP or low in extra or low.startswith(INTERNAL_PREFIX):
            continue
        out.add(key, value)
    return out


def classify_upstream_error(exc: BaseException, timeouts: Timeouts) -> UpstreamError:
    """Turn a failure before any response byte into what we answer and whether to retry elsewhere."""
    if is_fd_exhaustion(exc):
        # The proxy is out of descriptors: its own overload, not the backend's fault (never marks it down);
        # another backend would fail the same way, so no retry either.
        return UpstreamError(503, "the proxy is overloaded (out of file descriptors); retry later",
                             retryable=False, backend_down=False, code="proxy_overloaded", retry_after_s=1.0)
    if isinstance(exc, ResponseTooLarge):
        return UpstreamError(502, f"backend response too large: {exc}", retryable=False, backend_down=False,
                             code="backend_response_too_large")
    if isinstance(exc, ConnectError):
        return UpstreamError(502, f"backend unreachable: {exc.os_error.strerror or exc.os_error}",
                             retryable=True, backend_down=True, code="backend_unreachable")
    if isinstance(exc, ConnectTimeout):
        return UpstreamError(504, f"connecting to the backend took over {timeouts.connect_s:g}s",
                             retryable=True, backend_down=True, code="connect_timeout")
    if isinstance(exc, ServerDisconnected):
        # Closed without a response: possibly a stale keep-alive connection, possibly a dying engine.
        return UpstreamError(502, "backend closed the connection without a response", retryable=True,
                             backend_down=False, code="backend_disconnected")
    if isinstance(exc, ConnectionResetError):
        # Reset before any response byte: nothing reached the client, so another backend may serve it.
        return UpstreamError(502, "backend reset the connection before answering", retryable=True,
                             backend_down=False, code="backend_reset")
    if isinstance(exc, (ProtocolError, UpstreamHTTPError, OSError)):
        return UpstreamError(502, f"backend failed before answering: {type(exc).__name__}: {exc}",
                             retryable=False, backend_down=False, code="backend_error")
    raise exc


# ---------------------------------------------------------------------------------------------------
# Token counting while relaying: cheap byte scans; JSON parsed only for the `usage` event.
# ---------------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


def _usage_from(obj: object, usage: Usage) -> None:
    if not isinstance(obj, dict):
        return
    u = obj.get("usage")
    if not isinstance(u, dict) and isinstance(obj.get("meta_info"), dict):
        u = obj["meta_info"]  # SGLang's native /generate
    if isinstance(u, dict):
        p, c = u.get("prompt_tokens"), u.get("completion_tokens")
        if p is None and c is None:  # the Responses API and Anthropic's Messages API
            p, c = u.get("input_tokens"), u.get("output_tokens")
        if isinstance(p, int):
            usage.prompt_tokens = p
        if isinstance(c, int):
            usage.completion_tokens = c
    details = obj.get("details")  # TGI
    if isinstance(details, dict) and isinstance(details.get("generated_tokens"), int):
        usage.completion_tokens = details["generated_tokens"]


def usage_from_body(body: bytes, usage: Usage) -> None:
    if b'"usage"' not in body and b'"generated_tokens"' not in body and b'"meta_info"' not in body:
        return
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return
    if isinstance(obj, list) and obj:  # TGI may answer a one-element list
        obj = obj[0]
    _usage_from(obj, usage)


class StreamCounter:
    """Counts SSE events carrying output (≈ one token each on vLLM/TGI/SGLang) and finds final usage."""

    __slots__ = ("events", "usage")

    def __init__(self) -> None:
        self.events = 0
        self.usage = Usage()

    def feed(self, chunk: bytes) -> int:
        n = chunk.count(b"data:")
        if n:
            n -= chunk.count(b"[DONE]")
            if b'"usage"' in chunk or b'"generated_tokens"' in chunk:
                n -= self._parse_usage(chunk)
            self.events += n
        return n

    def _parse_usage(self, chunk: bytes) -> int:
        # An event split across two chunks is missed here; the event count then stands in for it.
        usage_only = 0
        for line in chunk.split(b"\n"):
            if not line.startswith(b"data:") or (b'"usage"' not in line and b'"generated_tokens"' not in line):
                continue
            try:
                obj = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                continue
            before = self.usage.completion_tokens
            _usage_from(obj, self.usage)
            # vLLM's final usage chunk has no choices: it is not a token.
            if isinstance(obj, dict) and obj.get("choices") == [] and self.usage.completion_tokens != before:
                usage_only += 1
        return usage_only

    @property
    def output_tokens(self) -> int:
        if self.usage.completion_tokens is not None:
            return self.usage.completion_tokens
        return self.events

