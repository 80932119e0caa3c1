"""Deadlines on one timer (``sfbatch.deadlines``): a block past its deadline raises
``TimeoutError`` as under ``asyncio.timeout()``; one in time is left alone. On a virtual
clock, so the times asserted are exact up to the check's tick."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from sfbatch.deadlines import Deadlines
from sfbatch.testing.virtual_time import VirtualTimeLoop


def run(test: Callable[[], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        runner.run(test())  # type: ignore[arg-type]


def now() -> float:
    return asyncio.get_running_loop().time()


def test_a_block_past_its_deadline_raises_timeout_error_and_takes_its_cancel_back() -> None:
    async def test() -> None:
        deadlines, started = Deadlines(), now()
        with pytest.raises(TimeoutError), deadlines.within(2.0):
            await asyncio.sleep(60)
        assert 2.0 <= now() - started <= 2.0 + 0.1 + 1e-9  # a tick is a twentieth of 2 s
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        await asyncio.sleep(1)  # no cancel left pending on the task

    run(test)


def test_a_block_in_time_is_left_alone_and_the_timer_stops_when_none_is_set() -> None:
    async def test() -> None:
        deadlines = Deadlines()
        with deadlines.within(30.0):
            await asyncio.sleep(5)
        with deadlines.within(30.0):
            pass
        await asyncio.sleep(1)  # the next check finds nothing set and does not come again
        assert deadlines._timer is None and not deadlines._active

    run(test)


class Body:
    """A body being received: its byte count, as aiohttp's ``StreamReader`` shows it."""

    def __init__(self) -> None:
        self.total_bytes = 0


def test_the_idle_bound_waits_for_the_headers_then_for_the_body_to_grow() -> None:
    async def test() -> None:
        deadlines = Deadlines()
        started = now()
        with pytest.raises(TimeoutError), deadlines.within(10.0, idle_s=1.0):
            await asyncio.sleep(5)  # no headers: the idle bound fires first
        assert 1.0 <= now() - started <= 1.05 + 1e-9

        body, started = Body(), now()
        with pytest.raises(TimeoutError), deadlines.within(10.0, idle_s=1.0) as deadline:
            deadline.watch(body)
            while True:  # a slow body that keeps coming: the end fires, not the idle bound
                await asyncio.sleep(0.5)
                body.total_bytes += 100
        assert 10.0 <= now() - started <= 10.05 + 1e-9

        body, started = Body(), now()
        with pytest.raises(TimeoutError), deadlines.within(10.0, idle_s=1.0) as deadline:
            await asyncio.sleep(0.8)
            deadline.watch(body)  # the headers came: the bound counts from here
            for _ in range(4):
                await asyncio.sleep(0.5)
                body.total_bytes += 100
            await asyncio.sleep(60)  # then the body stalls
        assert 2.8 + 1.0 <= now() - started <= 2.8 + 1.0 + 1.05 + 1e-9

    run(test)


def test_a_cancel_from_outside_stays_a_cancel() -> None:
    async def test() -> None:
        deadlines = Deadlines()

        async def request() -> None:
            with deadlines.within(10.0):
                await asyncio.sleep(60)

        task = asyncio.create_task(request())
        await asyncio.sleep(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(test)


def test_the_shortest_deadline_sets_the_tick_and_a_new_loop_gets_its_own_timer() -> None:
    deadlines = Deadlines()

    async def test() -> None:
        with deadlines.within(600.0):  # ticks every 0.5 s
            started = now()
            with pytest.raises(TimeoutError), deadlines.within(0.2):  # every 0.01 s now
                await asyncio.sleep(60)
            assert 0.2 <= now() - started <= 0.21 + 1e-9

    run(test)
    assert deadlines._timer is not None  # left armed on the first loop, now closed
    run(test)  # the second loop gets a timer of its own
