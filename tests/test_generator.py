"""The generation worker's retry, 429, quota and stop logic, against the emulator.

The sleep between retries is injected (it records the delays and returns at once), so
no test waits for a backoff; the limiter's shared cooldown after a 429 runs in virtual time.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from sfbatch.client import SiliconFlowClient
from sfbatch.concurrency import ConcurrencyWindow
from sfbatch.emulator import Emulator, FaultConfig
from sfbatch.errors import (
    BadRequestError,
    QuotaReachedError,
    ServerError,
)
from sfbatch.generator import Generator, Stopped, WorkItem
from sfbatch.keypool import KeyPool, ModelLimits, NoKeyLeftError
from sfbatch.loader import PromptSource
from sfbatch.models import ModelRegistry
from sfbatch.retry import RetryPolicy
from sfbatch.testing.virtual_time import VirtualTimeLoop, emulator_on_loop_clock

REG = ModelRegistry.builtin()


def item(prompt: str = "a lighthouse", **fields: object) -> WorkItem:
    (row,) = PromptSource.from_records([{"prompt": prompt, **fields}], registry=REG)
    assert row.request is not None
    return WorkItem(row=row)


class Sleeps:
    """An injectable sleep: records each delay, waits for nothing, runs ``then`` once."""

    def __init__(self, then: Callable[[], None] = lambda: None) -> None:
        self.delays: list[float] = []
        self._then = then

    async def __call__(self, delay_s: float) -> None:
        self.delays.append(delay_s)
        if len(self.delays) == 1:
            self._then()


@asynccontextmanager
async def generator(
    emu: Emulator,
    *,
    retry: RetryPolicy | None = None,
    ipd: int | None = None,
    sleep: Sleeps | None = None,
    stopping: Callable[[], bool] = lambda: False,
) -> AsyncIterator[Generator]:
    async with SiliconFlowClient(base_url=emu.base_url, api_key=emu.api_key) as client:
        yield Generator(
            clients=[client],
            pool=KeyPool(keys=1, limits=ModelLimits(ipd=ipd), max_batch_size=4),
            retry=retry or RetryPolicy(max_retries=3, base_s=0.5, cap_s=2.0),
            rng=random.Random(1),
            sleep=sleep or Sleeps(),
            stopping=stopping,
        )


async def test_success_fills_in_the_item_and_returns_nothing() -> None:
    async with Emulator() as emu, generator(emu) as gen:
        work = item(seed=42, batch_size=2)
        assert await gen.generate(work) is None  # type: ignore[func-returns-value]
        assert work.generation is not None and work.generation.seed == 42
        assert len(work.generation.urls) == 2
        assert (work.attempts, work.billed_images, gen.requests, gen.retries) == (1, 2, 1, 0)


async def test_a_server_error_is_retried_after_a_jittered_backoff_then_succeeds() -> None:
    async with Emulator(faults=FaultConfig(p_503=1.0)) as emu:
        sleeps = Sleeps(then=lambda: emu.set_faults(FaultConfig()))
        async with generator(emu, sleep=sleeps) as gen:
            work = item()
            await gen.generate(work)
        assert emu.stats()["generation_requests"] == 2
    assert work.generation is not None
    assert (work.attempts, work.billed_images, gen.retries) == (2, 1, 1)
    assert len(sleeps.delays) == 1 and 0.0 <= sleeps.delays[0] <= 0.5


async def test_retries_run_out_after_max_retries_with_growing_waits() -> None:
    sleeps = Sleeps()
    async with Emulator(faults=FaultConfig(p_503=1.0)) as emu:
        retry = RetryPolicy(max_retries=3, base_s=1.0, cap_s=2.0)
        async with generator(emu, retry=retry, sleep=sleeps) as gen:
            work = item()
            with pytest.raises(ServerError):
                await gen.generate(work)
        assert emu.stats()["generation_requests"] == 4
    assert (work.attempts, work.billed_images, work.generation) == (4, 0, None)
    assert len(sleeps.delays) == 3
    assert [d <= cap for d, cap in zip(sleeps.delays, (1.0, 2.0, 2.0), strict=True)] == [True] * 3


async def test_a_bad_request_fails_at_once() -> None:
    sleeps = Sleeps()
    async with Emulator() as emu, generator(emu, sleep=sleeps) as gen:
        work = item()
        work.row.request["num_inference_steps"] = 1000  # type: ignore[index]
        with pytest.raises(BadRequestError):
            await gen.generate(work)
    assert work.attempts == 1 and sleeps.delays == []


def test_a_429_slows_the_limiter_and_is_not_counted_against_max_retries() -> None:
    # The limiter learns RPM 1 from the 429 and waits out the server's minute (about 60 s)
    # before the retry; in virtual time, with the emulator's windows on the loop's clock,
    # that minute takes no real time.
    async def scenario() -> None:
        async with Emulator(rpm=1) as emu:
            sleeps = Sleeps()
            async with generator(emu, retry=RetryPolicy(max_retries=0), sleep=sleeps) as gen:
                await gen.generate(item("first"))

                async def lift_the_limit_after_the_429() -> None:
                    while True:  # poll: the emulator has no event for this
                        if emu.stats()["status_counts"].get("429", 0):
                            emu.set_limits(rpm=None)
                            return
                        await asyncio.sleep(0.01)

                lifter = asyncio.create_task(lift_the_limit_after_the_429())
                work = item("second")
                async with asyncio.timeout(180):
                    await gen.generate(work)
                await lifter
        assert work.generation is not None
        assert (work.attempts, work.rate_limited, gen.rate_limited, gen.retries) == (2, 1, 1, 0)
        assert sleeps.delays == []  # the wait was the limiter's shared cooldown
        assert gen.requests == 3

    with emulator_on_loop_clock(), asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        runner.run(scenario())


async def test_a_429_naming_the_daily_limit_sets_the_key_aside_and_ends_in_quota() -> None:
    async with Emulator(ipd=1) as emu, generator(emu) as gen:
        await gen.generate(item("first"))
        work = item("second")
        with pytest.raises(NoKeyLeftError) as caught:
            await gen.generate(work)
        assert emu.stats()["generation_requests"] == 2  # the key is not tried again
    assert isinstance(caught.value, QuotaReachedError) and caught.value.exit_code == 4
    assert work.billed_images == 0 and gen.rate_limited == 0
    assert [k.set_aside for k in gen.pool.statistics()] == ["daily_quota"]


def images_today(gen: Generator) -> int | None:
    (key,) = gen.pool.statistics()
    return key.images_today


async def test_our_daily_quota_refuses_before_sending_and_gives_back_unbilled_images() -> None:
    async with Emulator(faults=FaultConfig(p_503=1.0)) as emu:
        async with generator(emu, ipd=3, retry=RetryPolicy(max_retries=0)) as gen:
            with pytest.raises(ServerError):
                await gen.generate(item(batch_size=2))
            assert images_today(gen) == 0  # not billed: given back
            emu.set_faults(FaultConfig())
            await gen.generate(item(batch_size=2))
            assert images_today(gen) == 2
            with pytest.raises(QuotaReachedError):
                await gen.generate(item(batch_size=2))
        assert emu.stats()["generation_requests"] == 2


async def test_nothing_is_sent_once_the_run_is_stopping() -> None:
    async with Emulator() as emu, generator(emu, ipd=10, stopping=lambda: True) as gen:
        work = item()
        with pytest.raises(Stopped):
            await gen.generate(work)
        assert emu.stats()["generation_requests"] == 0
    assert (work.attempts, gen.requests, gen.pool.statistics()) == (0, 0, [])


async def test_an_expired_item_is_generated_again_with_the_same_seed() -> None:
    async with Emulator() as emu, generator(emu) as gen:
        work = item(seed=7)
        await gen.generate(work)
        first = work.generation
        work.expired = True
        await gen.generate(work)
    assert work.generation is not None and work.generation is not first
    assert work.generation.seed == 7 and not work.expired
    assert (work.attempts, work.billed_images) == (2, 2)


def longest_gap_s(times_ms: list[int]) -> float:
    return max((b - a for a, b in itertools.pairwise(times_ms)), default=0) / 1000


def sustained_from_s(admitted_ms: list[int], limit: int) -> float:
    """The first second from which every trailing minute until the last admission held
    >= 90 % of ``limit``."""
    last = admitted_ms[-1] // 1000
    first = math.inf
    for second in range(last, 59, -1):
        held = sum(1 for t in admitted_ms if (second - 60) * 1000 < t <= second * 1000)
        if held < 0.9 * limit:
            break
        first = float(second)
    return first


@pytest.mark.parametrize("probe_after_latency_s", [1.0, None])
def test_told_no_limit_slow_answers_start_the_probe(probe_after_latency_s: float | None) -> None:
    """Issue 12: told nothing against IPM 120 at 8 s latency, the engine's wiring (window,
    key pool, generator) holds >= 90 % within 90 s, < 5 % 429s, no pause over 10 s, because
    slow answers start the probe. Without it, the unlimited start fills the server's
    minute in a burst and then waits it out."""

    async def scenario() -> None:
        async with (
            Emulator(ipm=120, latency_s=8.0) as emu,
            SiliconFlowClient(base_url=emu.base_url, api_key=emu.api_key) as client,
        ):
            loop = asyncio.get_running_loop()
            pool = KeyPool(
                keys=1, limits=ModelLimits(), probe_after_latency_s=probe_after_latency_s
            )
            gen = Generator(
                clients=[client],
                pool=pool,
                retry=RetryPolicy(max_retries=0),
                window=ConcurrencyWindow(max_size=64, clock=loop.time),
            )
            end = loop.time() + 360

            async def worker() -> None:
                while loop.time() < end:
                    await gen.generate(item())

            async with asyncio.TaskGroup() as group:
                for _ in range(64):
                    group.create_task(worker())
            admissions = emu.admissions()
        admitted = [t for t, _, _, what in admissions if what == "ok"]
        refused = [t for t, _, _, what in admissions if what != "ok"]
        gap_s = longest_gap_s([t for t, *_ in admissions])
        if probe_after_latency_s is None:
            assert gap_s > 10.0
            return
        assert pool.limiter(0, item().model).statistics()["learned_ipm"] is not None
        assert sustained_from_s(admitted, 120) <= 90
        assert len(refused) < 0.05 * len(admissions)
        assert gap_s <= 10.0

    with emulator_on_loop_clock(), asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        runner.run(scenario())
