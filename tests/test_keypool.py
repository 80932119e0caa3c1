"""KeyPool: selection across keys, per-model limits, set-aside, "no key can go on".

In test_limiter's virtual-time loop (simulated minutes take milliseconds).
"""

from __future__ import annotations

import asyncio
import doctest
from collections import Counter

import pytest
from test_limiter import SAFETY, most_in_window, now, virtual_time

import sfbatch.keypool
from sfbatch.errors import ConfigError, QuotaReachedError
from sfbatch.keypool import KeyPool, Lease, ModelLimits, NoKeyLeftError

KOLORS = "Kwai-Kolors/Kolors"
QWEN = "Qwen/Qwen-Image"


async def run(
    pool: KeyPool, *, model: str = KOLORS, workers: int, duration_s: float, latency_s: float = 1.0
) -> list[tuple[float, int]]:
    """Workers lease and succeed in a loop; returns (time, key_index) of each admission."""
    admitted: list[tuple[float, int]] = []
    end = now() + duration_s

    async def worker() -> None:
        while True:
            try:
                lease = await pool.acquire(model)
            except NoKeyLeftError:
                return
            if now() > end:
                pool.on_error(lease)
                return
            admitted.append((now(), lease.key_index))
            await asyncio.sleep(latency_s)
            pool.on_success(lease)

    async with asyncio.TaskGroup() as group:
        for _ in range(workers):
            group.create_task(worker())
    return admitted


@virtual_time
async def test_one_key_is_one_limiter() -> None:
    pool = KeyPool(keys=1, limits=ModelLimits(rpm=60))
    admitted = await run(pool, workers=4, duration_s=60.0)
    assert {key for _, key in admitted} == {0}
    assert len(admitted) == pytest.approx(60 * SAFETY, abs=1)
    assert most_in_window([(at, 1) for at, _ in admitted], 10.0)[0] <= 11


@virtual_time
async def test_three_keys_share_the_work_each_at_its_limit() -> None:
    pool = KeyPool(keys=3, limits=ModelLimits(ipm=60))
    admitted = await run(pool, workers=12, duration_s=300.0)
    per_key = Counter(key for _, key in admitted)
    assert sorted(per_key) == [0, 1, 2]
    for key in range(3):
        times = [(at, 1) for at, k in admitted if k == key]
        assert len(times) >= 0.99 * 300 * SAFETY  # each key at its full 60/min
        assert most_in_window(times, 60.0)[0] <= 60
    assert len(admitted) >= 0.99 * 3 * 300 * SAFETY


@virtual_time
async def test_limits_are_per_model_with_overrides() -> None:
    pool = KeyPool(
        keys=1, limits=ModelLimits(ipm=30), per_model={QWEN: ModelLimits(ipm=120, ipd=50)}
    )
    assert pool.limits_for(KOLORS) == ModelLimits(ipm=30)
    kolors, qwen = await asyncio.gather(
        run(pool, model=KOLORS, workers=4, duration_s=60.0),
        run(pool, model=QWEN, workers=4, duration_s=60.0),
    )
    # separate limiters: neither model's work slows the other
    assert len(kolors) == pytest.approx(30 * SAFETY, abs=1)
    assert len(qwen) == 50  # its own daily quota, then set aside for that model only
    assert pool.set_aside_reason(0, QWEN) == "daily_quota"
    assert pool.set_aside_reason(0, KOLORS) is None
    assert pool.can_go_on(KOLORS) and not pool.can_go_on(QWEN)


@virtual_time
async def test_a_key_out_of_daily_quota_is_set_aside_while_the_others_go_on() -> None:
    # key 1 already used 390 of its 400 today (from the manifest): 10 more, then aside
    used = {(1, KOLORS): 390}
    pool = KeyPool(
        keys=3,
        limits=ModelLimits(ipm=60, ipd=400),
        used_today=lambda key, model: used.get((key, model), 0),
    )
    admitted = await run(pool, workers=12, duration_s=120.0)
    per_key = Counter(key for _, key in admitted)
    assert per_key[1] == 10
    late = [key for at, key in admitted if at > admitted[0][0] + 30]
    assert 1 not in late
    for key in (0, 2):  # the others at full speed all along
        assert per_key[key] >= 0.99 * 120 * SAFETY
    assert pool.set_aside_reason(1, KOLORS) == "daily_quota"
    stats = {(s.key_index, s.model): s for s in pool.statistics()}
    assert stats[(1, KOLORS)].images_today == 400
    assert stats[(1, KOLORS)].set_aside == "daily_quota"


@virtual_time
async def test_a_429_naming_a_daily_limit_sets_the_key_aside_for_that_model() -> None:
    pool = KeyPool(keys=2, limits=ModelLimits(ipm=60))
    lease = await pool.acquire(KOLORS)
    pool.on_rate_limited(lease, limit="IPD")
    assert pool.set_aside_reason(lease.key_index, KOLORS) == "daily_quota"
    other = await pool.acquire(KOLORS)
    assert other.key_index != lease.key_index
    pool.on_rate_limited(other, daily=True)  # a DailyQuotaError without a named limit
    with pytest.raises(NoKeyLeftError) as caught:
        await pool.acquire(KOLORS)
    assert caught.value.reason == "daily_quota" and caught.value.exit_code == 4
    assert isinstance(caught.value, QuotaReachedError)
    assert "each of the 2 keys has reached its daily quota" in str(caught.value)
    assert (await pool.acquire(QWEN)).key_index in (0, 1)  # other models go on


@virtual_time
async def test_balance_sets_a_key_aside_for_every_model() -> None:
    pool = KeyPool(keys=2, limits=ModelLimits(ipm=60))
    pool.set_aside(0, "balance")
    leases = [await pool.acquire(model) for model in (KOLORS, QWEN, KOLORS)]
    assert {lease.key_index for lease in leases} == {1}
    pool.set_aside(1, "balance")
    with pytest.raises(NoKeyLeftError) as caught:
        await pool.acquire(KOLORS)
    assert caught.value.reason == "balance" and caught.value.exit_code == 5
    # a mix: tomorrow the daily-quota key works again, so exit 4
    mixed = KeyPool(keys=2, limits=ModelLimits(ipm=60))
    mixed.set_aside(0, "balance")
    mixed.set_aside(1, "daily_quota", model=KOLORS)
    with pytest.raises(NoKeyLeftError) as caught:
        await mixed.acquire(KOLORS)
    assert caught.value.exit_code == 4
    # the message says which key stopped for which reason, not "each ... daily quota"
    assert "key #1 has reached its daily quota" in str(caught.value)
    assert "key #0 has reached its balance" in str(caught.value)
    assert "each of" not in str(caught.value)
    with pytest.raises(IndexError):
        mixed.set_aside(2, "balance")


@virtual_time
async def test_quota_reserved_in_flight_is_waited_for_not_given_up() -> None:
    pool = KeyPool(keys=1, limits=ModelLimits(ipd=2))
    first = await pool.acquire(KOLORS)
    await pool.acquire(KOLORS)
    third = asyncio.create_task(pool.acquire(KOLORS))
    await asyncio.sleep(5.0)
    assert not third.done()  # both reserved: one may come back
    pool.on_error(first)  # not billed: its reservation returns
    lease = await third
    assert isinstance(lease, Lease)
    pool.on_success(lease)
    pool.on_success(lease)  # settled once only
    stats = pool.statistics()[0]
    assert stats.images_today == 1


@virtual_time
async def test_a_cancelled_acquire_gives_its_reservation_back() -> None:
    pool = KeyPool(keys=1, limits=ModelLimits(rpm=1, ipd=5))
    await pool.acquire(KOLORS)
    waiting = asyncio.create_task(pool.acquire(KOLORS))  # waits ~60 s in the limiter
    await asyncio.sleep(1.0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert pool._slot(0, KOLORS).quota.remaining == 4  # type: ignore[union-attr]


@virtual_time
async def test_a_429_slows_only_that_key() -> None:
    pool = KeyPool(keys=2, limits=ModelLimits())
    leases = [await pool.acquire(KOLORS) for _ in range(10)]
    for lease in leases[:4]:
        pool.on_success(lease)
    refused = next(lease for lease in leases[4:] if lease.key_index == 0)
    pool.on_rate_limited(refused, retry_after_s=30.0, limit="IPM")
    start = now()
    following = [await pool.acquire(KOLORS) for _ in range(5)]
    assert {lease.key_index for lease in following} == {1}  # key 0 cools down
    assert now() - start < 1.0
    assert pool.target_rate_per_min() is None  # key 1 has no limit at all


def test_bad_configuration_fails_at_start() -> None:
    with pytest.raises(ConfigError):
        KeyPool(keys=0, limits=ModelLimits())
    with pytest.raises(ConfigError):
        KeyPool(keys=1, limits=ModelLimits(ipd=0))
    with pytest.raises(ConfigError):
        KeyPool(keys=1, limits=ModelLimits(ipm=2), max_batch_size=4).check_batch_size(KOLORS, 4)


def test_docstring_examples() -> None:
    assert doctest.testmod(sfbatch.keypool).failed == 0


@virtual_time
async def test_first_answers_slower_than_probe_after_latency_start_that_keys_probe() -> None:
    def probing(pool: KeyPool) -> list[bool]:
        return [pool.limiter(k, KOLORS).statistics()["probing"] is True for k in range(pool.keys)]

    slow = KeyPool(keys=1, limits=ModelLimits(), probe_after_latency_s=1.0)
    for answer in range(4):
        assert probing(slow) == [False]
        slow.on_success(await slow.acquire(KOLORS), latency_s=1.0 + answer)
    assert probing(slow) == [True]
    # one fast answer among the first four: answers do not take seconds, no probe ever
    mixed = KeyPool(keys=1, limits=ModelLimits(), probe_after_latency_s=1.0)
    for latency_s in (5.0, 0.2, 5.0, 5.0, 5.0, 5.0):
        mixed.on_success(await mixed.acquire(KOLORS), latency_s=latency_s)
    assert probing(mixed) == [False]
    told = KeyPool(keys=1, limits=ModelLimits(ipm=60), probe_after_latency_s=1.0)
    for _ in range(4):
        told.on_success(await told.acquire(KOLORS), latency_s=30.0)
    assert probing(told) == [False]  # a told limit paces: nothing to probe


@virtual_time
async def test_a_waiter_switches_keys_when_its_key_cools_down() -> None:
    pool = KeyPool(keys=2, limits=ModelLimits(rpm=6))  # one request per ~10 s per key
    start = now()
    first = await pool.acquire(KOLORS)
    second = await pool.acquire(KOLORS)
    assert {first.key_index, second.key_index} == {0, 1}
    waiting = asyncio.create_task(pool.acquire(KOLORS))  # both keys free again at ~10 s
    await asyncio.sleep(1.0)
    refused = first if first.key_index == 0 else second
    pool.on_rate_limited(refused, retry_after_s=60.0, limit="RPM")
    lease = await waiting
    assert lease.key_index == 1 - refused.key_index
    assert now() - start == pytest.approx(10 / SAFETY, abs=0.01)


@virtual_time
async def test_the_pool_knows_its_limits_only_when_none_is_being_probed() -> None:
    told = KeyPool(keys=1, limits=ModelLimits(ipm=60))
    await told.acquire(KOLORS)
    assert told.knows_its_limits()
    unknown = KeyPool(keys=1, limits=ModelLimits(), probe_after_latency_s=1.0)
    lease = await unknown.acquire(KOLORS)
    assert unknown.knows_its_limits()  # unlimited until it probes: nothing to fill
    for _ in range(4):  # answers that take seconds: the pool probes the unknown limit
        unknown.on_success(lease, latency_s=5.0)
        lease = await unknown.acquire(KOLORS)
    assert not unknown.knows_its_limits()
