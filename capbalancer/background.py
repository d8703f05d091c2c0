"""Stopping a background task (a poller, a timer, the sharing loop) within a bounded time.

`task.cancel(); await task` waits forever if something inside the task swallows the CancelledError: a
library that turns it into its own error (seen with the redis client under load: the sharing loop then
took its next sleep and `serve --workers` took the whole 30 s drain to stop). So the wait is bounded, and
loops that call such libraries also check `stop_requested()` before sleeping again.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("capbalancer.background")

STOP_WAIT_S = 2.0  # a task that ignores its cancellation this long is left behind (and logged)


async def stop_task(task: asyncio.Task[None] | None, wait_s: float = STOP_WAIT_S) -> None:
    """Cancel `task` and wait for it at most `wait_s`; never raises the task's own error."""
    if task is None or task.done():
        return
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=wait_s)
    if not done:
        log.warning("background task %s did not stop within %.1fs of its cancellation: left behind",
                    task.get_name(), wait_s)
        return
    if not task.cancelled() and task.exception() is not None:
        log.warning("background task %s ended with %r", task.get_name(), task.exception())


def stop_requested() -> bool:
    """Whether the running task has been asked to stop, even if a library swallowed the CancelledError."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
