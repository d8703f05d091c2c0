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

import logging
import os
import queue
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


def _iso(wall_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall_s)) + f".{int(wall_s % 1 * 1000):03d}Z"


def record_of(request: web.BaseRequest) -> RequestRecord | None:
    return request.get(RECORD_KEY)


def note(request: web.BaseRequest, **fields: Any) -> None:
    """Set fields of the request's record (no-op when the request is not observed)."""
    record = request.get(RECORD_KEY)
    if record is not None:
        for key, value in fields.items():
            setattr(record, key, value)


def emit(record: RequestRecord) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info(orjson.dumps(record.line(time.monotonic(), time.time())).decode())


class LineWriter(logging.Handler):
    """Hands each line to a writer thread, so a slow or full stdout (a pipe nobody reads, a stalled log
    shipper) never blocks the event loop. Past MAX_PENDING lines waiting, new lines are dropped and counted
    (`dropped`): losing log lines is better than stalling every request. The thread writes with os.write
    on its own copy of the descriptor, holding no Python lock, so a blocked write cannot hang the exit."""

    MAX_PENDING = 10_000

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = os.dup(fd)
        self.pending: queue.Queue[bytes] = queue.Queue(self.MAX_PENDING)
        self.dropped = 0
        self._thread = threading.Thread(target=self._write_forever, name="access-log", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.pending.put_nowait(self.format(record).encode() + b"\n")
        except queue.Full:
            self.dropped += 1

    def flush(self, timeout_s: float = 2.0) -> None:
        """Wait (a little) for the lines already handed over: called at exit by logging.shutdown."""
        deadline = time.monotonic() + timeout_s
        while self.pending.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _write_forever(self) -> None:
        while True:
            lines = [self.pending.get()]
            while len(lines) < 256:
                try:
                    lines.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            data = memoryview(b"".join(lines))
            try:
                while data:
                    data = data[os.write(self.fd, data):]
            except OSError:  # the reader is gone (EPIPE): nothing more can be written
                pass
            for _ in lines:
                self.pending.task_done()


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
