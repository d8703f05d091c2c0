"""One structured (JSON) access-log line per proxied request, on the `capbalancer.access` logger.

The handler fills a RequestRecord as it learns things (model, pool, backend, tokens); the observing
middleware (server/observe.py) emits the line when the response is done, streams included. Fields:

    ts, request_id, method, path, status, model, pool, backend, retries, held_ms, ttft_ms, duration_ms,
    tokens_in, tokens_out

`ttft_ms` is the time from the request's arrival to the first response byte sent to the client (for a
stream, the first token's event; for a non-streamed answer, the whole answer). `backend` is the last one
tried, `retries` how many attempts went to another backend before it. Unknown values are null.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

ACCESS_LOGGER = "capbalancer.access"
# A typed request key where aiohttp has them (3.12+: a plain string key warns), else the string.
RECORD_KEY: Any = (web.RequestKey("capbalancer_request_record", object) if hasattr(web, "RequestKey")
                   else "capbalancer.request_record")
# Probes and scrapes arrive every few seconds and say nothing about traffic: not logged.
UNLOGGED_PATHS = frozenset({"/health", "/ready", "/metrics"})

log = logging.getLogger(ACCESS_LOGGER)


@dataclass(slots=True)
class RequestRecord:
    started_s: float  # time.monotonic() at arrival
    method: str
    path: str
    request_id: str | None = None
    model: str | None = None
    pool: str | None = None
    backend: str | None = None
    retries: int = 0
    held_ms: float | None = None
    first_byte_s: float | None = None  # time.monotonic() when the response began
    tokens_in: int | None = None
    tokens_out: int | None = None
    status: int = 0

    def line(self, now_s: float, wall_s: float) -> dict[str, Any]:
        # Built by hand, not dataclasses.asdict (which deep-copies): this runs once per request.
        started, first = self.started_s, self.first_byte_s
        return {"ts": _iso(wall_s), "request_id": self.request_id, "method": self.method, "path": self.path,
                "status": self.status, "model": self.model, "pool": self.pool, "backend": self.backend,
                "retries": self.retries, "held_ms": None if self.held_ms is None else round(self.held_ms, 1),
                "ttft_ms": None if first is None else round((first - started) * 1000.0, 1),
                "duration_ms": round((now_s - started) * 1000.0, 1),
                "tokens_in": token_count(self.tokens_in), "tokens_out": token_count(self.tokens_out)}


def token_count(value: Any) -> int | None:
    """A token count as the engine reported it, if it is one (a broken engine's `usage` can hold anything)."""
    return value if type(value) is int and 0 <= value < 1 << 53 else None


_iso_second: list = [-1, ""]  # the last whole second formatted: strftime once a second, not once a line


def _iso(wall_s: float) -> str:
    second = int(wall_s)
    cached = _iso_second
    if cached[0] != second:
        cached[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        cached[0] = second
    return f"{cached[1]}.{int(wall_s % 1 * 1000):03d}Z"


def record_of(request: web.BaseRequest) -> RequestRecord | None:
    return request.get(RECORD_KEY)


def note(request: web.BaseRequest, **fields: Any) -> None:
    """Set fields of the request's record (no-op when the request is not observed)."""
    record = request.get(RECORD_KEY)
    if record is not None:
        for key, value in fields.items():
            setattr(record, key, value)


def emit(record: RequestRecord) -> None:
    writer = _direct_writer()
    if writer is not None:  # the usual case: bytes straight to the writer thread, no LogRecord (~20 us saved)
        writer.put(orjson.dumps(record.line(time.monotonic(), time.time()), option=orjson.OPT_APPEND_NEWLINE))
    elif log.isEnabledFor(logging.INFO):
        log.info(orjson.dumps(record.line(time.monotonic(), time.time())).decode())


def _direct_writer() -> LineWriter | None:
    """Our LineWriter when it is the access logger's only handler and nothing could filter or reformat a line
    (tests and embedders that add handlers or filters get the logging path, line for line the same JSON)."""
    handlers = log.handlers
    if len(handlers) == 1 and not log.filters and log.level <= logging.INFO and not log.disabled:
        h = handlers[0]
        if type(h) is LineWriter and not h.filters and h.level <= logging.INFO and log.manager.disable < logging.INFO:
            return h
    return None


class LineWriter(logging.Handler):
    """Hands each line to a writer thread, so a slow or full stdout (a pipe nobody reads, a stalled log
    shipper) never blocks the event loop. Past MAX_PENDING lines waiting, new lines are dropped and counted
    (`dropped`): losing log lines is better than stalling every request. The thread writes with os.write
    on its own copy of the descriptor, holding no Python lock, so a blocked write cannot hang the exit.

    Handing a line over is a deque append (atomic under the GIL) and, only when the thread sleeps, one wake:
    a lock and a condition per line cost the event loop more than the line itself (bench/results/dataplane.md).
    The thread then waits BATCH_WAIT_S for more lines, so a busy proxy wakes it (and hands it the GIL, which
    stalls the loop until the thread gets a core) at most 1/BATCH_WAIT_S times a second."""

    MAX_PENDING = 10_000
    BATCH_WAIT_S = 0.05

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = os.dup(fd)
        self.pending: collections.deque[bytes] = collections.deque()
        self._wake = threading.Event()
        self.queued = 0  # written by the putting thread only
        self.written = 0  # written by the writer thread only (lines handed to os.write or given up on)
        self.dropped = 0
        self._thread = threading.Thread(target=self._write_forever, name="access-log", daemon=True)
        self._thread.start()

    def put(self, line: bytes) -> None:
        """One whole line (ending in a newline)."""
        if len(self.pending) >= self.MAX_PENDING:
            self.dropped += 1
            return
        self.pending.append(line)
        self.queued += 1
        if not self._wake.is_set():
            self._wake.set()

    def emit(self, record: logging.LogRecord) -> None:
        self.put(self.format(record).encode() + b"\n")

    def flush(self, timeout_s: float = 2.0) -> None:
        """Wait (a little) for the lines already handed over: called at exit by logging.shutdown."""
        deadline = time.monotonic() + timeout_s
        while self.written < self.queued and time.monotonic() < deadline:
            time.sleep(0.01)

    def _write_forever(self) -> None:
        pending = self.pending
        while True:
            self._wake.wait()
            time.sleep(self.BATCH_WAIT_S)  # let a batch gather: one write and one wake for many lines
            self._wake.clear()
            while pending:
                lines = []
                while pending and len(lines) < 1024:
                    lines.append(pending.popleft())
                data = memoryview(b"".join(lines))
                try:
                    while data:
                        data = data[os.write(self.fd, data):]
                except OSError:  # the reader is gone (EPIPE): nothing more can be written
                    pass
                self.written += len(lines)


def install_handler(stream: Any = None) -> None:
    """Access lines go to stdout as bare JSON (one object a line), apart from the diagnostic log on stderr.
    `stream` (tests, benchmarks): a file object written directly instead."""
    if any(getattr(h, "_capbalancer_access", False) for h in log.handlers):
        return
    handler = LineWriter(sys.stdout.fileno()) if stream is None else logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._capbalancer_access = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def emit_refused_at_the_door(head: bytes, status: int) -> None:
    """The line of a request the front door refused before the event loop saw it (server/frontdoor.py): method,
    path and status from its first bytes; no request id, model or backend (its body was never read)."""
    method, _, rest = head.partition(b" ")
    target = rest.split(b" ", 1)[0].split(b"?", 1)[0]
    now = time.monotonic()
    record = RequestRecord(started_s=now, method=method[:16].decode("latin-1"),
                           path=target[:256].decode("latin-1"), status=status)
    emit(record)
