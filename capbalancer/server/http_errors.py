"""Requests aiohttp's HTTP parser rejects (bad request line, bad framing, oversized headers) answered in the
OpenAI error shape, like every other 4xx of the proxy, and logged as one WARNING line instead of an ERROR with a
traceback: any client can send garbage, so it must not flood the log.

aiohttp builds those answers in `RequestHandler.handle_error` (a public method) on a handler its `web.Server`
creates per connection. Neither takes a handler class, so `json_http_errors(runner.server)` re-classes the server
to make handlers of a subclass: both subclasses only add a method, so the objects' layout is unchanged.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from capbalancer.server.errors import error_body
from capbalancer.server.halfclose import on_eof

log = logging.getLogger("capbalancer.server")


class _JsonErrorRequestHandler(RequestHandler):
    __slots__ = ()

    def eof_received(self) -> bool:  # type: ignore[override]
        return on_eof(self)  # a half-closed client still gets its answer (server/halfclose.py)

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
        else:
            log.warning("malformed HTTP from %s: %s", request.remote, message or exc or HTTPStatus(status).phrase)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started, cannot send an error response")
        what = message or (str(exc) if exc else "") or HTTPStatus(status).phrase
        text = f"malformed HTTP request: {what}" if status < 500 else "internal error in the proxy"
        resp = web.Response(status=status, body=error_body(status, text, code="bad_http" if status < 500 else None),
                            content_type="application/json")
        resp.force_close()
        return resp


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        handler.__class__ = _JsonErrorRequestHandler
        return handler


def json_http_errors(server: web.Server | None) -> None:
    """Make `server` (an `AppRunner`'s, after `setup()`) answer parser-level errors in the OpenAI shape."""
    if server is not None and type(server) is web.Server:
        server.__class__ = _JsonErrorServer
