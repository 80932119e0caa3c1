"""How many generation requests may be in flight: fixed, or sized from the rate and latency.

The pipeline runs a fixed pool of ``max_size`` workers; each holds a slot of the window
for one request (from before the limiter until the answer)::

    window = ConcurrencyWindow(max_size=256)            # auto: the default
    window.set_target_rate(limiter_rate_per_min)        # whenever the limiter's rate moves
    await window.acquire()
    ...                                                  # limiter, request
    window.release(latency_s=generation.latency_s, outcome="ok")

**Auto.** To carry ``R`` requests a minute when each takes ``L`` seconds, about
``R / 60 * L`` must be in flight (Little's law). The window keeps that, from a recent
high percentile of latency (p90 of the last 64 answers), plus a margin (25 %) and one,
between 1 and ``max_size``. Before the first answers it assumes ``latency_prior_s`` (30 s,
a slow generation) and only grows until 8 answers are in: the first answers are the
fast ones, and sizing from them would starve the rest of the first minute.
With no target rate (nothing known, nothing learned), it is an AIMD window the way TCP
Vegas and Netflix's concurrency-limits grow theirs: +1 per answer while latency holds
(slow start: doubles per round trip), then +1 per window's worth of answers; halved on a
429, at most once per p90 latency (answers in flight together report one overload).
"Latency holds" means the median of the last 8 is at most twice the lowest seen: more
requests in flight then make the server queue, not work.

**Fixed** (``fixed=N``, ``--concurrency N``): N slots. :meth:`hint` says once when N is
what holds the rate below the target, with the size that would carry it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from sfbatch.errors import ConfigError

__all__ = ["ConcurrencyWindow", "Outcome", "WindowStatistics", "little_size"]

Outcome = Literal["ok", "rate_limited", "error"]

_MIN_SAMPLES = 8
_HOLDS_FACTOR = 2.0
# a window that carries less than this share of the target rate is the bottleneck
_BOTTLENECK = 0.9


def little_size(rate_per_min: float, latency_s: float, margin: float) -> int:
    """Requests in flight that carry ``rate_per_min`` at ``latency_s`` each, plus the margin.

    >>> little_size(300, 10.0, 0.25)   # 5 a second for 10 s, +25 %, +1
    64
    """
    return math.ceil(rate_per_min / 60.0 * latency_s * (1.0 + margin)) + 1


@dataclass(frozen=True, slots=True)
class WindowStatistics:
    """What the progress line and ``summary.json`` show about the window."""

    mode: Literal["auto", "fixed"]
    size: int
    max_size: int
    in_flight: int
    waiting: int
    latency_p90_s: float | None
    target_rate_per_min: float | None
    # the size that would carry the target rate (Little's law); None until both are known
    fills_at: int | None


class ConcurrencyWindow:
    """A resizable semaphore for requests in flight, FIFO; see the module docstring."""

    def __init__(
        self,
        *,
        fixed: int | None = None,
        max_size: int = 256,
        initial: int = 4,
        margin: float = 0.25,
        percentile: float = 0.9,
        samples: int = 64,
        latency_prior_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value in (("max_size", max_size), ("initial", initial), ("samples", samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a whole number of at least 1, got {value!r}")
        if fixed is not None and (
            isinstance(fixed, bool) or not isinstance(fixed, int) or fixed < 1
        ):
            raise ConfigError(f"concurrency must be a whole number of at least 1, got {fixed!r}")
        if not (margin >= 0 and 0 < percentile <= 1 and latency_prior_s > 0):
            raise ConfigError("margin >= 0, 0 < percentile <= 1 and latency_prior_s > 0")
        self.mode: Literal["auto", "fixed"] = "auto" if fixed is None else "fixed"
        self.max_size = max_size if fixed is None else fixed
        self._size = fixed if fixed is not None else min(initial, max_size)
        self._margin = margin
        self._percentile = percentile
        self._prior_s = latency_prior_s
        self._clock = clock
        self._latencies: deque[float] = deque(maxlen=samples)
        self._latency_s: float | None = None  # latency_s() until the next sample
        self._lowest_s = math.inf
        self._target: float | None = None
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._slow_start = True
        self._credit = 0.0  # answers towards the next +1 after slow start
        self._decreased_at = -math.inf
        self._hinted = False

    @property
    def size(self) -> int:
        return self._size

    async def acquire(self) -> None:
        """Wait for a slot (in arrival order); cancelling a waiting acquire takes none."""
        if self._in_flight < self._size and not self._waiters:
            self._in_flight += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._in_flight -= 1  # granted, then cancelled: give the slot on
                self._wake()
            elif waiter in self._waiters:  # _wake() drops cancelled waiters it meets
                self._waiters.remove(waiter)
            raise

    def release(self, *, latency_s: float | None = None, outcome: Outcome = "ok") -> None:
        """Give a slot back with what happened: the answer's latency and its kind."""
        if self._in_flight <= 0:
            raise RuntimeError("release() without a matching acquire()")
        self._in_flight -= 1
        if latency_s is not None and outcome == "ok" and latency_s >= 0:
            self._latencies.append(latency_s)
            self._latency_s = None
            self._lowest_s = min(self._lowest_s, latency_s)
        if self.mode == "auto":
            if self._target is not None:
                self._resize_from_rate()
            else:
                self._aimd(outcome)
        self._wake()

    def set_target_rate(self, requests_per_min: float | None) -> None:
        """The rate the window should carry (the limiter's), or None if none is known."""
        self._target = requests_per_min if requests_per_min and requests_per_min > 0 else None
        if self.mode == "auto" and self._target is not None:
            self._resize_from_rate()
            self._wake()

    def latency_s(self) -> float | None:
        """The recent high percentile of latency the window is sized from."""
        if self._latency_s is None and self._latencies:
            ordered = sorted(self._latencies)  # once per sample, not per call
            at = min(len(ordered) - 1, math.ceil(self._percentile * len(ordered)) - 1)
            self._latency_s = ordered[at]
        return self._latency_s

    def statistics(self) -> WindowStatistics:
        latency = self.latency_s()
        fills_at = None
        if self._target is not None and latency is not None:
            fills_at = little_size(self._target, latency, self._margin)
        return WindowStatistics(
            mode=self.mode,
            size=self._size,
            max_size=self.max_size,
            in_flight=self._in_flight,
            waiting=len(self._waiters),
            latency_p90_s=latency,
            target_rate_per_min=self._target,
            fills_at=fills_at,
        )

    def hint(self, *, limit_known: Callable[[], bool] = lambda: True) -> str | None:
        """Once: the message saying the window, not the limit, holds the rate down.
        ``limit_known`` is asked last (while it says no, the hint waits)."""
        if (  # asked after every answer: the cheap checks first
            self._hinted
            or self._target is None
            or self._size < self.max_size
            or len(self._latencies) < _MIN_SAMPLES
        ):
            return None
        stats = self.statistics()
        latency = stats.latency_p90_s
        if (
            self._hinted
            or stats.fills_at is None
            or latency is None
            or len(self._latencies) < _MIN_SAMPLES
            or self._size < self.max_size
            or stats.target_rate_per_min is None
            or self._size * 60.0 / latency >= _BOTTLENECK * stats.target_rate_per_min
            or not limit_known()
        ):
            return None
        self._hinted = True
        flag = "concurrency" if self.mode == "fixed" else "max-concurrency"
        return (
            f"{flag} {self._size} holds the rate below the limit; "
            f"about {stats.fills_at} would fill it"
        )

    def _resize_from_rate(self) -> None:
        assert self._target is not None
        if len(self._latencies) < _MIN_SAMPLES:
            latency = max(self._prior_s, self.latency_s() or 0.0)
            wanted = max(self._size, little_size(self._target, latency, self._margin))
        else:
            latency = self.latency_s() or self._prior_s
            wanted = little_size(self._target, latency, self._margin)
        self._size = max(1, min(self.max_size, wanted))

    def _aimd(self, outcome: Outcome) -> None:
        if outcome == "rate_limited":
            now = self._clock()
            if now >= self._decreased_at + (self.latency_s() or 0.0):
                self._decreased_at = now
                self._size = max(1, self._size // 2)
                self._slow_start = False
                self._credit = 0.0
            return
        if outcome != "ok":
            return
        if not self._latency_holds():
            self._slow_start = False
            return
        if self._slow_start:
            self._size = min(self.max_size, self._size + 1)
            return
        self._credit += 1.0 / self._size
        if self._credit >= 1.0:
            self._credit -= 1.0
            self._size = min(self.max_size, self._size + 1)

    def _latency_holds(self) -> bool:
        recent = list(self._latencies)[-_MIN_SAMPLES:]
        if len(recent) < _MIN_SAMPLES or not math.isfinite(self._lowest_s):
            return True
        median = sorted(recent)[len(recent) // 2]
        return median <= _HOLDS_FACTOR * max(self._lowest_s, 1e-3)

    def _wake(self) -> None:
        while self._waiters and self._in_flight < self._size:
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            self._in_flight += 1
            waiter.set_result(None)

    def __repr__(self) -> str:
        return (
            f"<ConcurrencyWindow {self.mode} size={self._size} in_flight={self._in_flight} "
            f"waiting={len(self._waiters)}>"
        )
