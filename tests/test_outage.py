"""The outage detector: virtual time for the waits, and a real port that closes and opens."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field

import pytest

from sfbatch.client import SiliconFlowClient
from sfbatch.emulator import Emulator
from sfbatch.errors import (
    OutageError,
    RequestTimeoutError,
    RunBlockedError,
    ServerError,
    TransportError,
)
from sfbatch.outage import OutageDetector

REFUSED = TransportError("refused", connection_level=True)


@dataclass
class VirtualTime:
    """A clock that moves only when someone sleeps on it."""

    now_s: float = 0.0
    sleeps: list[float] = field(default_factory=list)

    def clock(self) -> float:
        return self.now_s

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now_s += seconds
        await asyncio.sleep(0)


@dataclass
class Endpoint:
    """A probe target that is down for ``down_probes`` probes, then answers."""

    down_probes: int = 0
    probes: int = 0

    async def probe(self) -> None:
        self.probes += 1
        await asyncio.sleep(0)
        if self.probes <= self.down_probes:
            raise TransportError("connection refused", connection_level=True)


def detector(endpoint: Endpoint, time: VirtualTime, **kwargs: float) -> OutageDetector:
    return OutageDetector(probe=endpoint.probe, clock=time.clock, sleep=time.sleep, **kwargs)


async def test_failures_of_the_request_are_not_an_outage() -> None:
    endpoint, time = Endpoint(), VirtualTime()
    d = detector(endpoint, time)
    for exc in (ServerError("503", status=503), RequestTimeoutError("slow"), ValueError()):
        assert await d.check(exc) is False
    assert endpoint.probes == 0
    # Connection-level, but the endpoint answers the probe: the item's own failure.
    assert await d.check(REFUSED) is False
    assert endpoint.probes == 1 and not d.paused
    await d.wait_ready()
    assert time.sleeps == []


async def test_workers_failing_together_share_one_probe() -> None:
    endpoint, time = Endpoint(), VirtualTime()
    d = detector(endpoint, time)
    verdicts = await asyncio.gather(*(d.check(REFUSED) for _ in range(5)))
    assert verdicts == [False] * 5 and endpoint.probes == 1
    time.now_s += 1  # a later failure gets a fresh probe
    assert await d.check(REFUSED) is False and endpoint.probes == 2


async def test_an_outage_pauses_every_worker_until_the_endpoint_answers() -> None:
    endpoint, time = Endpoint(down_probes=5), VirtualTime()
    d = detector(endpoint, time, first_wait_s=1.0, max_wait_s=60.0)
    assert await d.check(REFUSED) is True
    assert d.paused and endpoint.probes == 1
    assert await d.check(REFUSED) is True and endpoint.probes == 1  # no probe per failure
    sent: list[int] = []

    async def worker(n: int) -> None:
        await d.wait_ready()
        sent.append(n)

    await asyncio.gather(*(worker(n) for n in range(4)))
    assert sorted(sent) == [0, 1, 2, 3]
    # Probes 2..6 after growing waits; the sixth answered.
    assert time.sleeps == [1.0, 2.0, 4.0, 8.0, 16.0] and endpoint.probes == 6
    stats = d.statistics()
    assert stats.outages == 1 and stats.down_s == 31.0 and not stats.paused
    await d.wait_ready()  # no pause any more
    assert endpoint.probes == 6


async def test_a_failure_during_an_outage_is_the_outages_without_a_probe() -> None:
    endpoint, time = Endpoint(down_probes=2), VirtualTime()
    d = detector(endpoint, time)
    assert await d.check(REFUSED) is True
    waiter = asyncio.create_task(d.wait_ready())
    await asyncio.sleep(0)
    probes = endpoint.probes
    assert await d.check(REFUSED) is True and endpoint.probes == probes
    await waiter
    assert not d.paused and endpoint.probes == 3


async def test_an_outage_longer_than_the_limit_stops_every_worker() -> None:
    endpoint, time = Endpoint(down_probes=10**9), VirtualTime()
    d = detector(endpoint, time, outage_timeout_s=300.0)
    assert await d.check(REFUSED) is True
    results = await asyncio.gather(*(d.wait_ready() for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, OutageError) for r in results)
    error = results[0]
    assert isinstance(error, OutageError) and isinstance(error, RunBlockedError)
    assert error.down_s == 300.0 and "300 s" in str(error)
    assert "run the same command again" in str(error)
    assert time.sleeps == [1, 2, 4, 8, 16, 32, 60, 60, 60, 57]  # capped; the last cut short
    with pytest.raises(OutageError):
        await d.wait_ready()
    assert await d.check(REFUSED) is True


async def test_a_cancelled_prober_hands_over_to_the_next_worker() -> None:
    endpoint, time = Endpoint(down_probes=3), VirtualTime()
    gate = asyncio.Event()

    async def slow_sleep(seconds: float) -> None:
        await gate.wait()
        await time.sleep(seconds)

    d = OutageDetector(probe=endpoint.probe, clock=time.clock, sleep=slow_sleep)
    assert await d.check(REFUSED) is True
    first = asyncio.create_task(d.wait_ready())
    second = asyncio.create_task(d.wait_ready())
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    await second
    assert first.cancelled() and not d.paused and endpoint.probes == 4


def test_bad_settings_are_refused() -> None:
    endpoint = Endpoint()
    with pytest.raises(ValueError):
        OutageDetector(probe=endpoint.probe, outage_timeout_s=0)
    with pytest.raises(ValueError):
        OutageDetector(probe=endpoint.probe, first_wait_s=10, max_wait_s=1)


async def test_a_closed_port_that_opens_is_an_outage_that_ends() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with SiliconFlowClient(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-emulator"
    ) as client:
        d = OutageDetector(probe=client.probe, first_wait_s=0.02, max_wait_s=0.1)
        with pytest.raises(TransportError) as info:
            await client.generate({"prompt": "a cat"})
        assert await d.check(info.value) is True
        waiter = asyncio.create_task(d.wait_ready())
        for _ in range(6000):  # the endpoint stays down for a few real probes
            if d.statistics().probes >= 3:
                break
            await asyncio.sleep(0.01)
        assert not waiter.done() and d.paused
        async with Emulator(host="127.0.0.1", port=port):
            await asyncio.wait_for(waiter, timeout=60)
            generation = await client.generate({"prompt": "a cat", "seed": 1})
        assert generation.seed == 1
    stats = d.statistics()
    assert stats.outages == 1 and not stats.paused and stats.down_s > 0
