"""Outages: an endpoint that cannot be reached pauses the run instead of failing its rows.

A request that fails at the connection level (refused, DNS, reset before any answer,
connect timeout: :func:`~sfbatch.errors.is_connection_level`) may be the network or the
endpoint, not the item. The worker asks :meth:`OutageDetector.check`, which probes the
endpoint once (one probe shared by every worker that failed meanwhile): if it answers,
the failure was the item's and counts as a retry as usual; if not, an outage begins and
the item is not charged. Every worker awaits :meth:`OutageDetector.wait_ready` before
each request: during an outage one of them probes with growing waits (1 s doubling to
60 s) and the others wait behind it; when the endpoint answers all resume, and after
``outage_timeout_s`` without an answer every waiter gets :class:`OutageError` (exit 5)::

    detector = OutageDetector(probe=client.probe, outage_timeout_s=1800)
    await detector.wait_ready()                 # before each request
    try:
        await client.generate(request)
    except TransportError as exc:
        if await detector.check(exc):           # the endpoint is down: not the item's fault
            continue                            # wait_ready() pauses until it is back
        ...                                     # an ordinary retry

``clock`` and ``sleep`` are injectable, so tests need no real waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sfbatch.errors import OutageError, SfbatchError, is_connection_level

__all__ = ["DEFAULT_OUTAGE_TIMEOUT_S", "OutageDetector", "OutageStats"]

DEFAULT_OUTAGE_TIMEOUT_S = 1800.0

log = logging.getLogger("sfbatch")


@dataclass(frozen=True, slots=True)
class OutageStats:
    """What the detector saw: outages begun, probes sent, seconds spent paused."""

    outages: int
    probes: int
    down_s: float
    paused: bool


class OutageDetector:
    """Tells outages from item failures, pauses the workers, probes, resumes or gives up."""

    def __init__(
        self,
        *,
        probe: Callable[[], Awaitable[Any]],
        outage_timeout_s: float = DEFAULT_OUTAGE_TIMEOUT_S,
        first_wait_s: float = 1.0,
        max_wait_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        if not outage_timeout_s > 0:
            raise ValueError(f"outage_timeout_s must be > 0, got {outage_timeout_s!r}")
        if not 0 < first_wait_s <= max_wait_s:
            raise ValueError("need 0 < first_wait_s <= max_wait_s")
        self.outage_timeout_s = outage_timeout_s
        self._probe = probe
        self._first_wait_s = first_wait_s
        self._max_wait_s = max_wait_s
        self._clock = clock
        self._sleep = sleep
        # One prober at a time; the others queue here and find the outage over (or fatal).
        self._lock = asyncio.Lock()
        self._down_since: float | None = None
        self._last_probe_at = float("-inf")
        self._last_probe_up = True
        self.error: OutageError | None = None
        self._outages = 0
        self._probes = 0
        self._down_s = 0.0

    @property
    def paused(self) -> bool:
        return self._down_since is not None

    @property
    def outages(self) -> int:
        """How many outages began so far (asked for every download: no statistics())."""
        return self._outages

    def statistics(self) -> OutageStats:
        down = self._down_s
        if self._down_since is not None:
            down += self._clock() - self._down_since
        return OutageStats(
            outages=self._outages, probes=self._probes, down_s=down, paused=self.paused
        )

    async def wait_ready(self) -> None:
        """Return when requests may be sent; raise :class:`OutageError` once the run must stop."""
        if self._down_since is None and self.error is None:
            return
        async with self._lock:
            if self.error is not None:
                raise self.error
            if self._down_since is not None:
                await self._probe_until_up(self._down_since)

    async def check(self, exc: BaseException) -> bool:
        """After a failed request: true if it failed because the endpoint is unreachable.

        Then the item must not be charged a retry, and ``wait_ready`` pauses the next
        request. Failures that are not connection-level return false at once.
        """
        if not is_connection_level(exc):
            return False
        if self.error is not None or self._down_since is not None:
            return True
        failed_at = self._clock()
        async with self._lock:  # behind a probe, maybe behind a whole outage
            if self.error is not None or self._down_since is not None:
                return True
            if self._last_probe_at < failed_at:  # no probe since this failure: send one
                self._last_probe_up = await self._probe_once()
                self._last_probe_at = self._clock()
            if self._last_probe_up:
                return False
            self._down_since = failed_at
            self._outages += 1
            log.warning(
                "the endpoint cannot be reached (%s): pausing all requests; probing until it "
                "answers, for up to %.0f s",
                exc,
                self.outage_timeout_s,
            )
            return True

    async def _probe_once(self) -> bool:
        self._probes += 1
        try:
            await self._probe()
        except (SfbatchError, OSError) as exc:  # TimeoutError is an OSError
            log.debug("probe: %s", exc)
            return False
        return True

    async def _probe_until_up(self, down_since: float) -> None:
        wait_s = self._first_wait_s
        while True:
            left_s = self.outage_timeout_s - (self._clock() - down_since)
            if left_s <= 0:
                down_s = self._clock() - down_since
                self.error = OutageError(
                    f"the endpoint could not be reached for {down_s:.0f} s (the outage limit "
                    f"is {self.outage_timeout_s:.0f} s): check the network and the base URL, "
                    "then run the same command again to resume",
                    down_s=down_s,
                )
                raise self.error
            await self._sleep(min(wait_s, left_s))
            wait_s = min(2 * wait_s, self._max_wait_s)
            if await self._probe_once():
                now = self._clock()
                self._last_probe_at, self._last_probe_up = now, True
                self._down_s += now - down_since
                self._down_since = None
                log.warning("the endpoint answers again after %.0f s: resuming", now - down_since)
                return
