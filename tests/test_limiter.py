"""RateLimiter tests, in virtual time.

Most tests run in :class:`VirtualTimeLoop`, an event loop whose clock jumps straight to
the next timer whenever every task is waiting: ten simulated minutes take milliseconds,
and nothing depends on how loaded the machine is. Like aiolimiter's own tests it fakes
``loop.time()``; here the selector advances it, so ``asyncio.sleep`` and aiolimiter's
timers follow the same clock.
"""

from __future__ import annotations

import asyncio
import doctest
import itertools
import math
import random
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import pytest
from aiolimiter import AsyncLimiter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sfbatch.emulator.limits as emulator_limits
import sfbatch.limiter
from sfbatch.client import SiliconFlowClient
from sfbatch.emulator import Emulator, EmulatorConfig
from sfbatch.errors import ConfigError, RateLimitError
from sfbatch.limiter import RateLimiter
from sfbatch.testing.virtual_time import VirtualTimeLoop

SAFETY = 0.995
CREDIT = 0.05  # how far below empty a bucket drains, in requests' worth


class LateTimerLoop(VirtualTimeLoop):
    """A :class:`VirtualTimeLoop` whose timers fire late, like a real loop's.

    Every wake-up is ``late_s`` late, or with ``jitter`` a random 0 to ``late_s`` late.
    """

    def __init__(self, late_s: float = 0.001, *, jitter: bool = False) -> None:
        super().__init__()
        self.late_s = late_s
        self._jitter = random.Random(7) if jitter else None

    def advance(self, seconds: float) -> None:
        if seconds > 0:
            late_s = self.late_s if self._jitter is None else self._jitter.uniform(0, self.late_s)
            seconds += late_s
        super().advance(seconds)


def virtual_time(
    test: Callable[[], Coroutine[Any, Any, None]],
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = VirtualTimeLoop,
) -> Callable[[], None]:
    """Run an ``async def`` test in a fresh :class:`VirtualTimeLoop` (or ``loop_factory``)."""

    def run() -> None:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(test())

    run.__name__ = test.__name__
    run.__doc__ = test.__doc__
    return run


def now() -> float:
    return asyncio.get_running_loop().time()


Admission = tuple[float, int]


async def run_workers(
    limiter: RateLimiter,
    *,
    workers: int,
    duration_s: float,
    batch_sizes: Sequence[int] = (1,),
    latency_s: float = 0.0,
) -> list[Admission]:
    """Workers acquire in a loop until ``duration_s`` has passed; returns (time, images)."""
    admissions: list[Admission] = []
    end = now() + duration_s

    async def worker(index: int) -> None:
        turn = index
        while True:
            images = batch_sizes[turn % len(batch_sizes)]
            turn += 1
            await limiter.acquire(images)
            if now() > end:
                return
            admissions.append((now(), images))
            limiter.on_success()
            if latency_s:
                await asyncio.sleep(latency_s)

    async with asyncio.TaskGroup() as group:
        for index in range(workers):
            group.create_task(worker(index))
    return sorted(admissions)


def most_in_window(admissions: Sequence[Admission], window_s: float) -> tuple[int, int]:
    """The most requests and the most images admitted in any closed window of ``window_s``."""
    most_requests = most_images = 0
    inside: deque[Admission] = deque()
    images = 0
    for at, amount in admissions:
        inside.append((at, amount))
        images += amount
        while inside[0][0] < at - window_s:
            images -= inside.popleft()[1]
        most_requests = max(most_requests, len(inside))
        most_images = max(most_images, images)
    return most_requests, most_images


# --- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rpm": 0, "ipm": None},
        {"rpm": -1, "ipm": None},
        {"rpm": math.nan, "ipm": None},
        {"rpm": math.inf, "ipm": None},
        {"rpm": True, "ipm": None},
        {"rpm": None, "ipm": "10"},
        {"rpm": None, "ipm": None, "max_batch_size": 0},
        {"rpm": None, "ipm": None, "max_batch_size": 2.0},
        {"rpm": None, "ipm": None, "safety": 0},
        {"rpm": None, "ipm": None, "safety": 1.5},
    ],
)
def test_invalid_configuration_is_a_config_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        RateLimiter(**kwargs)


def test_created_outside_a_loop() -> None:
    limiter = RateLimiter(rpm=60, ipm=120, max_batch_size=4)
    stats = limiter.statistics()
    assert stats["acquires"] == 0
    assert stats["cooldown_active"] is False


def test_batch_larger_than_ipm_is_a_config_error() -> None:
    limiter = RateLimiter(rpm=None, ipm=2, max_batch_size=4)
    limiter.check_batch_size(1)
    limiter.check_batch_size(2)
    with pytest.raises(ConfigError) as caught:
        limiter.check_batch_size(4)
    assert str(caught.value).startswith(
        "batch_size 4 can never fit an images-per-minute limit of 2: "
    )


def test_batch_larger_than_max_batch_size_is_a_config_error() -> None:
    limiter = RateLimiter(rpm=60, ipm=None, max_batch_size=2)
    with pytest.raises(ConfigError, match="larger than max_batch_size 2"):
        limiter.check_batch_size(3)


@pytest.mark.parametrize("bad", [0, -1, 1.0, True, None])
def test_batch_size_must_be_a_positive_whole_number(bad: Any) -> None:
    with pytest.raises(ConfigError):
        RateLimiter(rpm=None, ipm=None, max_batch_size=4).check_batch_size(bad)


@virtual_time
async def test_acquire_that_can_never_fit_raises_at_once() -> None:
    limiter = RateLimiter(rpm=None, ipm=2, max_batch_size=4)
    started = now()
    with pytest.raises(ConfigError, match="can never fit"):
        await limiter.acquire(4)
    with pytest.raises(ConfigError, match="max_batch_size"):
        await RateLimiter(rpm=None, ipm=None, max_batch_size=1).acquire(2)
    assert now() == pytest.approx(started)
    assert limiter.statistics()["waiting"] == 0


async def test_unlimited_acquire_does_not_wait_in_a_real_loop() -> None:
    limiter = RateLimiter(rpm=None, ipm=None, max_batch_size=4)
    for _ in range(200):
        await asyncio.wait_for(limiter.acquire(4), timeout=5)
    stats = limiter.statistics()
    assert stats["acquires"] == 200
    assert stats["images"] == 800


# --- pacing: no burst, never over the limit ------------------------------------------


@virtual_time
async def test_no_start_up_burst_for_requests() -> None:
    limiter = RateLimiter(rpm=600, ipm=None)
    start = now()
    admissions = await run_workers(limiter, workers=16, duration_s=1.0)
    # AsyncLimiter(600, 60) would let 600 through in this second
    assert len(admissions) <= 600 / 60 + 1
    assert admissions[0][0] == pytest.approx(start)


@virtual_time
async def test_no_start_up_burst_for_images() -> None:
    limiter = RateLimiter(rpm=None, ipm=120, max_batch_size=4)
    admissions = await run_workers(limiter, workers=8, duration_s=1.0, batch_sizes=[4])
    assert sum(images for _, images in admissions) <= 120 / 60 * 1 + 4


@virtual_time
async def test_requests_stay_within_rpm_over_1s_and_60s_windows() -> None:
    rpm = 30
    limiter = RateLimiter(rpm=rpm, ipm=None)
    admissions = await run_workers(limiter, workers=6, duration_s=600.0)
    assert most_in_window(admissions, 1.0)[0] <= rpm / 60 * 1.0 + 1
    assert most_in_window(admissions, 60.0)[0] <= rpm
    # ...with the 0.3 s jitter margin
    assert most_in_window(admissions, 60.0 / SAFETY - 1e-6)[0] <= rpm
    # and not needlessly slow: within the safety margin of the limit
    assert len(admissions) >= rpm * SAFETY * 10 - 1


@virtual_time
async def test_large_batches_stay_within_ipm_over_every_minute() -> None:
    # a bucket of 4 images alone would admit 4 at 0 s, 24 s and 48 s: 12 in one minute
    ipm = 10
    limiter = RateLimiter(rpm=None, ipm=ipm, max_batch_size=4)
    admissions = await run_workers(limiter, workers=3, duration_s=600.0, batch_sizes=[4])
    assert most_in_window(admissions, 60.0 / SAFETY - 1e-6)[1] <= ipm
    assert most_in_window(admissions, 1.0)[1] <= ipm / 60 + 4
    # two 4-image requests per minute is the most any schedule can do under "10 per minute"
    assert sum(images for _, images in admissions) >= 8 * 10 - 4


@virtual_time
async def test_images_are_weighted_by_batch_size() -> None:
    limiter = RateLimiter(rpm=None, ipm=60, max_batch_size=4)
    start = now()
    times = []
    for images in (4, 1, 4, 2):
        await limiter.acquire(images)
        times.append(now() - start)
    # 60 images a minute at 99.5 %: one image drains every 1/0.995 s; the bucket holds 4
    unit = 1 / SAFETY
    assert times == pytest.approx([0.0, 1 * unit, 5 * unit, 7 * unit], abs=1e-6)


@virtual_time
async def test_rpm_and_ipm_together() -> None:
    limiter = RateLimiter(rpm=20, ipm=40, max_batch_size=4)
    admissions = await run_workers(
        limiter, workers=4, duration_s=600.0, batch_sizes=[1, 4, 2, 4, 1, 1]
    )
    requests, images = most_in_window(admissions, 60.0 / SAFETY - 1e-6)
    assert requests <= 20
    assert images <= 40
    one_s_requests, one_s_images = most_in_window(admissions, 1.0)
    assert one_s_requests <= 20 / 60 + 1
    assert one_s_images <= 40 / 60 + 4


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    rpm=st.none() | st.integers(min_value=1, max_value=120),
    ipm=st.none() | st.integers(min_value=4, max_value=200),
    batch_sizes=st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=6),
    workers=st.integers(min_value=1, max_value=6),
    latency_s=st.sampled_from([0.0, 0.5, 7.0]),
)
def test_never_over_any_limit(
    rpm: int | None,
    ipm: int | None,
    batch_sizes: list[int],
    workers: int,
    latency_s: float,
) -> None:
    if rpm is None and ipm is None:
        rpm = 60

    @virtual_time
    async def scenario() -> None:
        limiter = RateLimiter(rpm=rpm, ipm=ipm, max_batch_size=4)
        admissions = await run_workers(
            limiter,
            workers=workers,
            duration_s=300.0,
            batch_sizes=batch_sizes,
            latency_s=latency_s,
        )
        minute = most_in_window(admissions, 60.0 / SAFETY - 1e-6)
        second = most_in_window(admissions, 1.0)
        if rpm is not None:
            assert minute[0] <= rpm
            assert second[0] <= rpm / 60 + 1
        if ipm is not None:
            assert minute[1] <= ipm
            assert second[1] <= ipm / 60 + 4

    scenario()


@pytest.mark.parametrize(
    "loop_factory",
    [VirtualTimeLoop, LateTimerLoop, lambda: LateTimerLoop(0.05, jitter=True)],
    ids=["punctual", "1ms-late", "0-50ms-late"],
)
def test_ceiling_backstop_has_capacity_whenever_the_gates_open(
    monkeypatch: pytest.MonkeyPatch, loop_factory: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    """The adaptive buckets never run faster than aiolimiter's ceiling: it never waits.

    Not even with timers firing late by varying amounts: the buckets' credit then lets
    them drain below empty and two requests go out closer than the paced interval, but the
    ceiling holds that credit too, and drains at the configured rate, faster.
    """
    short: list[float] = []

    class CountingLimiter(AsyncLimiter):
        async def acquire(self, amount: float = 1) -> None:
            if not self.has_capacity(amount):
                short.append(amount)
            await super().acquire(amount)

    monkeypatch.setattr(sfbatch.limiter, "AsyncLimiter", CountingLimiter)

    async def scenario() -> None:
        limiter = RateLimiter(rpm=45, ipm=100, max_batch_size=4)
        await run_workers(limiter, workers=5, duration_s=300.0, batch_sizes=[1, 4, 3])
        limiter.on_rate_limited(None)
        await run_workers(limiter, workers=5, duration_s=120.0, batch_sizes=[2, 4])
        acquires = limiter.statistics()["acquires"]
        assert isinstance(acquires, int) and acquires > 100

    virtual_time(scenario, loop_factory=loop_factory)()
    assert short == []


def test_late_timers_do_not_lower_the_rate() -> None:
    """Every wake-up 1 ms late (a real loop's ~0.9 ms per 100 ms): still 99.5 % of rpm.

    Without the credit each late wake-up was lost for good: 100.5 + 1 ms between requests,
    98.5 % of the limit.
    """

    async def scenario() -> None:
        rpm = 600
        limiter = RateLimiter(rpm=rpm, ipm=None)
        admissions = await run_workers(limiter, workers=4, duration_s=600.0)
        assert len(admissions) >= 0.994 * rpm * 10
        assert most_in_window(admissions, 60.0)[0] <= rpm
        assert most_in_window(admissions, 60.0 / SAFETY - 1e-6)[0] <= rpm
        assert most_in_window(admissions, 1.0)[0] <= rpm / 60 + 1
        # the credit makes up each 1 ms, no more: no two requests closer than the paced
        # interval. (Once a minute the minute log, which counts the actual, late times,
        # opens together with the bucket: that wake-up's 1 ms is lost, 0.002 %.)
        paced = 60 / (rpm * SAFETY)
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(admissions)]
        assert min(gaps) >= paced - 1e-6
        assert sum(gap > paced + 1e-6 for gap in gaps) <= 11

    virtual_time(scenario, loop_factory=LateTimerLoop)()


def test_credit_for_a_late_timer_is_at_most_five_percent_of_one_request() -> None:
    async def scenario() -> None:
        limiter = RateLimiter(rpm=60, ipm=None)
        admissions = await run_workers(limiter, workers=3, duration_s=60.0)
        interval = 1 / SAFETY
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(admissions)]
        # each timer fires 0.2 s late; only 5 % of an interval of that is made up (from the
        # second wake-up on: the first has no earlier admission to make up for)
        assert gaps[0] == pytest.approx(interval + 0.2)
        assert gaps[1:] == pytest.approx([interval + 0.2 - CREDIT * interval] * (len(gaps) - 1))

    virtual_time(scenario, loop_factory=lambda: LateTimerLoop(late_s=0.2))()


@virtual_time
async def test_idle_time_and_other_gates_earn_no_credit() -> None:
    limiter = RateLimiter(rpm=60, ipm=None)
    interval = 1 / SAFETY
    await limiter.acquire()
    await asyncio.sleep(30.0)  # idle: nothing to make up
    start = now()
    for _ in range(3):
        await limiter.acquire()
    assert now() - start == pytest.approx(2 * interval, abs=1e-6)

    # ipm=10 with 4-image batches: the bucket (4 images, 9.95 a minute) lets 4, 4, 1 go at
    # 0 s, 24.1 s and 30.2 s; the next 4 wait for the minute log until 60.3 s, long after
    # the bucket emptied. That wait is no late timer: the 1 after it still waits a whole
    # image's 6.03 s (with the idle time as credit it would go after 4.8 s).
    limiter = RateLimiter(rpm=None, ipm=10, max_batch_size=4)
    start = now()
    for images in (4, 4, 1, 4):
        await limiter.acquire(images)
    assert now() - start == pytest.approx(60 / SAFETY, abs=1e-6)
    await limiter.acquire(1)
    assert now() - start == pytest.approx(60 / SAFETY + 60 / (10 * SAFETY), abs=1e-6)


# --- 429: shared cooldown, AIMD ----------------------------------------------------------


@virtual_time
async def test_429_pauses_every_waiter_for_retry_after() -> None:
    limiter = RateLimiter(rpm=60, ipm=None)
    start = now()
    admitted: list[float] = []

    async def worker() -> None:
        await limiter.acquire()
        admitted.append(now() - start)

    async with asyncio.TaskGroup() as group:
        for _ in range(4):
            group.create_task(worker())
        await asyncio.sleep(0.5)
        assert admitted == [pytest.approx(0.0)]
        limiter.on_rate_limited(retry_after_s=10.0)
        assert limiter.statistics()["cooldown_active"] is True
    assert all(at >= 10.5 for at in admitted[1:])
    # after the cooldown the waiters go one at a time at the lowered rate, not all at once
    rate = limiter.statistics()["effective_rpm"]
    assert isinstance(rate, float)
    gaps = [b - a for a, b in itertools.pairwise(admitted[1:])]
    assert all(gap >= 60 / rate - 1e-6 for gap in gaps)


@virtual_time
async def test_cooldown_without_retry_after_grows_then_caps() -> None:
    limiter = RateLimiter(rpm=None, ipm=None)
    pauses = []
    for _ in range(8):
        await limiter.acquire()  # each 429 follows a fresh request: a new event
        limiter.on_rate_limited(None)
        remaining = limiter.statistics()["cooldown_remaining_s"]
        assert isinstance(remaining, float)
        pauses.append(round(remaining, 6))
    assert pauses == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0, 8.0]
    limiter.on_success()
    await limiter.acquire()
    limiter.on_rate_limited(None)
    assert limiter.statistics()["cooldown_remaining_s"] == pytest.approx(1.0)


@virtual_time
async def test_429s_in_flight_together_count_once() -> None:
    limiter = RateLimiter(rpm=60, ipm=None)
    for _ in range(4):
        await limiter.acquire()
    for _ in range(4):  # four requests sent before the first 429 all come back 429
        limiter.on_rate_limited(None)
    stats = limiter.statistics()
    assert stats["rate_limited"] == 4
    assert stats["rate_decreases"] == 1
    assert stats["consecutive_rate_limited"] == 1
    assert stats["cooldown_remaining_s"] == pytest.approx(1.0)


@virtual_time
async def test_a_429_learns_what_the_server_held_in_its_minute() -> None:
    limiter = RateLimiter(rpm=None, ipm=None, max_batch_size=2)
    assert limiter.statistics()["effective_ipm"] is None
    # 40 requests of 2 images in 10 s: the server takes 30 of them (60 images), refuses the rest
    tickets = []
    for _ in range(40):
        tickets.append(await limiter.acquire(2))
        await asyncio.sleep(0.25)
    for ticket in tickets[30:]:
        limiter.on_rate_limited(None, limit="IPM", ticket=ticket)
    stats = limiter.statistics()
    assert stats["learned_ipm"] == 60
    assert stats["effective_ipm"] == pytest.approx(2 * 60 * SAFETY)  # the log keeps 60
    assert stats["learned_rpm"] is None and stats["effective_rpm"] is None  # IPM was named
    assert stats["rate_decreases"] == 1
    # the refused ones do not count: the minute's 60 images age out 60.3 s after they went
    start = now()
    await limiter.acquire(2)
    assert now() - tickets[0].at == pytest.approx(60 / SAFETY, abs=1e-6)
    assert now() - start < 52


@virtual_time
async def test_an_unnamed_429_learns_both_limits() -> None:
    limiter = RateLimiter(rpm=None, ipm=None, max_batch_size=4)
    for _ in range(10):
        await limiter.acquire(3)
        await asyncio.sleep(1.0)
    limiter.on_rate_limited(None)  # no ticket: what went out in the last minute
    stats = limiter.statistics()
    assert (stats["learned_rpm"], stats["learned_ipm"]) == (10, 30)


@virtual_time
async def test_429s_within_a_minute_only_lower_the_learned_limit() -> None:
    # requests in flight together report one overrun, some late: no lesson raises the limit
    limiter = RateLimiter(rpm=None, ipm=None)
    tickets = []
    for _ in range(20):
        tickets.append(await limiter.acquire())
        await asyncio.sleep(0.1)
    limiter.on_rate_limited(None, limit="RPM", ticket=tickets[10])
    assert limiter.statistics()["learned_rpm"] == 10
    await asyncio.sleep(30)
    limiter.on_rate_limited(None, limit="RPM", ticket=tickets[15])
    assert limiter.statistics()["learned_rpm"] == 10
    limiter.on_rate_limited(None, limit="RPM", ticket=tickets[5])
    assert limiter.statistics()["learned_rpm"] == 5
    assert limiter.statistics()["rate_decreases"] == 2


@virtual_time
async def test_a_learned_limit_never_exceeds_the_configured_one() -> None:
    limiter = RateLimiter(rpm=30, ipm=None)
    tickets = [await limiter.acquire() for _ in range(26)]
    limiter.on_rate_limited(None, limit="RPM", ticket=tickets[-1])
    assert limiter.statistics()["learned_rpm"] == 25
    # a learned limit's bucket runs at twice it (at most the configured rate): the minute
    # log keeps the limit
    assert limiter.statistics()["effective_rpm"] == pytest.approx(30 * SAFETY)
    await asyncio.sleep(60)
    admissions = await run_workers(limiter, workers=2, duration_s=600)  # +2 % a used minute
    assert limiter.statistics()["effective_rpm"] == pytest.approx(30 * SAFETY)
    assert limiter.statistics()["learned_rpm"] >= 30
    assert most_in_window(admissions, 60 / SAFETY)[0] <= 30


@virtual_time
async def test_a_probing_limit_starts_low_and_doubles_while_used() -> None:
    limiter = RateLimiter(rpm=None, ipm=None, probe=True)
    assert limiter.statistics()["probing"] is True
    admissions = await run_workers(limiter, workers=4, duration_s=61.0)
    per_step = [
        sum(1 for at, _ in admissions if k * 15 <= at - admissions[0][0] < (k + 1) * 15)
        for k in range(4)
    ]
    # 30, 60, 120, 240 a minute: 7.5, 15, 30, 60 in each 15 s (one fewer at each step edge)
    assert per_step == [pytest.approx(n, abs=2.5) for n in (7.5, 15, 30, 60)]
    assert most_in_window(admissions, 1.0)[0] <= 5


@virtual_time
async def test_an_unused_probing_rate_does_not_grow() -> None:
    limiter = RateLimiter(rpm=None, ipm=None, probe=True)
    await run_workers(limiter, workers=1, duration_s=120.0, latency_s=10.0)  # 6 a minute
    assert limiter.statistics()["effective_rpm"] == 30


@virtual_time
async def test_probe_unknown_starts_from_the_rate_so_far_only_when_nothing_is_known() -> None:
    limiter = RateLimiter(rpm=None, ipm=None)
    for _ in range(20):
        await limiter.acquire()
    await asyncio.sleep(10.0)  # 20 in 10 s: 120 a minute
    assert limiter.statistics()["probing"] is False
    assert limiter.probe_unknown() is True
    stats = limiter.statistics()
    assert stats["probing"] is True and stats["effective_rpm"] == pytest.approx(120)
    assert limiter.probe_unknown() is False  # already probing
    told = RateLimiter(rpm=None, ipm=60)
    assert told.probe_unknown() is False  # a told limit paces: nothing to probe
    assert told.statistics()["effective_rpm"] is None
    learned = RateLimiter(rpm=None, ipm=None)
    learned.on_rate_limited(0.0, limit="IPM", ticket=await learned.acquire())
    assert learned.probe_unknown() is False
    quiet = RateLimiter(rpm=None, ipm=None)
    assert quiet.probe_unknown() is True
    assert quiet.statistics()["effective_rpm"] == 30  # nothing sent yet: the probe's start


class FakeServer:
    """Accepts at most ``limit`` requests in any sliding 60 s, like the real API."""

    def __init__(self, rpm: int, name: str | None = None) -> None:
        self.rpm = rpm
        self.name = name
        self._accepted: deque[float] = deque()
        self.refused: list[float] = []
        self.accepted: list[float] = []

    def request(self, at: float) -> bool:
        while self._accepted and self._accepted[0] <= at - 60:
            self._accepted.popleft()
        if len(self._accepted) >= self.rpm:
            self.refused.append(at)
            return False
        self._accepted.append(at)
        self.accepted.append(at)
        return True


async def drive(
    limiter: RateLimiter,
    server: FakeServer,
    *,
    workers: int,
    minutes: float,
    latency_s: float = 2.0,
    tickets: bool = True,
) -> None:
    end = now() + minutes * 60

    async def worker() -> None:
        while now() < end:
            ticket = await limiter.acquire()
            if server.request(now()):
                await asyncio.sleep(latency_s)  # generation latency
                limiter.on_success(ticket=ticket)
            else:
                limiter.on_rate_limited(None, limit=server.name, ticket=ticket if tickets else None)

    async with asyncio.TaskGroup() as group:
        for _ in range(workers):
            group.create_task(worker())


@virtual_time
async def test_exact_limit_gets_no_429_from_an_exact_server_despite_jitter() -> None:
    server = FakeServer(rpm=30)
    limiter = RateLimiter(rpm=30, ipm=None)
    jitter = random.Random(3)
    end = now() + 30 * 60

    async def worker() -> None:
        while now() < end:
            await limiter.acquire()
            await asyncio.sleep(jitter.uniform(0.0, 0.25))  # network delay on the way
            assert server.request(now())
            await asyncio.sleep(jitter.uniform(0.5, 5.0))

    async with asyncio.TaskGroup() as group:
        for _ in range(6):
            group.create_task(worker())
    assert server.refused == []
    assert len(server.accepted) >= 30 * SAFETY * 30 - 1


def longest_gap_s(times: Sequence[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(sorted(times))), default=0.0)


def sustained_from(accepted: Sequence[float], limit: int, start: float, end: float) -> float:
    """The first second from which every trailing minute until ``end`` held >= 90 % of limit."""
    first_ok = math.inf
    for second in range(int(end - start), 59, -1):
        at = start + second
        held = sum(1 for t in accepted if at - 60 < t <= at)
        if held < 0.9 * limit:
            break
        first_ok = float(second)
    return first_ok


@pytest.mark.parametrize("tickets", [True, False])
def test_unknown_limit_is_learned_within_90_s_without_stalls(tickets: bool) -> None:
    """Issue 12: not told its IPM 120 limit, ≥ 90 % of it within 90 s, < 5 % 429s."""

    @virtual_time
    async def scenario() -> None:
        server = FakeServer(rpm=120, name="IPM")
        limiter = RateLimiter(rpm=None, ipm=None, probe=True)
        start = now()
        await drive(limiter, server, workers=40, minutes=6, latency_s=8.0, tickets=tickets)
        sent = server.accepted + server.refused
        assert sustained_from(server.accepted, 120, start, start + 360) <= 90
        assert len(server.refused) < 0.05 * len(sent)
        assert longest_gap_s([start, *sent]) <= 10.0
        assert limiter.statistics()["learned_ipm"] == pytest.approx(120, rel=0.03)

    scenario()


@pytest.mark.parametrize("configured_rpm", [None, 200])
def test_absent_or_overestimated_limit_converges(configured_rpm: int | None) -> None:
    @virtual_time
    async def scenario() -> None:
        server = FakeServer(rpm=20)
        limiter = RateLimiter(rpm=configured_rpm, ipm=None)
        start = now()
        await drive(limiter, server, workers=8, minutes=40)
        late = start + 2 * 60
        refused_late = [at for at in server.refused if at >= late]
        accepted_late = [at for at in server.accepted if at >= late]
        # learned at the first 429: the whole limit used from then on, about one 429 a
        # minute and a half (the learned limit probes 2 % up after each minute)
        assert len(accepted_late) >= 0.97 * 20 * 38
        assert len(refused_late) <= 0.05 * len(accepted_late)
        learned = limiter.statistics()["learned_rpm"]
        assert isinstance(learned, float) and learned < 21

    scenario()


# --- cancellation ----------------------------------------------------------------------


@virtual_time
async def test_cancelled_waiter_does_not_use_up_capacity() -> None:
    limiter = RateLimiter(rpm=60, ipm=120, max_batch_size=2)
    start = now()
    await limiter.acquire(2)
    waiting = asyncio.create_task(limiter.acquire(2))
    behind = asyncio.create_task(limiter.acquire(1))  # queued behind it
    await asyncio.sleep(0.5)
    waiting.cancel()
    await asyncio.sleep(0.1)
    behind.cancel()
    await asyncio.gather(waiting, behind, return_exceptions=True)
    assert waiting.cancelled() and behind.cancelled()
    await limiter.acquire(2)
    # as if the cancelled ones had never asked
    assert now() - start == pytest.approx(1 / SAFETY, abs=1e-6)
    stats = limiter.statistics()
    assert stats["acquires"] == 2
    assert stats["images"] == 4
    assert stats["waiting"] == 0


@virtual_time
async def test_cancelling_waiters_in_any_order_never_deadlocks() -> None:
    limiter = RateLimiter(rpm=120, ipm=None)
    tasks = [asyncio.create_task(limiter.acquire()) for _ in range(12)]
    limiter.on_rate_limited(retry_after_s=5.0)
    await asyncio.sleep(1.0)
    for task in tasks[::3]:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    done = [result for result in results if not isinstance(result, asyncio.CancelledError)]
    assert len(done) == 8
    assert limiter.statistics()["acquires"] == 8
    assert limiter.statistics()["waiting"] == 0


@virtual_time
async def test_waiters_are_served_in_arrival_order() -> None:
    limiter = RateLimiter(rpm=None, ipm=60, max_batch_size=4)
    order: list[int] = []

    async def worker(index: int, images: int) -> None:
        await limiter.acquire(images)
        order.append(index)

    async with asyncio.TaskGroup() as group:
        for index, images in enumerate([4, 4, 1, 1, 4, 1]):
            group.create_task(worker(index, images))
            await asyncio.sleep(0)
    assert order == [0, 1, 2, 3, 4, 5]


# --- statistics ------------------------------------------------------------------------


@virtual_time
async def test_statistics() -> None:
    limiter = RateLimiter(rpm=60, ipm=120, max_batch_size=2)
    await limiter.acquire(2)
    await limiter.acquire(1)
    limiter.on_success()
    stats = limiter.statistics()
    assert set(stats) == {
        "rpm_limit",
        "ipm_limit",
        "learned_rpm",
        "learned_ipm",
        "probing",
        "effective_rpm",
        "effective_ipm",
        "observed_rpm",
        "observed_ipm",
        "acquires",
        "images",
        "waiting",
        "wait_s_total",
        "rate_limited",
        "rate_decreases",
        "consecutive_rate_limited",
        "successes",
        "cooldown_active",
        "cooldown_remaining_s",
    }
    assert stats["rpm_limit"] == 60
    assert stats["ipm_limit"] == 120
    assert stats["effective_rpm"] == pytest.approx(59.7)
    assert stats["effective_ipm"] == pytest.approx(119.4)
    assert stats["acquires"] == 2
    assert stats["images"] == 3
    assert stats["wait_s_total"] == pytest.approx(1 / SAFETY)
    assert stats["successes"] == 1
    assert stats["rate_limited"] == 0
    assert stats["cooldown_active"] is False


def test_docstring_examples() -> None:
    assert doctest.testmod(sfbatch.limiter).failed == 0


# --- against the emulator over loopback, in virtual time ---------------------------------


@pytest.mark.parametrize("retry_after_s", [None, 0.0])
def test_unknown_ipm_limit_learned_against_the_emulator(
    monkeypatch: pytest.MonkeyPatch, retry_after_s: float | None
) -> None:
    """The real client and emulator over 127.0.0.1; their clocks are the loop's virtual one.

    The emulator's sliding windows read :meth:`Clock.mono`, which is pointed at the loop's
    clock, and its latency is an ``asyncio.sleep``: six minutes take well under a second.
    ``retry_after_s=0`` makes it send the computed wait as ``Retry-After``.
    """
    monkeypatch.setattr(
        emulator_limits.Clock,
        "mono",
        lambda self: asyncio.get_running_loop().time() + self.offset_s,
    )

    @virtual_time
    async def scenario() -> None:
        config = EmulatorConfig(
            host="127.0.0.1", port=0, ipm=120, latency_s=8.0, retry_after_s=retry_after_s
        )
        async with (
            Emulator(config) as emu,
            SiliconFlowClient(base_url=emu.base_url, api_key=emu.api_key) as client,
        ):
            limiter = RateLimiter(rpm=None, ipm=None, probe=True)
            start = now()
            accepted: list[float] = []
            sent: list[float] = []

            async def worker() -> None:
                while now() - start < 360:
                    ticket = await limiter.acquire()
                    sent.append(ticket.at)
                    try:
                        await client.generate({"model": "Kwai-Kolors/Kolors", "prompt": "x"})
                    except RateLimitError as exc:
                        limiter.on_rate_limited(
                            exc.retry_after_s, limit=getattr(exc, "limit", None), ticket=ticket
                        )
                    else:
                        accepted.append(ticket.at)
                        limiter.on_success(ticket=ticket)

            async with asyncio.TaskGroup() as group:
                for _ in range(40):
                    group.create_task(worker())
            stats = emu.stats()
        assert sustained_from(accepted, 120, start, start + 360) <= 90
        assert limiter.statistics()["rate_limited"] < 0.05 * len(sent)
        assert longest_gap_s([start, *sent]) <= 10.0
        assert stats["status_counts"].get("429", 0) == limiter.statistics()["rate_limited"]

    scenario()
