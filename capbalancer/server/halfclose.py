"""Half-closed clients get their answer; clients that left still leave at once (issue 14).

A client may send its request and then shut down its sending side (`shutdown(SHUT_WR)`: netcat, some
scripts and HTTP/1.0 tools); it still reads the answer. aiohttp closed such a connection on the FIN, so the
request was cancelled and the client got nothing. But a FIN is also what a client that went away sends, and
a held request of a client that went away must leave the hold queue at once, not be dispatched to an engine
later. The two look the same until something is written: to a socket closed for good the client's kernel
answers with a reset. So on a FIN while a request is in progress the connection stays open for writing, and
while no byte of the response has been written, an interim `100 Continue` is sent (HTTP/1.1 lets a server
send 1xx answers before the final one, and clients must skip them; aiohttp sends the same bytes for
`Expect: 100-continue`). If the socket then reports an error, the client is gone: the connection is aborted,
which cancels the handler as before. Otherwise it is checked again every PROBE_EVERY_S until the response
begins; from then on, writes fail by themselves if the client goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from aiohttp import HttpVersion11

FIRST_PROBE_S = 0.2  # most answers begin before this: they never see an interim 100
CHECK_AFTER_S = 0.05  # a reset comes back within a round trip
PROBE_EVERY_S = 1.0
INTERIM = b"HTTP/1.1 100 Continue\r\n\r\n"


def on_eof(handler: Any) -> bool:
    """`eof_received` of aiohttp's RequestHandler: True keeps the connection open for the answer."""
    # aiohttp's own state (RequestHandler has no public view of it): idle means waiting for a next request,
    # nothing queued. A request just parsed may not be `_current_request` yet: not idle either.
    waiter = getattr(handler, "_waiter", None)
    if not getattr(handler, "_messages", None) and waiter is not None and not waiter.done():
        return False  # idle keep-alive connection: close it, as before
    transport = handler.transport
    handler.close()  # no further requests: the connection closes once this one is answered
    if transport is not None:
        loop = asyncio.get_running_loop()
        loop.call_soon(_settle, handler, transport, loop)  # once aiohttp has made the parsed request current
    return True


def _settle(handler: Any, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
    request = getattr(handler, "_current_request", None)
    if request is not None and not request.content.is_eof():
        # The FIN came before the whole body: a request that can never complete. Closed, as before.
        transport.abort()
        return
    loop.call_later(FIRST_PROBE_S, _probe, handler, transport, loop)


def _response_started(handler: Any) -> bool:
    request = getattr(handler, "_current_request", None)
    if request is None:
        return True  # answered (or aborted) already
    writer = request.writer
    return writer is None or writer.output_size > 0


def _probe(handler: Any, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
    if transport.is_closing() or _response_started(handler):
        return
    if handler._current_request.version < HttpVersion11:  # no 1xx to HTTP/1.0 clients: trust the half-close
        return
    transport.write(INTERIM)
    loop.call_later(CHECK_AFTER_S, _check, handler, transport, loop)


def _check(handler: Any, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
    if transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    error = 0
    if sock is not None:
        with contextlib.suppress(OSError):
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:  # reset: the client closed for good, it did not half-close
        transport.abort()  # connection_lost -> the handler is cancelled, a held request leaves the queue
        return
    loop.call_later(PROBE_EVERY_S, _probe, handler, transport, loop)
