"""Stopping background tasks is bounded even when something inside swallows the cancellation (the cause of
`serve --workers` taking its whole 30 s drain to stop under load)."""

from __future__ import annotations

import asyncio
import time

from capbalancer.background import stop_requested, stop_task


async def _swallows_cancel(seen: list[bool]) -> None:
    while len(seen) < 2:  # the first cancellation is swallowed, the second ends it (so the test ends)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:  # what a library that wraps it in its own error does
            seen.append(stop_requested())


def test_stop_task_is_bounded_when_the_task_swallows_its_cancellation():
    async def main() -> tuple[float, list[bool], asyncio.Task[None]]:
        seen: list[bool] = []
        task = asyncio.get_running_loop().create_task(_swallows_cancel(seen), name="stubborn")
        await asyncio.sleep(0)
        t0 = time.monotonic()
        await stop_task(task, wait_s=0.2)
        elapsed = time.monotonic() - t0
        task.cancel()
        await asyncio.wait({task}, timeout=5)
        return elapsed, seen, task

    elapsed, seen, task = asyncio.run(main())
    assert task.done()
    assert elapsed < 1.0
    assert seen and seen[0] is True  # the loop could have told it was asked to stop


def test_stop_task_waits_for_a_task_that_cleans_up():
    async def main() -> list[str]:
        events: list[str] = []

        async def cleans_up() -> None:
            try:
                await asyncio.sleep(10)
            finally:
                await asyncio.sleep(0.05)
                events.append("cleaned")

        task = asyncio.get_running_loop().create_task(cleans_up())
        await asyncio.sleep(0)
        await stop_task(task)
        events.append("stopped")
        return events

    assert asyncio.run(main()) == ["cleaned", "stopped"]
