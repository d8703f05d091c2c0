"""The observing middleware: a RequestRecord per request, its access-log line and its span.

It is the outermost middleware, so it sees every answer, the proxy's own errors included, and it runs
until a stream has been relayed to its end. Backend and held time come from the response headers the
proxy sets on every answer (x-capbalancer-backend, x-capbalancer-held-ms) unless the handler noted them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from capbalancer.server import access_log, tracing
from capbalancer.server.access_log import RECORD_KEY, UNLOGGED_PATHS, RequestRecord
from capbalancer.server.pool_metrics import PoolMetrics
from capbalancer.server.proxy import ProxyState

log = logging.getLogger("capbalancer.server")


@dataclass
class TracerSlot:
    """The app's tracer, made on the first traced request (None: not yet; False: unavailable)."""

    tracer: Any = None


TRACER: web.AppKey[TracerSlot] = web.AppKey("capbalancer_tracer", TracerSlot)
CLIENT_CLOSED_STATUS = 499  # nginx's code for "the client went away first": logged, never sent


def status_of_exception(exc: BaseException) -> int:
    """The status an access line records for a handler that raised `exc` (aiohttp answers an HTTPException
    with its status; a client that left gets CLIENT_CLOSED_STATUS; anything else ends in a 500)."""
    if isinstance(exc, web.HTTPException):
        return exc.status
    if isinstance(exc, (asyncio.CancelledError, ConnectionResetError)):
        return CLIENT_CLOSED_STATUS
    return 500

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Observer:
    """What the observing middleware does around a request, as plain calls: the middleware below uses them, and
    the fast server (server/fastserver.py) calls them directly around proxy.handle, without a chain of
    coroutines per request (bench/results/dataplane.md)."""

    def __init__(self, state: ProxyState) -> None:
        self.state = state
        self.pool_metrics = PoolMetrics(state.metrics.registry, state.driver)
        self.middleware: Any = None  # the middleware installed with it (the fast server checks the chain)

    @staticmethod
    def begin(request: web.BaseRequest) -> RequestRecord:
        record = RequestRecord(started_s=time.monotonic(), method=request.method, path=request.path)
        request[RECORD_KEY] = record
        return record

    def end(self, record: RequestRecord, response: web.StreamResponse | None, access_log_on: bool,
            span: Any = None) -> None:
        """The request is done (answered, failed or abandoned; `record.status` says which): its tokens, its line,
        its span."""
        try:
            _complete(record, response)
            if record.pool is not None and record.backend is not None:
                self.pool_metrics.count_tokens(record.pool, record.backend, record.tokens_in, record.tokens_out)
            if access_log_on:
                access_log.emit(record)
            if span is not None:
                tracing.end_span(span, record)
        except Exception:  # observing a request must never fail it: the answer stands, the bug is logged
            log.exception("observing request %s failed", record.request_id)


OBSERVER: web.AppKey[Observer] = web.AppKey("capbalancer_observer", Observer)


def install(app: web.Application, state: ProxyState) -> None:
    """Make `app` observe its requests; the switches are read from the live config (a reload flips them)."""
    observer = Observer(state)

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in UNLOGGED_PATHS:
            return await handler(request)
        settings = state.config.server
        record = observer.begin(request)
        span = None
        if settings.tracing:
            tracer = _tracer(request.app)
            if tracer is not None:
                span, upstream = tracing.start_span(tracer, request.method, request.path, request.headers)
                headers = request.headers.copy()
                headers.popall("tracestate", None)
                headers.update(upstream)
                request = request.clone(headers=headers)  # the engine sees the proxy's span as its parent
        response: web.StreamResponse | None = None
        try:
            response = await handler(request)
            record.status = response.status
            return response
        except BaseException as exc:
            record.status = status_of_exception(exc)
            raise
        finally:
            observer.end(record, response, settings.access_log, span)

    app[TRACER] = TracerSlot()
    app[OBSERVER] = observer
    observer.middleware = observe
    app.middlewares.insert(0, observe)
    app.on_response_prepare.append(first_byte)


async def first_byte(request: web.Request, response: web.StreamResponse) -> None:
    record = request.get(RECORD_KEY)
    if record is not None and record.first_byte_s is None:
        record.first_byte_s = time.monotonic()


def _complete(record: RequestRecord, response: web.StreamResponse | None) -> None:
    if response is None:
        return
    headers = response.headers
    if record.request_id is None:
        record.request_id = headers.get("x-request-id")
    if record.backend is None:
        record.backend = headers.get("x-capbalancer-backend")
    if record.held_ms is None and "x-capbalancer-held-ms" in headers:
        try:
            record.held_ms = float(headers["x-capbalancer-held-ms"])
        except ValueError:
            pass
    if record.first_byte_s is None:  # not streamed: its first byte goes out now
        record.first_byte_s = time.monotonic()


def _tracer(app: web.Application) -> Any:
    slot = app[TRACER]
    if slot.tracer is None:
        try:
            slot.tracer = tracing.make_tracer()
        except tracing.TracingUnavailable as exc:
            log.warning("%s; requests are not traced", exc)
            slot.tracer = False
    return slot.tracer or None
