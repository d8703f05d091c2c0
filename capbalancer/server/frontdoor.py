"""The front door: a thread that accepts every client connection, answers /health and /ready itself, caps
the number of open connections, and hands everything else to the event loop (issue 14).

Why a thread: under a 10x overload the event loop is busy with proxied work, and an accept that waits for
the loop waits behind all of it. Measured on this project (bench/overload.py, bench/results/robust-server.md):
with the listening socket on the loop, 3,000 connections left up to ~1,800 unaccepted in the kernel backlog
under uvloop and /health probes took seconds, so a liveness probe would restart the pod exactly when it is
needed. This thread only blocks in `select` (which releases the GIL); its calls on client connections are
non-blocking and keep the GIL (server/heldio.py), since each release would cost it a switch interval to get the
GIL back from a busy loop. So it waits for the GIL about once a wake-up, however many connections that brings:

- every connection is accepted at once, in batches (`accept` until EAGAIN): nothing waits in the backlog;
- its first bytes are peeked (MSG_PEEK: nothing is consumed). `GET /health` and `GET /ready` are answered
  here with `Connection: close`; /ready reads the scheduler's state through a callable that must only read;
- past `max_connections` open client connections, anything else is answered 503 + Retry-After at once;
- while every hold queue is full, a new POST is answered 429 + Retry-After here (the loop would only parse it
  to say the same), with `Connection: close` so that the client's retry comes back through this door;
- likewise a new POST that could not start within its TTFT objective (the loop's lag plus the hold queue's
  wait past the most its objective allows, judged on what the loop publishes: server/overload.py);
- everything else goes to the loop with `loop.connect_accepted_socket`, unchanged: aiohttp parses it as if
  it had accepted it itself (a connection that sent nothing within `handoff_after_s` goes too: aiohttp's
  idle timeout then applies to it);
- out of descriptors (EMFILE), one descriptor kept in reserve is freed to accept the connection, answer it
  503 and close it, so the backlog still drains and clients learn at once (the libev/nginx trick).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from capbalancer.server.errors import error_body, retry_after_header, retry_after_ms_header
from capbalancer.server.heldio import HeldIO, SocketModuleIO, door_io
from capbalancer.server.limits import default_max_connections, fd_soft_limit
from capbalancer.server.overload import DoorRefusal, head_fields

log = logging.getLogger("capbalancer.server")

ProbeAnswer = Callable[[str], "tuple[int, bytes] | None"]  # path -> (status, JSON body), None: let the loop answer

_PROBE_PATHS = (b"/health", b"/ready")
_PEEK_BYTES = 1024
_ACCEPT_BATCH = 512  # connections accepted per wake-up before looking at the others again
_DRAIN_S = 1.0  # after a refusal, read and drop what the client still sends this long, so it reads our answer
_MAX_DRAINING = 64  # refused connections drained at once (each holds a descriptor); beyond, closed at once
LISTEN_BACKLOG = 4096


@dataclass
class _Pending:
    since_s: float
    draining: bool = False  # answered and half-closed by us; waiting for the client's EOF
    watched: bool = False  # registered with the selector (only once it has to wait for the client)


def bind_listeners(host: str | None, port: int, backlog: int = LISTEN_BACKLOG,
                   reuse_port: bool = False) -> list[socket.socket]:
    """Listening sockets for `host:port` (every address the name resolves to), as asyncio would make them."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:  # one of `serve --workers N`: the siblings listen on the same port
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for s in socks:
            s.close()
        raise
    return socks


def _response(status: int, reason: str, body: bytes, extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n").encode() + body


def _overloaded(message: str) -> bytes:
    return _response(503, "Service Unavailable", error_body(503, message, "proxy_overloaded"), "Retry-After: 1\r\n")


_SHEDDABLE = (b"POST /v1/", b"POST /generate")  # the proxied API (never the admin API: operators need it most now)
_SHED = _response(429, "Too Many Requests", error_body(
    429, "every hold queue of the proxy is full; retry later", "no_capacity"), "Retry-After: 1\r\n")


def _refusal(refusal: DoorRefusal) -> bytes:
    # The door spreads its refusals' retries below a second apart, as the scheduler does: both headers, as
    # error_response writes them.
    return _response(429, "Too Many Requests", error_body(429, refusal.message, "no_capacity"),
                     f"Retry-After: {retry_after_header(refusal.retry_after_s)}\r\n"
                     f"retry-after-ms: {retry_after_ms_header(refusal.retry_after_s)}\r\n")


def whole_request_bytes(head: bytes) -> int | None:
    """How many bytes the request that starts `head` takes (head + Content-Length body), when its whole head is
    there and it has no chunked body; None otherwise."""
    fields = head_fields(head)
    if fields is None or fields.chunked:
        return None
    return fields.end + 4 + (fields.content_length or 0)


def probe_path(head: bytes) -> str | None | bool:
    """What the first bytes of a connection are: the probe path it asks for (its whole head has arrived),
    False when it is not a probe, None when too few bytes have arrived to tell."""
    for path in _PROBE_PATHS:
        line = b"GET " + path
        n = min(len(head), len(line) + 1)
        if head[:n] != (line + b" ")[:n] and head[:n] != (line + b"?")[:n]:
            continue
        if len(head) <= len(line) or b"\r\n\r\n" not in head:
            return None  # so far it looks like this probe: wait for the rest of its head
        return path.decode()
    return False


class FrontDoor:
    """Accepts on `listeners` in a thread; see the module docstring."""

    def __init__(self, listeners: list[socket.socket], loop: asyncio.AbstractEventLoop,
                 protocol_factory: Callable[[], asyncio.Protocol], probe: ProbeAnswer,
                 open_connections: Callable[[], int], max_connections: int, handoff_after_s: float = 0.5,
                 shed: Callable[[], bool] | None = None,
                 judge: Callable[[bytes], DoorRefusal | None] | None = None,
                 on_refused: Callable[[bytes, int], None] | None = None,
                 passes: Callable[[], int] | None = None,
                 on_pass_read: Callable[[], None] | None = None,
                 io: HeldIO | SocketModuleIO | None = None) -> None:
        self.listeners = listeners
        # Told of each request answered here with a refusal (its first bytes, the status): the access log's line
        # for a request that never reaches the loop. Called on this thread: it must not block or touch the loop.
        self.on_refused = on_refused
        self.loop = loop
        self.protocol_factory = protocol_factory
        self.probe = probe
        self.open_connections = open_connections
        self.max_connections = max_connections
        self.shed = shed
        # A new request's head -> its refusal when it would be refused anyway (server/overload.py).
        self.judge = judge
        # The judge's count of requests it let through (read on this thread, which alone moves it), and what to
        # tell it on the loop once the scheduler has such a request: until then it is in transit, in no queue.
        self.passes = passes
        self.on_pass_read = on_pass_read
        self._cap = max_connections
        self._cap_at_s = 0.0
        self.handoff_after_s = handoff_after_s
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        # The thread's calls on client connections (descriptors until handed over): calls that keep the GIL
        # (server/heldio.py), so that only its select gives the GIL up to a busy loop.
        self._io = io if io is not None else door_io()
        self._pending: dict[int, _Pending] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._reserve_fd: int | None = None
        self._draining = 0
        self.handed = 0  # written by the thread only
        self.adopted = 0  # written by the loop only
        # Figures (read by tests and the bench): what the thread answered itself.
        self.probes_answered = 0
        self.refused_over_cap = 0
        self.refused_no_fds = 0
        self.shed_429 = 0

    # --- lifecycle (called on the loop) ---------------------------------------------------------------
    def start(self) -> None:
        for s in self.listeners:
            self._sel.register(s, selectors.EVENT_READ, "listen")
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._reserve()
        self._thread = threading.Thread(target=self._run, name="capbalancer-frontdoor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting (listening sockets closed); connections not yet handed over are closed. Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        for s in self.listeners:
            s.close()
        for fd in list(self._pending):
            with contextlib.suppress(OSError):
                self._io.close(fd)
        self._pending.clear()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        if self._reserve_fd is not None:
            os.close(self._reserve_fd)
            self._reserve_fd = None

    @property
    def in_handover(self) -> int:
        return self.handed - self.adopted

    # --- the thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            timeout = self._next_timeout()
            try:
                events = self._sel.select(timeout)
            except OSError:  # pragma: no cover - a closed selector while stopping
                return
            for key, _ in events:
                if self._stopping:
                    return
                tag = key.data
                if tag == "listen":
                    self._accept(key.fileobj)  # type: ignore[arg-type]
                elif tag == "wake":
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(64)
                else:
                    self._readable(key.fd)
            self._expire()

    def _next_timeout(self) -> float | None:
        if not self._pending:
            return None
        oldest = min(p.since_s for p in self._pending.values())
        return max(0.0, oldest + min(self.handoff_after_s, _DRAIN_S) - time.monotonic())

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                fd = self._io.accept(listener)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self._refuse_without_fds(listener)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                log.warning("accept failed: %s", exc)
                return
            if listener.family in (socket.AF_INET, socket.AF_INET6):
                self._io.set_nodelay(fd)
            self._pending[fd] = _Pending(time.monotonic())
            self._readable(fd)  # its request is usually there already: judged now, no trip through select

    def _watch(self, fd: int, pending: _Pending) -> None:
        """Wait in select for more from this connection (registering costs a GIL release: only when needed)."""
        if not pending.watched:
            pending.watched = True
            self._sel.register(fd, selectors.EVENT_READ, "client")

    def _readable(self, conn: int) -> None:
        pending = self._pending.get(conn)
        if pending is None:
            return
        if pending.draining:
            try:
                data = self._io.recv(conn, 65536)
            except (BlockingIOError, InterruptedError):
                self._watch(conn, pending)
                return
            except OSError:
                data = b""
            if not data:
                self._close(conn)
            return
        try:
            head = self._io.recv(conn, _PEEK_BYTES, peek=True)
        except (BlockingIOError, InterruptedError):
            self._watch(conn, pending)
            return
        except OSError:
            head = b""
        if not head:  # gone before a byte
            self._close(conn)
            return
        # A probe whose head has not all arrived goes to the loop (which serves the same routes): waiting for it
        # here would spin, as the peeked bytes keep the socket readable. Real probes send their head at once.
        path = probe_path(head)
        if isinstance(path, str) and self._answer_probe(conn, head, path):
            return
        if head.startswith(_SHEDDABLE) and self._shedding():
            # Every hold queue is full: the loop would answer 429 after parsing it; answer it here instead, at
            # no cost to the loop. `Connection: close` brings the client's retry back through this door.
            self.shed_429 += 1
            self._refuse(conn, _SHED)
            self._tell_refused(head, 429)
            return
        counted = False
        if head.startswith(_SHEDDABLE) and self.judge is not None:
            before = self.passes() if self.passes is not None else 0
            refusal = self._judge(head)
            counted = refusal is None and self.passes is not None and self.passes() != before
            if refusal is not None:
                # It could not start within its TTFT objective, or the hold queue is as long as it may be: 429 at
                # arrival, not after the loop's backlog.
                self.shed_429 += 1
                self._refuse(conn, _refusal(refusal))
                self._tell_refused(head, 429)
                return
        if self._over_cap():
            self.refused_over_cap += 1
            self._refuse(conn, _overloaded(f"the proxy is at its connection limit ({self._cap}); retry later"))
            self._tell_refused(head, 503)
            if counted:
                self._pass_done()
            return
        self._hand_over(conn, counted)

    def _tell_refused(self, head: bytes, status: int) -> None:
        if self.on_refused is not None:
            try:
                self.on_refused(head, status)
            except Exception:  # a log line is never worth the door
                log.exception("front door: recording a refusal failed")

    def _shedding(self) -> bool:
        if self.shed is None:
            return False
        try:
            return self.shed()
        except Exception:  # a dict resized by the loop while read: let the loop decide
            return False

    def _judge(self, head: bytes) -> DoorRefusal | None:
        try:
            return self.judge(head) if self.judge is not None else None
        except Exception:  # what the loop published was mid-update: let the loop decide
            return None

    def _over_cap(self) -> bool:
        now = time.monotonic()
        if now - self._cap_at_s > 1.0:
            # Never more clients than the descriptor limit leaves room for (each needs an upstream socket
            # too); re-read now and then: the limit can change under a running process (prlimit).
            self._cap = min(self.max_connections, default_max_connections(fd_soft_limit()))
            self._cap_at_s = now
        return self.open_connections() + self.in_handover >= self._cap

    def _answer_probe(self, conn: int, head: bytes, path: str) -> bool:
        try:
            answer = self.probe(path)
        except Exception:  # e.g. a dict resized by the loop while read: let the loop answer this one
            answer = None
        if answer is None:
            return False
        status, body = answer
        with contextlib.suppress(OSError):
            self._io.recv(conn, head.index(b"\r\n\r\n") + 4)  # consume the request we answer
        reason = "OK" if status == 200 else "Service Unavailable"
        extra = "Retry-After: 1\r\n" if status == 503 else ""
        self.probes_answered += 1
        if len(head) == head.index(b"\r\n\r\n") + 4:  # all it sent is consumed: close now, no reset
            with contextlib.suppress(OSError):
                self._io.send(conn, _response(status, reason, body, extra))
            self._close(conn)
            return True
        self._refuse(conn, _response(status, reason, body, extra))
        return True

    def _refuse(self, conn: int, data: bytes) -> None:
        """Send a whole (small) answer, half-close, and close once the request is read whole: closing with
        unread request bytes would reset the connection, and a reset can destroy the answer unread. A request
        not all there yet is drained until the client closes (or _DRAIN_S)."""
        try:
            self._io.send(conn, data)  # a few hundred bytes into an empty socket buffer: goes whole
            self._io.shutdown_write(conn)
            request = self._io.recv(conn, 65536)  # the request: usually all there, with its head
        except (BlockingIOError, InterruptedError):
            request = None
        except OSError:
            self._close(conn)
            return
        whole = whole_request_bytes(request) if request else None
        if request == b"" or (whole is not None and len(request or b"") >= whole) or self._draining >= _MAX_DRAINING:
            # Read whole, or the client closed, or no room to drain (each one holds a descriptor): what else is
            # there is read, then closed.
            with contextlib.suppress(OSError):
                while self._io.recv(conn, 65536):
                    pass
            self._close(conn)
            return
        self._drain(conn)

    def _drain(self, conn: int) -> None:
        pending = self._pending.get(conn)
        if pending is None:
            pending = self._pending[conn] = _Pending(time.monotonic())
        pending.since_s = time.monotonic()
        pending.draining = True
        self._draining += 1
        self._watch(conn, pending)

    def _refuse_without_fds(self, listener: socket.socket) -> None:
        if self._reserve_fd is None:
            return
        os.close(self._reserve_fd)
        self._reserve_fd = None
        try:
            conn, _ = listener.accept()
        except OSError:
            self._reserve()
            return
        self.refused_no_fds += 1
        answer = _overloaded("the proxy is out of file descriptors; retry later")
        with contextlib.suppress(OSError):
            conn.settimeout(0.05)  # a probe's head is normally there with the handshake; wait a moment at most
            head = conn.recv(_PEEK_BYTES, socket.MSG_PEEK)
            path = probe_path(head)
            if isinstance(path, str):  # probes still get their real answer
                found = self.probe(path)
                if found is not None:
                    status, body = found
                    conn.recv(head.index(b"\r\n\r\n") + 4)
                    self.probes_answered += 1
                    answer = _response(status, "OK" if status == 200 else "Service Unavailable", body,
                                       "" if status == 200 else "Retry-After: 1\r\n")
        with contextlib.suppress(OSError):
            conn.send(answer)
        conn.close()
        self._reserve()

    def _reserve(self) -> None:
        with contextlib.suppress(OSError):
            self._reserve_fd = os.open(os.devnull, os.O_RDONLY)

    def _expire(self) -> None:
        if not self._pending:
            return
        now = time.monotonic()
        for conn, p in list(self._pending.items()):
            if p.draining:
                if now - p.since_s >= _DRAIN_S:
                    self._close(conn)
            elif now - p.since_s >= self.handoff_after_s:
                if self._over_cap():
                    self._close(conn)  # silent and over the cap: nothing to answer
                else:
                    self._hand_over(conn)

    def _close(self, conn: int) -> None:
        p = self._pending.pop(conn, None)
        if p is None:
            return  # closed already: its number may belong to a new descriptor now, which must stay open
        if p.draining:
            self._draining -= 1
        if p.watched:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(conn)
        with contextlib.suppress(OSError):
            self._io.close(conn)

    def _pass_done(self) -> None:
        """A request the judge let through will not reach the loop's queue after all (refused at the connection
        cap, or the loop shutting down): it is no longer in transit."""
        if self.on_pass_read is not None:
            try:
                self.loop.call_soon_threadsafe(self.on_pass_read)
            except RuntimeError:  # the loop is closed
                pass

    def _hand_over(self, fd: int, counted: bool = False) -> None:
        p = self._pending.pop(fd, None)
        if p is not None and p.watched:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(fd)
        self.handed += 1
        conn = socket.socket(fileno=fd)  # the loop's transport takes a socket object (family and type read back)
        try:
            self.loop.call_soon_threadsafe(self._adopt, conn, counted)
        except RuntimeError:  # the loop is closed: shutting down
            self.adopted += 1
            conn.close()

    # --- on the loop ------------------------------------------------------------------------------------
    def _adopt(self, conn: socket.socket, counted: bool = False) -> None:
        made = False
        on_read = self.on_pass_read if counted else None

        def factory() -> asyncio.Protocol:
            # Counted as adopted the moment its protocol exists (aiohttp counts it from connection_made, just
            # after): counting it in neither is a moment's undercount, in both would refuse at the cap wrongly.
            nonlocal made
            made = True
            self.adopted += 1
            protocol = self.protocol_factory()
            if on_read is not None:
                if hasattr(protocol, "on_first_request"):
                    protocol.on_first_request = on_read  # told when its request is read (server/fastserver.py)
                else:
                    on_read()  # aiohttp's own protocol: no hook, so counted read now (an undercount, never stuck)
            return protocol

        task = self.loop.create_task(self.loop.connect_accepted_socket(factory, sock=conn))

        def done(t: asyncio.Task) -> None:
            if not made:
                self.adopted += 1
                if on_read is not None:
                    on_read()
            if t.cancelled() or t.exception() is not None:
                conn.close()

        task.add_done_callback(done)
