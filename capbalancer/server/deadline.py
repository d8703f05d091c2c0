"""An attempt's deadline (first byte, stream idle, total): asyncio.timeout_at's job, with a loop timer kept per
client connection instead of one made and cancelled per attempt, and re-arming that is usually an attribute store.

Why: `async with asyncio.timeout_at(...)` costs ~2.7 µs per attempt on the benchmark host (a Timeout object,
current_task(), a loop TimerHandle made and cancelled), and a stream re-arms it per chunk (the idle timeout): a
cancel and a new TimerHandle each time (bench/results/dataplane.md).

How: the deadline only ever needs the loop to wake it at or before the current due time. A timer already armed for
an earlier time is left alone when the deadline moves later (every stream chunk, and each new request on a kept-alive
connection: its first-byte deadline is later than the last one's); when it fires early it re-arms for the due time.
Only a deadline moved earlier (the first-token timer's "now") arms a new one. On a client connection of the fast
server (server/fastserver.py) the Deadline outlives its requests, so its timer is armed about once per first-byte
timeout per connection, not once per request; elsewhere (requests aiohttp serves) each attempt has its own, and
its timer is cancelled on exit, as asyncio.timeout's is.

Semantics as asyncio.timeout_at: when the due time passes the task is cancelled, and leaving the `with` block with
that CancelledError raises TimeoutError instead (unless the task was also cancelled from elsewhere, which wins).
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Deadline:
    """`with deadline.start(when): ...` (loop time; None: none yet); `reschedule(when)` inside the block."""

    __slots__ = ("loop", "persistent", "task", "when_s", "armed_s", "handle", "active", "expired", "cancelling")

    def __init__(self, loop: asyncio.AbstractEventLoop, persistent: bool = False) -> None:
        self.loop = loop
        self.persistent = persistent  # the timer outlives the block (a client connection's); close() ends it
        self.task: asyncio.Task | None = None
        self.when_s: float | None = None
        self.armed_s = 0.0  # the loop time the timer is armed for (meaningful while `handle` is set)
        self.handle: asyncio.Handle | None = None
        self.active = False  # inside a `with` block
        self.expired = False  # the due time passed and the task was cancelled for it
        self.cancelling = 0

    def start(self, when_s: float | None) -> Deadline:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Deadline should be used inside a task")
        if self.active:
            raise RuntimeError("Deadline is already in use")
        self.task = task
        self.cancelling = task.cancelling()
        self.active = True
        self.expired = False
        self.reschedule(when_s)
        return self

    def reschedule(self, when_s: float | None) -> None:
        """Move the due time (None: none). Only a due time earlier than the armed timer touches the loop."""
        self.when_s = when_s
        if when_s is None or self.expired:
            return
        handle = self.handle
        if handle is not None:
            if when_s >= self.armed_s:
                return  # the armed timer comes first; when it fires it re-arms for `when_s`
            handle.cancel()
        self._arm(when_s)

    def _arm(self, when_s: float) -> None:
        loop = self.loop
        self.armed_s = when_s
        if when_s <= loop.time():
            self.handle = loop.call_soon(self._fire)
        else:
            self.handle = loop.call_at(when_s, self._fire)

    def _fire(self) -> None:
        self.handle = None
        when_s = self.when_s
        if not self.active or self.expired or when_s is None:
            return  # between requests (a connection's timer) or no deadline now: re-armed by the next start
        if when_s > self.armed_s:
            self._arm(when_s)  # moved later since this timer was armed
            return
        self.expired = True
        self.task.cancel()  # type: ignore[union-attr]

    def __enter__(self) -> Deadline:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.active = False
        if not self.persistent and self.handle is not None:
            self.handle.cancel()
            self.handle = None
        task, self.task = self.task, None
        if self.expired:
            self.expired = False
            if task.uncancel() <= self.cancelling and exc_type is asyncio.CancelledError:  # type: ignore[union-attr]
                raise TimeoutError from exc

    def close(self) -> None:
        """The connection is gone: its timer goes (a block still running keeps its deadline until it re-arms)."""
        if self.handle is not None and not self.active:
            self.handle.cancel()
            self.handle = None
