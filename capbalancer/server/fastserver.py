"""The client-facing HTTP/1.1 server of the proxied routes: an asyncio.Protocol on httptools (issue 17 item 1).

Why: aiohttp's server was most of the proxy's CPU per request (bench/results/dataplane.md); a Protocol that
parses with httptools (llhttp, as uvicorn does) and hands the parsed request to the same handlers costs a
fraction of it.

What it serves itself: only the clean case of the scheduled routes (`POST /v1/chat/completions`, every route
of routes.py whose handler is proxy.handle), HTTP/1.1, framed by one Content-Length within
`server.max_body_bytes`, a head within `server.max_header_bytes` and aiohttp's 128 headers, CRLF line endings,
no Transfer-Encoding, Content-Encoding, Expect or Upgrade, tracing off. The request goes through the application's own
middlewares (observe, errors) to proxy.handle, and the response objects those return are written by aiohttp's
own StreamResponse code (prepare/write_eof) into a small writer here: the same status lines, headers, Date,
Server, chunking and Connection: close as before.

Everything else is handed over, connection and all, to aiohttp's server at the start of that request: the
bytes received since the request began are replayed into an aiohttp RequestHandler that takes the transport.
So every request the fast path does not vouch for (malformed HTTP, smuggling attempts such as CL+TE or two
Content-Lengths, oversized heads or bodies, other routes, probes and the admin API) meets exactly the code
and the hardening it met before: the OpenAI-shaped 400s, 413s and 431s, the warning line, the route table.

Hardening kept here for what it serves: the slow-loris/idle timeout (counted from the connection's start or
its last response, as aiohttp counts it), the body read timeout (proxy.read_body, unchanged), a half-closed
client still gets its answer (server/halfclose.py's probes), a client that leaves cancels its handler, the
connection count for the front door's cap, and a graceful drain on SIGTERM (`shutdown`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import httptools
from aiohttp import HttpVersion11, hdrs, web
from aiohttp.client_exceptions import ClientConnectionResetError
from aiohttp.helpers import must_be_empty_body, rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_writer import _serialize_headers
from multidict import CIMultiDict, CIMultiDictProxy

from capbalancer.config import ServerSettings
from capbalancer.server import halfclose, observe, proxy, routes
from capbalancer.server.app import _unexpected_errors, errors_before_the_middlewares, unexpected_error_answer
from capbalancer.server.deadline import Deadline
from capbalancer.server.errors import error_body
from capbalancer.server.observe import Observer, status_of_exception

log = logging.getLogger("capbalancer.server")

Handler = Callable[[Any], Awaitable[web.StreamResponse]]

MAX_HEADERS = 128  # aiohttp's default: a request with more goes to aiohttp, which answers it as before
PENDING_HIGH_WATER = 256 * 1024  # bytes received ahead of the request in progress before reading pauses
# Request targets served here: the scheduled routes (proxy.handle); matched on the raw target, no query.
FAST_ROUTES: dict[bytes, tuple[bytes, str]] = {
    rule.path.encode(): (rule.method.encode(), rule.path) for rule in routes.ROUTES
    if rule.kind in ("scheduled", "pooling") and "{" not in rule.path}

# Parser states of a connection.
_HEAD = 0  # waiting for (the rest of) a request head; bytes kept in case of a hand-over
_BODY = 1  # a fast request: its body arriving, its handler started
_DONE = 2  # its whole message received; the handler still answering


class _HandOver(Exception):
    """Raised inside a parser callback: this request goes to aiohttp."""


class _Stop(Exception):
    """Raised inside on_message_complete when more bytes (a pipelined request) follow in the same chunk."""


class Body:
    """The request body as proxy.read_body reads it (`request.content.iter_any()`), filled by the parser."""

    __slots__ = ("chunks", "eof", "waiter", "exc", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.chunks: list[bytes] = []
        self.eof = False
        self.waiter: asyncio.Future[None] | None = None
        self.exc: BaseException | None = None
        self.loop = loop

    def feed(self, data: bytes) -> None:
        self.chunks.append(data)
        self._wake()

    def feed_eof(self) -> None:
        self.eof = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        self.exc = exc
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def is_eof(self) -> bool:
        return self.eof and not self.chunks

    def whole(self) -> bytes | None:
        """The entire body if it has all arrived (the usual case: it came with the head), else None. Lets
        proxy.read_body skip its read timeout (an asyncio.timeout costs a timer and two getpid() calls)."""
        if not self.eof or self.exc is not None:
            return None
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        return data

    def iter_any(self) -> Body:
        return self

    def __aiter__(self) -> Body:
        return self

    async def __anext__(self) -> bytes:
        while not self.chunks:
            if self.exc is not None:
                raise self.exc
            if self.eof:
                raise StopAsyncIteration
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        chunks = self.chunks
        if len(chunks) == 1:
            return chunks.pop()
        data = b"".join(chunks)
        chunks.clear()
        return data


class Writer:
    """What aiohttp's StreamResponse writes through (its AbstractStreamWriter's interface): the head is held
    until the first body bytes so a small answer leaves in one send, as aiohttp's own writer does."""

    __slots__ = ("conn", "length", "output_size", "buffer_size", "chunked", "head")

    def __init__(self, conn: FastProtocol) -> None:
        self.conn = conn
        self.length: int | None = None
        self.output_size = 0
        self.buffer_size = 0
        self.chunked = False
        self.head: bytes | None = None

    def enable_chunking(self) -> None:
        self.chunked = True

    def enable_compression(self, encoding: str = "deflate", strategy: int | None = None) -> None:
        raise RuntimeError("the proxy never compresses what it relays")  # DESIGN invariant 5

    async def write_headers(self, status_line: str, headers: CIMultiDict[str]) -> None:
        self.head = _serialize_headers(status_line, headers)  # refuses CR/LF in names and values

    def send_headers(self) -> None:
        if self.head is not None:
            head, self.head = self.head, None
            self._send(head)

    def _send(self, data: bytes) -> None:
        transport = self.conn.transport
        if transport is None or transport.is_closing():
            raise ClientConnectionResetError("Cannot write to closing transport")
        transport.write(data)
        self.output_size += len(data)

    async def write(self, chunk: bytes | bytearray | memoryview, *, drain: bool = True, LIMIT: int = 0) -> None:
        if not chunk:
            return
        if self.chunked:
            chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        if self.head is not None:
            head, self.head = self.head, None
            chunk = head + chunk
        self._send(chunk)
        if drain and self.conn.write_paused:
            await self.conn.drain()

    async def write_eof(self, chunk: bytes = b"") -> None:
        if self.chunked:
            chunk = (b"%x\r\n%b\r\n0\r\n\r\n" % (len(chunk), chunk)) if chunk else b"0\r\n\r\n"
        if self.head is not None:
            head, self.head = self.head, None
            chunk = head + chunk
        if chunk:
            self._send(chunk)
        if self.conn.write_paused:
            await self.conn.drain()

    async def drain(self) -> None:
        if self.conn.write_paused:
            await self.conn.drain()

    def set_eof(self) -> None:
        pass


class FastRequest:
    """The part of aiohttp's web.Request that the middlewares and proxy.handle use."""

    __slots__ = ("app", "method", "path", "raw_path", "path_qs", "headers", "content", "conn", "version",
                 "_payload_writer", "_state", "_keep_alive")

    def __init__(self, app: web.Application, method: str, path: str, headers: CIMultiDictProxy[str], content: Body,
                 conn: FastProtocol, keep_alive: bool) -> None:
        self.app = app
        self.method = method
        self.path = self.raw_path = self.path_qs = path
        self.headers = headers
        self.content = content
        self.conn = conn
        self.version = HttpVersion11
        self._payload_writer = Writer(conn)
        self._state: dict[Any, Any] = {}
        self._keep_alive = keep_alive

    # request[key] storage (the access-log record)
    def __getitem__(self, key: Any) -> Any:
        return self._state[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._state[key] = value

    def __contains__(self, key: Any) -> bool:
        return key in self._state

    def get(self, key: Any, default: Any = None) -> Any:
        return self._state.get(key, default)

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None else None

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.conn.transport

    @property
    def writer(self) -> Writer:
        return self._payload_writer

    def door_pass_read(self) -> None:
        """The scheduler has this request now (proxy.py): the front door no longer counts it in transit."""
        self.conn._first_request_read()

    @property
    def attempt_deadline(self) -> Deadline:
        """The connection's deadline for proxy.py's attempts: its loop timer outlives each request."""
        return self.conn.deadline

    @property
    def keep_alive(self) -> bool:
        return self._keep_alive and not self.conn.closing

    @property
    def remote(self) -> str | None:
        peer = self.conn.transport.get_extra_info("peername") if self.conn.transport is not None else None
        return peer[0] if isinstance(peer, (list, tuple)) and peer else None

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        signal = self.app.on_response_prepare
        if signal:
            await signal.send(self, response)


class FastServer:
    """Makes a FastProtocol per connection (the front door's or the listening socket's protocol factory)."""

    def __init__(self, app: web.Application, aiohttp_server: web.Server, settings: ServerSettings) -> None:
        self.app = app
        self.aiohttp_server = aiohttp_server
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        # The application's middlewares around proxy.handle, outermost first, as aiohttp chains them.
        handler: Handler = proxy.handle
        for middleware in reversed(tuple(app.middlewares)):
            handler = functools.partial(middleware, handler=handler)
        self.handler = handler
        # The application's own chain (observe, then the errors middleware) and first-byte hook: then the fast
        # server makes their calls itself around proxy.handle (`_respond`), the same steps in the same order
        # without two coroutines per request. Any other chain (an embedder's middleware) goes through `handler`.
        observer = app.get(observe.OBSERVER)
        standard = (observer is not None and tuple(app.middlewares) == (observer.middleware, _unexpected_errors)
                    and tuple(app.on_response_prepare) == (observe.first_byte, errors_before_the_middlewares))
        self.observer: Observer | None = observer if standard else None
        self.connections: set[FastProtocol] = set()
        self.handed_over = 0  # connections given to aiohttp (tests and figures)
        self.shutting_down = False

    def __call__(self) -> FastProtocol:
        return FastProtocol(self)

    def connection_count(self) -> int:
        """Client connections open now, here and on aiohttp's side (the front door's cap)."""
        return len(self.connections) + len(getattr(self.aiohttp_server, "_connections", ()))

    async def shutdown(self, timeout_s: float) -> None:
        """SIGTERM: idle connections close now; requests in progress get `timeout_s` to finish (each then closes
        its connection), after which they are cancelled."""
        self.shutting_down = True
        busy = []
        for conn in list(self.connections):
            conn.closing = True
            if conn.task is None:
                conn.close()
            else:
                busy.append(conn.task)
        if busy:
            _, pending = await asyncio.wait(busy, timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for conn in list(self.connections):
            conn.close()


class FastProtocol(asyncio.Protocol):
    """One client connection; see the module docstring."""

    def __init__(self, server: FastServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.state = _HEAD
        self.raw = bytearray()  # bytes of the request being received, while it could still be handed over
        self.seen = 0  # bytes of the current request fed to the parser before the current chunk
        self.chunk = b""
        self.url = b""
        self.header_list: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.message_end = 0  # the request's length in bytes, once its head is known
        self.pending = bytearray()  # bytes after the request in progress (pipelined), parsed after its answer
        self.reading_paused = False
        self.request: FastRequest | None = None
        self.body: Body | None = None
        self.task: asyncio.Task[None] | None = None
        self.closing = False  # no further requests on this connection
        self.handed = False
        self.eof = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.idle_deadline = 0.0
        self.idle_handle: asyncio.TimerHandle | None = None
        self.deadline = Deadline(self.loop, persistent=True)  # the attempts' (server/deadline.py)
        # Set by the front door on a connection whose request it judged and passed on: called once, when that
        # request's head is read (or the connection ends first), so the door knows it is no longer in transit.
        self.on_first_request: Callable[[], None] | None = None

    # --- asyncio.Protocol ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):  # as aiohttp does: small answers go out at once, dead peers found
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if self.server.shutting_down:
            self.close()
            return
        self._arm_idle()

    def _first_request_read(self) -> None:
        hook, self.on_first_request = self.on_first_request, None
        if hook is not None:
            hook()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.server.connections.discard(self)
        if self.on_first_request is not None:
            self._first_request_read()
        transport, self.transport = self.transport, None
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        self.deadline.close()
        if self.body is not None and not self.body.eof:
            self.body.set_exception(exc or ConnectionResetError("Connection lost"))
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ClientConnectionResetError("Connection lost"))
        if self.task is not None and not self.task.done():
            self.task.cancel()  # handler_cancellation, as before: a held request leaves the queue at once
        del transport

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> None:
        if not self.write_paused:
            return
        if self.transport is None:
            raise ClientConnectionResetError("Connection lost")
        waiter = self.drain_waiter
        if waiter is None or waiter.done():
            waiter = self.drain_waiter = self.loop.create_future()
        await waiter

    def eof_received(self) -> bool:
        """A half-closed client still gets its answer; an idle one is closed (server/halfclose.py)."""
        self.eof = True
        if self.task is None:  # idle, or a partial request that can never complete: closed, as before
            return False
        self.closing = True
        if self.body is not None and not self.body.eof:
            transport = self.transport
            if transport is not None:
                transport.abort()  # the FIN came before the whole body: closed, as before
            return True
        transport = self.transport
        if transport is not None:
            self.loop.call_later(halfclose.FIRST_PROBE_S, halfclose._probe, self, transport, self.loop)
        return True

    @property
    def _current_request(self) -> FastRequest | None:  # what halfclose's probes look at
        return self.request if self.task is not None else None

    def data_received(self, data: bytes) -> None:
        if self.handed:
            return
        if self.state == _DONE or self.pending:
            self.pending += data  # the next request, while this one is answered: parsed after
            if len(self.pending) > PENDING_HIGH_WATER and not self.reading_paused and self.transport is not None:
                self.reading_paused = True
                self.transport.pause_reading()
            return
        self._feed(data)

    # --- parsing ---------------------------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        if self.state == _HEAD:
            self.raw += data
        self.chunk = data
        try:
            self.parser.feed_data(data)
        except _HandOver:  # pragma: no cover - httptools wraps callback errors; kept for safety
            self._hand_over()
            return
        except httptools.HttpParserUpgrade:
            self._hand_over()
            return
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _Stop):
                self.parser = httptools.HttpRequestParser(self)  # it stopped mid-stream: a fresh one next
            else:
                self._hand_over()  # malformed, or handed over from a callback: aiohttp answers as it did
                return
        self.seen += len(data)
        if self.state == _HEAD and len(self.raw) > self.server.settings.max_header_bytes + 4:
            self._hand_over()  # a head this long (or never ending): aiohttp's limits and answers decide

    def on_message_begin(self) -> None:
        self.header_list = []
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self.header_list
        if len(headers) >= MAX_HEADERS:
            raise _HandOver
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        # A request the front door passed on stays in its in-transit count until the scheduler has it (proxy.py
        # says so at its first decision) or it ends: a head read is not yet in the hold queue the door judges by.
        door_passed = self.on_first_request is not None
        parser = self.parser
        route = FAST_ROUTES.get(self.url)
        if (route is None or parser.get_method() != route[0] or parser.get_http_version() != "1.1"
                or parser.should_upgrade() or self.closing or self.server.shutting_down):
            raise _HandOver
        state = self.server.app[proxy.STATE]
        if state.config.server.tracing:  # spans clone the request: aiohttp's Request does that
            raise _HandOver
        length = None
        headers: CIMultiDict[str] = CIMultiDict()
        add = headers.add
        for name, value in self.header_list:
            low = name.lower()
            if low == b"content-length":
                if length is not None:
                    raise _HandOver  # two of them: aiohttp decides (and refuses)
                if not value.isdigit():
                    raise _HandOver
                length = int(value)
            elif low in (b"transfer-encoding", b"expect", b"upgrade", b"content-encoding"):
                raise _HandOver  # framing and codings aiohttp's parser judges (a compressed body: its 400 or 415)
            add(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
        if length is None or length > state.config.server.max_body_bytes:  # (a reload may change it)
            raise _HandOver
        raw = self.raw
        head_end = raw.find(b"\r\n\r\n")
        if not raw.startswith(route[0] + b" ") or head_end < 0 or raw.count(b"\n", 0, head_end) != raw.count(b"\r\n", 0, head_end):
            raise _HandOver  # line endings other than CRLF: aiohttp's parser judges those
        self.message_end = head_end + 4 + length
        self.raw = bytearray()  # served here now: no more hand-over for this request
        body = self.body = Body(self.loop)
        request = self.request = FastRequest(self.server.app, "POST", route[1], CIMultiDictProxy(headers), body, self,
                                             parser.should_keep_alive())
        if door_passed:
            request[proxy.DOOR_PASSED] = True
        self.state = _BODY
        self.task = self.loop.create_task(self._respond(request))

    def on_body(self, data: bytes) -> None:
        body = self.body
        if body is not None:
            body.feed(data)

    def on_message_complete(self) -> None:
        if self.body is None:
            return
        self.body.feed_eof()
        self.state = _DONE
        # Bytes past this request in the same chunk: a pipelined request, parsed after this one's answer.
        end_in_chunk = self.message_end - self.seen
        if end_in_chunk < len(self.chunk):
            self.pending += self.chunk[end_in_chunk:]
            raise _Stop

    # --- answering -------------------------------------------------------------------------------------
    async def _respond(self, request: FastRequest) -> None:
        keep_alive = False
        try:
            observer = self.server.observer
            try:
                if observer is None:
                    response = await self.server.handler(request)
                else:
                    response = await _observed(request, observer)
            except web.HTTPException as exc:
                response = exc
            except (asyncio.CancelledError, ConnectionError):
                raise
            except Exception as exc:  # the middleware answers errors itself; this is a bug past it
                log.error("error handling a request", exc_info=exc)
                response = web.Response(status=500, body=error_body(500, "internal error in the proxy"),
                                        content_type="application/json")
                response.force_close()
            # Observed here: the first-byte hook would find the first byte recorded already (Observer.end).
            if not await _send_plain(request, response, prepare_hook=observer is None):
                await response.prepare(request)  # type: ignore[arg-type]
                await response.write_eof()
            # A body not read to its end (an answer before it all arrived): the connection closes after the answer.
            keep_alive = bool(response.keep_alive) and request.content.eof
        except (asyncio.CancelledError, ConnectionError):
            keep_alive = False
        finally:
            self._first_request_read()  # ended before the scheduler had it (refused, a bad request...)
            self._answered(keep_alive)

    def _answered(self, keep_alive: bool) -> None:
        self.task = None
        self.request = None
        if not keep_alive or self.closing or self.transport is None or self.state != _DONE:
            self.close()
            return
        self.state = _HEAD
        self.body = None
        self.seen = 0
        self._arm_idle()
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()
        if self.pending:
            data = bytes(self.pending)
            self.pending = bytearray()
            self._feed(data)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    # --- idle connections (slow-loris) ---------------------------------------------------------------
    def _arm_idle(self) -> None:
        timeout = self.server.settings.idle_timeout_s
        if timeout <= 0:
            return
        self.idle_deadline = self.loop.time() + timeout
        if self.idle_handle is None:
            self.idle_handle = self.loop.call_at(self.idle_deadline, self._idle_check)

    def _idle_check(self) -> None:
        self.idle_handle = None
        if self.state != _HEAD or self.handed or self.transport is None:
            return  # a request in progress: its own timeouts apply; re-armed after its answer
        now = self.loop.time()
        if now < self.idle_deadline:
            self.idle_handle = self.loop.call_at(self.idle_deadline, self._idle_check)
            return
        self.close()  # waited, or trickled its head, for idle_timeout_s: closed as aiohttp closed it

    # --- hand-over ---------------------------------------------------------------------------------------
    def _hand_over(self) -> None:
        """Give this connection to aiohttp's server with the bytes received since this request began."""
        self._first_request_read()  # aiohttp's server has no hook: counted read now (an undercount, never stuck)
        transport = self.transport
        self.handed = True
        self.server.connections.discard(self)
        self.server.handed_over += 1
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        self.deadline.close()
        data = bytes(self.raw) + bytes(self.pending)
        self.raw = bytearray()
        self.pending = bytearray()
        if transport is None or transport.is_closing():
            return
        handler = self.server.aiohttp_server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()
        if data:
            handler.data_received(data)
        if self.eof:
            with contextlib.suppress(Exception):
                if not handler.eof_received():
                    transport.close()


async def _observed(request: FastRequest, observer: Observer) -> web.StreamResponse:
    """observe(_unexpected_errors(proxy.handle)) as plain calls (server/observe.py, app.py): the same record,
    statuses, answers and access line, in the same order (the line before the answer is sent), with one coroutine
    around proxy.handle where the middleware chain had two."""
    access_log_on = observer.state.config.server.access_log
    record = observer.begin(request)
    response: web.StreamResponse | None = None
    try:
        try:
            response = await proxy.handle(request)  # type: ignore[arg-type]
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:  # the errors middleware's answer (an HTTPException under 400 is re-raised)
            response = unexpected_error_answer(request, exc)  # type: ignore[arg-type]
        record.status = response.status
        return response
    except BaseException as exc:
        record.status = status_of_exception(exc)
        raise
    finally:
        observer.end(record, response, access_log_on)


async def _send_plain(request: FastRequest, response: web.StreamResponse, prepare_hook: bool = True) -> bool:
    """Send a whole web.Response with a bytes body (every non-streamed answer) as aiohttp's prepare() and
    write_eof() would, with the same headers, in one transport.write, without their machinery (~10 us a
    request, bench/results/dataplane.md). False, nothing done: anything else (streams, payloads, cookies,
    compression, chunking, bodiless statuses), which aiohttp writes as before. `prepare_hook` False: the app's
    on_response_prepare handlers are known to have nothing left to do (the observed fast path)."""
    if type(response) is not web.Response or response.prepared:
        return False
    body = getattr(response, "_body", None)
    if (type(body) is not bytes or getattr(response, "_compression", True) or getattr(response, "_cookies", True)
            or getattr(response, "_chunked", True) or must_be_empty_body("POST", response.status)):
        return False
    headers = response.headers
    if hdrs.CONTENT_LENGTH not in headers:
        headers[hdrs.CONTENT_LENGTH] = str(len(body))
        length = len(body)
    else:
        length = int(headers[hdrs.CONTENT_LENGTH])  # set by the handler: aiohttp keeps it, and so here
    keep_alive = response._keep_alive
    if keep_alive is None:
        keep_alive = response._keep_alive = request.keep_alive
    if length != 0:
        headers.setdefault(hdrs.CONTENT_TYPE, "application/octet-stream")
    if hdrs.DATE not in headers:
        headers[hdrs.DATE] = rfc822_formatted_time()
    headers.setdefault(hdrs.SERVER, SERVER_SOFTWARE)
    if not keep_alive and hdrs.CONNECTION not in headers:
        headers[hdrs.CONNECTION] = "close"
    if prepare_hook and request.app.on_response_prepare:
        await request._prepare_hook(response)
    writer = request._payload_writer
    response._req = request  # type: ignore[assignment]
    response._payload_writer = writer  # type: ignore[assignment]
    response._eof_sent = True  # prepared and finished: aiohttp's own methods now do nothing
    # _serialize_headers refuses CR/LF in names and values, as aiohttp's writer does.
    writer._send(_serialize_headers(f"HTTP/1.1 {response.status} {response.reason}", headers) + body)
    return True


def pending_requests(server: FastServer) -> int:
    """Requests in progress on fast connections (tests)."""
    return sum(1 for c in server.connections if c.task is not None)


