"""A lean HTTP/1.1 client for the proxy's upstream side, on asyncio's transport/Protocol layer (uvloop too).

Why not aiohttp's ClientSession: py-spy put ~250 µs of user CPU per proxied request in it (request
building, URL handling, the connector, ClientResponse, StreamReader), five times the proxy's own code.
The proxy needs far less: one method, a target and headers it already has, a body in memory, and the
response relayed byte for byte. This module does just that:

- `UpstreamPool`: one per backend; keep-alive connections, at most `max_idle` kept idle (LIFO: the
  warmest first), each dropped after `keepalive_s` idle (below uvicorn's 5 s default, so we rarely
  send on a connection the engine is closing). A connection goes back to the pool only after its
  response was read to the end and neither side said `Connection: close`; anything else (an error, a
  half-read body, a cancellation) closes it.
- The request goes out in one `transport.write` (request line, headers, body).
- Response parsing with httptools (llhttp): status line, headers into a `CIMultiDict`, then the body
  framed by Content-Length, `Transfer-Encoding: chunked` (decoded: the caller gets the payload bytes,
  trailers are dropped), or the connection's close (RFC 9112 6.3).
- Body chunks reach the caller as they arrive (`read_chunk`, `async for`, or `read` for all of it);
  when the caller lags by more than `HIGH_WATER` bytes the socket stops being read until it catches up.
- Cancelling a read (a timeout, a client that left) closes the connection at once, so the engine sees
  the request go away and stops generating.
- A reused idle connection that the server closed before answering is retried once on a new one
  (nothing was processed: no status line came back); a new connection that fails is the caller's error.

Parser choice: httptools (llhttp, the parser uvicorn uses; maintained by the MagicStack/uvloop
people). Measured on this machine against a first small hand parser (find the blank line, split,
partition each header, a chunked-decoding state machine in Python) for a typical engine answer (9
headers, a 250-byte JSON body), building the same CIMultiDict: httptools ~7-12 µs per response, the
hand parser ~15-22 µs (two runs, shared machine). Faster and better tested, so the library it is.
h11 is pure Python (slower than the hand parser by its design) and was not considered further.
Not supported: HEAD requests (the parser is not told the request method), 101 upgrades.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

HIGH_WATER = 256 * 1024  # buffered body bytes the caller has not taken: stop reading the socket
LOW_WATER = 64 * 1024  # ... and start again below this

_NO_BODY_STATUSES = frozenset((204, 304))


class UpstreamHTTPError(Exception):
    """Base of every failure this client raises."""


class ConnectError(UpstreamHTTPError):
    """The TCP (or TLS) connection could not be made: refused, unreachable, DNS. `os_error` says why."""

    def __init__(self, os_error: OSError) -> None:
        super().__init__(f"cannot connect: {os_error.strerror or os_error}")
        self.os_error = os_error


class ConnectTimeout(UpstreamHTTPError):
    """The connection was not established within the connect timeout."""


class ServerDisconnected(UpstreamHTTPError):
    """The server closed the connection before a complete status line and headers."""


class ProtocolError(UpstreamHTTPError):
    """The server sent something that is not HTTP/1.1 as we read it."""


class PayloadError(UpstreamHTTPError):
    """The body ended early (connection lost mid-body) or was malformed."""


class ResponseTooLarge(ProtocolError):
    """The response's headers or (read whole) body exceed the limits this client was given: an answer the
    proxy will not hold in memory, whatever the backend sends (issue 14)."""


# Connection states
_IDLE, _HEAD, _BODY, _DONE = range(4)


class _Connection(asyncio.Protocol):
    """One upstream connection: parses one response at a time and buffers its body for the reader."""

    __slots__ = ("transport", "loop", "parser", "state", "chunks", "buffered", "paused", "head_waiter",
                 "body_waiter", "exc", "closed", "reusable", "response", "idle_since", "got_bytes",
                 "raw_headers", "until_close", "head_bytes", "max_header_bytes", "max_headers")

    def __init__(self, loop: asyncio.AbstractEventLoop, max_header_bytes: int = 64 * 1024,
                 max_headers: int = 100) -> None:
        self.loop = loop
        self.head_bytes = 0
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.state = _IDLE
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.head_waiter: asyncio.Future[None] | None = None
        self.body_waiter: asyncio.Future[None] | None = None
        self.exc: BaseException | None = None
        self.closed = False
        self.reusable = True
        self.response: UpstreamResponse | None = None
        self.idle_since = 0.0
        self.got_bytes = False
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.until_close = False

    # --- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        state = self.state
        if state == _BODY and self.until_close:
            self.state = _DONE
        elif state == _HEAD:
            self.exc = ServerDisconnected("the backend closed the connection without a response")
        elif state == _BODY:
            self.exc = PayloadError("the backend closed the connection mid-body" + (f": {exc}" if exc else ""))
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost does the rest

    def data_received(self, data: bytes) -> None:
        if self.state not in (_HEAD, _BODY):
            self._fail(ProtocolError("the backend sent bytes outside a response"))
            return
        self.got_bytes = True
        head = self.state == _HEAD
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__ if isinstance(e.__context__, UpstreamHTTPError) else None
            self._fail(cause or ProtocolError(str(e)))
            return
        except httptools.HttpParserError as e:
            err = PayloadError if self.state == _BODY else ProtocolError
            self._fail(err(f"malformed response from the backend: {e}"))
            return
        if head and self.state == _HEAD:
            # Still no end of headers. llhttp (and httptools, which buffers each header whole) sets no limit:
            # without this a backend trickling header bytes grows the proxy for ever.
            self.head_bytes += len(data)
            if self.head_bytes > self.max_header_bytes:
                self._fail(ResponseTooLarge(f"status line and headers over {self.max_header_bytes} bytes"))
                return
        self._wake()

    # --- httptools callbacks -----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.state != _HEAD:
            raise ProtocolError("the backend sent a second response")
        self.raw_headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.raw_headers) >= self.max_headers:
            raise ResponseTooLarge(f"over {self.max_headers} headers")
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                raise ProtocolError("the backend switched protocols")
            return  # an interim answer; the real one follows (its on_message_complete is ignored)
        headers: CIMultiDict[str] = CIMultiDict()
        add = headers.add
        chunked = has_length = False
        for name, value in self.raw_headers:
            n = name.decode("utf-8", "surrogateescape")
            v = value.decode("utf-8", "surrogateescape")
            add(n, v)
            low = name.lower()
            if low == b"transfer-encoding":  # llhttp frames the body; until close only without either
                chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
            elif low == b"content-length":
                has_length = True
        if not parser.should_keep_alive():
            self.reusable = False
        self.until_close = not (chunked or has_length or status in _NO_BODY_STATUSES)
        if self.until_close:
            self.reusable = False
        self.state = _BODY
        self.response = UpstreamResponse(self, status, headers)
        w = self.head_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.state == _BODY:
            self.state = _DONE

    # --- waking the reader -------------------------------------------------------------------------
    def _wake(self) -> None:
        w = self.head_waiter
        if w is not None and not w.done() and (self.exc is not None or self.closed):
            w.set_exception(self.exc if self.exc is not None else
                            ServerDisconnected("the backend closed the connection without a response"))
        w = self.body_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: UpstreamHTTPError) -> None:
        if self.exc is None:
            self.exc = exc
        self.reusable = False
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def take(self) -> bytes:
        """All buffered body bytes."""
        chunks = self.chunks
        if len(chunks) == 1:
            data = chunks.popleft()
        else:
            data = b"".join(chunks)
            chunks.clear()
        self.buffered = 0
        if self.paused and not self.closed and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def close(self) -> None:
        self.reusable = False
        self.closed = True
        if self.transport is not None:
            self.transport.close()  # (uvloop and asyncio: idempotent)


class UpstreamResponse:
    """Status, headers, and the body as it arrives. Call `release()` (or `close()`) when done."""

    __slots__ = ("_conn", "status", "headers", "_pool", "_released")

    def __init__(self, conn: _Connection, status: int, headers: CIMultiDict[str]) -> None:
        self._conn = conn
        self.status = status
        self.headers = headers
        self._pool: UpstreamPool | None = None
        self._released = False

    @property
    def complete(self) -> bool:
        """The whole body has been received (it may still be buffered)."""
        return self._conn.state == _DONE and self._conn.exc is None

    async def read_chunk(self) -> bytes:
        """The body bytes received since the last call, waiting for some; b'' at the end of the body."""
        conn = self._conn
        while True:
            if conn.chunks:
                return conn.take()
            if conn.exc is not None:
                raise conn.exc
            if conn.state == _DONE:
                return b""
            if conn.closed:
                raise PayloadError("the connection closed mid-body")
            waiter = conn.body_waiter = conn.loop.create_future()
            try:
                await waiter
            except BaseException:
                conn.body_waiter = None
                self.close()  # cancelled (timeout, client gone): the engine must see us leave now
                raise
            conn.body_waiter = None

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.read_chunk()
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; ResponseTooLarge (and the connection closed) once it passes `limit` bytes."""
        conn = self._conn
        if limit is not None:
            length = self.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > limit:
                self.close()
                raise ResponseTooLarge(f"body of {length} bytes, over the limit of {limit}")
        if conn.state == _DONE and conn.exc is None and (limit is None or conn.buffered <= limit):
            return conn.take() if conn.chunks else b""  # usual for small answers: all arrived with the head
        parts = []
        size = 0
        while True:
            chunk = await self.read_chunk()
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if limit is not None and size > limit:
                self.close()
                raise ResponseTooLarge(f"body over the limit of {limit} bytes")
            parts.append(chunk)

    def release(self) -> None:
        """Done with this response: the connection goes back to the pool if the body was read to its end."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        if (conn.state == _DONE and conn.reusable and not conn.closed and conn.exc is None and not conn.chunks
                and self._pool is not None):
            self._pool._put(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Done with this response, whatever state it is in: the connection closes."""
        self._released = True
        self._conn.close()


class UpstreamPool:
    """Keep-alive connections to one backend (`http://host:port` or `https://host:port`)."""

    def __init__(self, base_url: str, *, connect_timeout_s: float = 5.0, max_idle: int = 64,
                 keepalive_s: float = 4.0, ssl_context: ssl.SSLContext | None = None,
                 max_header_bytes: int = 64 * 1024, max_headers: int = 100) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self.ssl = ssl_context or ssl.create_default_context()
        default_port = 443 if parts.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if self.port == default_port else f"{host}:{self.port}"
        self.prefix = parts.path.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self.max_idle = max_idle
        self.keepalive_s = keepalive_s
        self._idle: collections.deque[_Connection] = collections.deque()
        self._closed = False
        self.connections_made = 0  # for tests and stats

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def _put(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        conn.response = None
        conn.state = _IDLE
        conn.idle_since = time.monotonic()
        idle = self._idle
        idle.append(conn)
        while len(idle) > self.max_idle:
            idle.popleft().close()  # the coldest goes

    def _get_idle(self) -> _Connection | None:
        idle = self._idle
        if not idle:
            return None
        cutoff = time.monotonic() - self.keepalive_s
        while idle:
            conn = idle.pop()
            if conn.closed or conn.idle_since < cutoff:
                conn.close()
                continue
            # Colder ones than this are older still: drop the expired ones from the cold end.
            while idle and idle[0].idle_since < cutoff:
                idle.popleft().close()
            return conn
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, self.max_header_bytes, self.max_headers), self.host, self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None)
        except TimeoutError:
            raise ConnectTimeout(f"connecting to {self.host}:{self.port} took over {self.connect_timeout_s:g}s") \
                from None
        except ssl.SSLError as e:
            raise UpstreamHTTPError(f"TLS handshake with {self.host}:{self.port} failed: {e}") from e
        except OSError as e:
            raise ConnectError(e) from e
        self.connections_made += 1
        return conn  # type: ignore[return-value]

    def encode_request(self, method: str, path: str, headers: list[tuple[str, str]] | CIMultiDict[str],
                       body: bytes) -> bytes:
        """Request line, Host, the given headers, Content-Length, body: one bytes object."""
        target = self.prefix + path
        if not target.startswith("/") and target != "*":
            target = "/" + target
        items = headers.items() if isinstance(headers, CIMultiDict) else headers
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host_header}"]
        lines.extend([f"{k}: {v}" for k, v in items])
        if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            lines.append(f"Content-Length: {len(body)}")
        text = "\r\n".join(lines)
        n = len(lines) - 1
        if text.count("\n") != n or text.count("\r") != n or " " in target or "\t" in target:
            raise ValueError("CR, LF or whitespace in the request target or a header")  # header injection
        data = (text + "\r\n\r\n").encode("utf-8", "surrogateescape")
        return data + body if body else data

    async def request(self, method: str, path: str, headers: list[tuple[str, str]] | CIMultiDict[str],
                      body: bytes = b"") -> UpstreamResponse:
        """Send one request; return once its status line and headers have arrived.

        `path` is the request target (path and query, already encoded). Do not pass Host,
        Content-Length or Transfer-Encoding in `headers`: they are written here.
        Raises ConnectError, ConnectTimeout, ServerDisconnected, ProtocolError, UpstreamHTTPError.
        """
        if self._closed:
            raise UpstreamHTTPError("the pool is closed")
        if method == "HEAD":  # the parser cannot be told that a HEAD answer has no body
            raise ValueError("HEAD requests are not supported")
        data = self.encode_request(method, path, headers, body)
        conn = self._get_idle()
        reused = conn is not None
        while True:
            if conn is None:
                conn = await self._connect()
            try:
                return await self._exchange(conn, data)
            except ServerDisconnected:
                # A kept-alive connection the server closed as we sent: nothing was processed. Once more,
                # on a fresh connection.
                if not reused or conn.got_bytes:
                    raise
                reused = False
                conn = None

    async def _exchange(self, conn: _Connection, data: bytes) -> UpstreamResponse:
        transport = conn.transport
        if conn.closed or transport is None or transport.is_closing():
            conn.close()
            raise ServerDisconnected("the backend closed the connection without a response")
        conn.state = _HEAD
        conn.head_bytes = 0
        conn.reusable = True
        conn.exc = None
        conn.got_bytes = False
        conn.response = None
        waiter = conn.head_waiter = conn.loop.create_future()
        try:
            transport.write(data)
            if conn.response is None or conn.state == _HEAD:
                await waiter
        except BaseException:
            conn.close()  # cancelled or failed before the head: never reuse a half-used connection
            raise
        finally:
            conn.head_waiter = None
        resp = conn.response
        if resp is None:  # pragma: no cover - the waiter resolves only with a response or an error
            conn.close()
            raise ServerDisconnected("the backend closed the connection without a response")
        if conn.exc is not None and conn.state == _DONE and not conn.chunks:
            conn.close()
            raise conn.exc
        resp._pool = self
        return resp

    async def close(self) -> None:
        """Close the idle connections; those in use close when released."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
