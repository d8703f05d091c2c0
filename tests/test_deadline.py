"""server/deadline.py: an attempt's deadline behaves as asyncio.timeout_at, with a timer that outlives its blocks."""

from __future__ import annotations

import asyncio

import pytest

from capbalancer.server.deadline import Deadline


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("persistent", [False, True])
def test_a_block_past_its_due_time_raises_timeout_error(persistent: bool) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        d = Deadline(loop, persistent)
        with pytest.raises(TimeoutError):
            with d.start(loop.time() + 0.02):
                await asyncio.sleep(1)
        # Reusable, and a block that ends in time is left alone.
        with d.start(loop.time() + 0.5):
            await asyncio.sleep(0.01)
        assert not d.expired and not d.active

    run(main())


@pytest.mark.parametrize("persistent", [False, True])
def test_rescheduling_later_or_earlier_or_to_none(persistent: bool) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        d = Deadline(loop, persistent)
        started = loop.time()
        with pytest.raises(TimeoutError):
            with d.start(started + 0.02) as timer:
                timer.reschedule(started + 0.15)  # later: the early timer re-arms for it
                await asyncio.sleep(1)
        assert loop.time() - started >= 0.14
        started = loop.time()
        with pytest.raises(TimeoutError):
            with d.start(started + 5) as timer:
                timer.reschedule(loop.time())  # now: due at once (the first-token timer's use)
                await asyncio.sleep(1)
        assert loop.time() - started < 0.5
        with d.start(loop.time() + 0.02) as timer:
            timer.reschedule(None)  # none: the block runs on
            await asyncio.sleep(0.05)

    run(main())


def test_a_connection_deadline_keeps_its_timer_across_blocks_and_arms_again_after_it_fired() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        d = Deadline(loop, persistent=True)
        with d.start(loop.time() + 0.05):
            pass
        first = d.handle
        assert first is not None
        with d.start(loop.time() + 0.06):  # later than the armed timer: no new one
            assert d.handle is first
        await asyncio.sleep(0.1)  # it fires between blocks and drops itself
        assert d.handle is None
        with pytest.raises(TimeoutError):
            with d.start(loop.time() + 0.02):
                await asyncio.sleep(1)
        d.close()
        assert d.handle is None

    run(main())


def test_a_cancellation_from_elsewhere_wins_over_the_deadline() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        d = Deadline(loop)

        async def body() -> None:
            with d.start(loop.time() + 0.01):
                await asyncio.sleep(1)

        task = asyncio.create_task(body())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
