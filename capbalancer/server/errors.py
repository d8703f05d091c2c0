"""Errors the proxy itself answers, always in the OpenAI shape `{"error": {message, type, param, code}}`.

Engines' own errors never pass through here: they reach the client byte for byte (DESIGN invariant 5).
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from aiohttp import web

# HTTP status -> OpenAI error type, as the OpenAI API and vLLM name them.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ProxyError(Exception):
    """Raised anywhere in request handling; the route turns it into one OpenAI-shaped response."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s


def error_object(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object (the value of an error body's "error" key)."""
    return {"message": message, "type": _TYPES.get(status, "error"), "param": param,
            "code": code if code is not None else status}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": error_object(status, message, code, param)})


def retry_after_header(seconds: float) -> str:
    # Retry-After is whole seconds; never 0, which clients read as "hammer me now".
    return str(max(1, math.ceil(seconds)))


def retry_after_ms_header(seconds: float) -> str:
    # The same to the millisecond (OpenAI's clients read it first): refusals spread below a second apart
    # (sched/retry_spread.py) would all round up to the same whole second.
    return str(max(1, int(seconds * 1000)))


def error_response(status: int, message: str, *, code: str | None = None, param: str | None = None,
                   retry_after_s: float | None = None, headers: dict[str, str] | None = None) -> web.Response:
    hdrs = dict(headers or {})
    if retry_after_s is not None:
        hdrs["Retry-After"] = retry_after_header(retry_after_s)
        hdrs["retry-after-ms"] = retry_after_ms_header(retry_after_s)
    return web.Response(status=status, body=error_body(status, message, code, param),
                        content_type="application/json", headers=hdrs)


def from_exception(exc: ProxyError, headers: dict[str, str] | None = None) -> web.Response:
    return error_response(exc.status, exc.message, code=exc.code, param=exc.param,
                          retry_after_s=exc.retry_after_s, headers=headers)


def sse_error_event(status: int, message: str, code: str | None = None) -> bytes:
    """The last event of a stream that broke after its first byte (no `[DONE]`: it did not finish)."""
    return b"data: " + error_body(status, message, code) + b"\n\n"
