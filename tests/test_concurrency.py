"""ConcurrencyWindow: sizing from rate and latency, AIMD without a rate, the slot semaphore.

The end-to-end scenarios run in test_limiter's virtual-time loop: minutes of simulated
generation latency take milliseconds and nothing depends on the machine's load.
"""

from __future__ import annotations

import asyncio
import doctest
import random
from collections import deque

import pytest
from test_limiter import now, virtual_time

import sfbatch.concurrency
from sfbatch.concurrency import ConcurrencyWindow, little_size
from sfbatch.errors import ConfigError
from sfbatch.limiter import RateLimiter


def test_invalid_configuration() -> None:
    for kwargs in ({"fixed": 0}, {"max_size": 0}, {"fixed": True}, {"margin": -1.0}):
        with pytest.raises(ConfigError):
            ConcurrencyWindow(**kwargs)  # type: ignore[arg-type]


async def test_sized_from_the_rate_and_a_high_percentile_of_latency() -> None:
    window = ConcurrencyWindow(max_size=256)
    window.set_target_rate(300)
    # before answers: a 30 s prior, so the first minute is not starved
    assert window.size == little_size(300, 30.0, 0.25) == 189
    for _ in range(64):
        await window.acquire()
    # the first answers are the fast ones: they do not shrink the window
    for latency in (5.0, 6.0, 5.5, 7.0, 6.5, 5.0, 6.0):
        window.release(latency_s=latency)
    assert window.size == 189
    for latency in [10.0] * 51 + [15.0] * 6:  # p90 of the last 64: 10 s
        window.release(latency_s=latency)
    assert window.latency_s() == 10.0
    assert window.size == little_size(300, 10.0, 0.25) == 64
    stats = window.statistics()
    assert (stats.mode, stats.size, stats.fills_at, stats.in_flight) == ("auto", 64, 64, 0)
    window.set_target_rate(60)  # the limiter learned a lower rate
    assert window.size == little_size(60, 10.0, 0.25) == 14


async def test_clamped_to_max_size_with_a_hint() -> None:
    window = ConcurrencyWindow(max_size=16)
    window.set_target_rate(600)
    assert window.size == 16
    for _ in range(8):
        await window.acquire()
        window.release(latency_s=20.0)
    assert window.size == 16
    assert window.hint() == (
        "max-concurrency 16 holds the rate below the limit; about 251 would fill it"
    )
    assert window.hint() is None  # once


async def test_fixed_window_says_once_when_it_is_the_bottleneck() -> None:
    window = ConcurrencyWindow(fixed=4)
    window.set_target_rate(300)
    for _ in range(8):
        await window.acquire()
        window.release(latency_s=10.0)
    assert window.size == 4  # fixed: never resized
    # while the rate aimed for is a probe's try, not a limit, the hint waits
    assert window.hint(limit_known=lambda: False) is None
    assert window.hint() == ("concurrency 4 holds the rate below the limit; about 64 would fill it")
    assert window.hint() is None

    enough = ConcurrencyWindow(fixed=64)
    enough.set_target_rate(300)
    for _ in range(8):
        await enough.acquire()
        enough.release(latency_s=10.0)
    assert enough.hint() is None


async def test_without_a_rate_grows_while_answers_come_back_and_halves_on_429() -> None:
    clock = [0.0]
    window = ConcurrencyWindow(initial=2, clock=lambda: clock[0])

    async def round_trip(latency_s: float) -> None:
        """One round: every slot used, every answer back."""
        size = window.size
        for _ in range(size):
            await window.acquire()
        for _ in range(size):
            window.release(latency_s=latency_s)

    sizes = [window.size]
    for _ in range(4):
        await round_trip(1.0)
        sizes.append(window.size)
    assert sizes == [2, 4, 8, 16, 32]  # slow start: doubles per round trip

    for _ in range(3):  # three 429s of requests in flight together: one halving
        await window.acquire()
    for _ in range(3):
        window.release(outcome="rate_limited")
    assert window.size == 16
    clock[0] += 1.5  # a latency later, a new 429 halves again
    await window.acquire()
    window.release(outcome="rate_limited")
    assert window.size == 8

    await round_trip(1.0)  # after a 429: +1 per window's worth of answers
    assert window.size == 9
    await round_trip(1.0)
    assert window.size == 10


async def test_without_a_rate_stops_growing_when_latency_does_not_hold() -> None:
    window = ConcurrencyWindow(initial=8)
    for _ in range(8):
        await window.acquire()
    for _ in range(8):
        window.release(latency_s=1.0)
    assert window.size == 16
    for _ in range(16):
        await window.acquire()
    for _ in range(16):
        window.release(latency_s=5.0)  # the server queues: more in flight is no use
    grown = window.size
    assert grown < 32
    for _ in range(grown):
        await window.acquire()
    for _ in range(grown):
        window.release(latency_s=5.0)
    assert window.size == grown


async def test_slots_are_fifo_and_a_cancelled_waiter_takes_none() -> None:
    window = ConcurrencyWindow(fixed=2)
    await window.acquire()
    await window.acquire()
    order: list[int] = []

    async def waiter(index: int) -> None:
        await window.acquire()
        order.append(index)

    tasks = [asyncio.create_task(waiter(i)) for i in range(4)]
    await asyncio.sleep(0)
    assert window.statistics().waiting == 4
    tasks[1].cancel()
    await asyncio.sleep(0)
    window.release()
    window.release()
    await asyncio.sleep(0)
    assert order == [0, 2]
    window.release()
    await asyncio.sleep(0)
    assert order == [0, 2, 3]
    assert window.statistics().in_flight == 2
    await asyncio.gather(*tasks, return_exceptions=True)
    with pytest.raises(RuntimeError):
        ConcurrencyWindow().release()


async def test_a_shrunk_window_admits_nobody_until_enough_have_left() -> None:
    window = ConcurrencyWindow(max_size=256)
    window.set_target_rate(120)
    for _ in range(40):
        await window.acquire()
    for _ in range(8):
        window.release(latency_s=1.0)
    assert window.size == little_size(120, 1.0, 0.25) == 4
    blocked = asyncio.create_task(window.acquire())
    await asyncio.sleep(0)
    assert not blocked.done()
    for _ in range(29):  # 32 in flight -> 3
        window.release(latency_s=1.0)
    await asyncio.sleep(0)
    assert blocked.done()
    assert window.statistics().in_flight == 4


class LatencyServer:
    """A server taking ``ipm`` requests per sliding minute, each answered after a latency."""

    def __init__(self, ipm: int, latency_s: float, jitter_s: float) -> None:
        self.ipm = ipm
        self._rng = random.Random(5)
        self._latency_s = latency_s
        self._jitter_s = jitter_s
        self._window: deque[float] = deque()
        self.answered: list[float] = []
        self.refused = 0

    async def request(self) -> float | None:
        """The latency, or None for a 429."""
        at = now()
        while self._window and self._window[0] <= at - 60:
            self._window.popleft()
        if len(self._window) >= self.ipm:
            self.refused += 1
            return None
        self._window.append(at)
        latency = self._latency_s + self._rng.uniform(-self._jitter_s, self._jitter_s)
        await asyncio.sleep(latency)
        self.answered.append(at)
        return latency


async def run_pool(
    window: ConcurrencyWindow, limiter: RateLimiter, server: LatencyServer, items: int
) -> None:
    """The wiring the pipeline will use: max_size workers, each gated by the window."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for item in range(items):
        queue.put_nowait(item)

    async def worker() -> None:
        while not queue.empty():
            await window.acquire()
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                window.release(outcome="error")
                return
            while True:
                ticket = await limiter.acquire()
                latency = await server.request()
                if latency is not None:
                    limiter.on_success(ticket=ticket)
                    window.release(latency_s=latency)
                    break
                limiter.on_rate_limited(None, limit="IPM", ticket=ticket)
                window.release(outcome="rate_limited")
                await window.acquire()
            rate = limiter.statistics()["effective_ipm"]
            assert rate is None or isinstance(rate, float)
            window.set_target_rate(rate)
            del item

    window.set_target_rate(limiter.statistics()["effective_ipm"])  # type: ignore[arg-type]
    async with asyncio.TaskGroup() as group:
        for _ in range(window.max_size):
            group.create_task(worker())


def answered_per_minute(server: LatencyServer, start: float, end: float) -> float:
    inside = [at for at in server.answered if start <= at < end]
    return len(inside) * 60.0 / (end - start)


@pytest.mark.parametrize(("fixed", "share"), [(None, 0.95), (4, 0.08), (64, 0.95)])
def test_quota_fill_at_latency_10_5_s(fixed: int | None, share: float) -> None:
    """Issue 12: IPM 300, latency 10 ± 5 s: auto fills ≥ 95 % after the first latency."""

    @virtual_time
    async def scenario() -> None:
        server = LatencyServer(ipm=300, latency_s=10.0, jitter_s=5.0)
        limiter = RateLimiter(rpm=None, ipm=300)
        window = ConcurrencyWindow(fixed=fixed, max_size=256)
        start = now()
        await run_pool(window, limiter, server, items=600)
        sent = server.answered
        rate = answered_per_minute(server, start + 15.0, sent[-1])
        if share > 0.5:
            assert rate >= share * 300
        else:
            assert rate <= share * 300 * 1.5
            assert window.hint() is not None
        assert server.refused == 0

    scenario()


def test_docstring_examples() -> None:
    assert doctest.testmod(sfbatch.concurrency).failed == 0
