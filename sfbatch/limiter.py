"""Per-account rate limiting shared by all generation workers of one run.

Every worker calls ``await limiter.acquire(images=batch_size)`` before each request, then
reports the answer: :meth:`RateLimiter.on_success` or :meth:`RateLimiter.on_rate_limited`.

What it guarantees, for each configured limit (``rpm`` requests, ``ipm`` images per minute):

* **No start-up burst, over any window.** Requests are paced by a leaky bucket that holds
  only one request's worth (1 request; ``max_batch_size`` images, or ``ipm`` if smaller),
  draining at the configured rate times ``safety``. ``asyncio.sleep`` wakes up late
  (about 0.9 ms per 100 ms interval); if that time were lost for good, ``rpm=600`` would
  pace at 98.5 % of the limit instead of 99.5 %. So a waiter whose timer fired late is
  counted as admitted on time: the bucket may drain below empty by that lateness, up to
  a credit of 5 % of one request's worth, and the next admission makes it up. Only timer
  lateness earns credit, not idle time or waiting for another gate. Over any window of
  ``w`` seconds at most ``rate * w / 60`` plus one request's worth is admitted, plus
  at most the credit (exactly: ``rate / 60`` times the lateness of the window's first
  admission). A plain ``AsyncLimiter(n, 60)`` would let a whole minute's worth through
  at once.
* **Never more than the limit in any minute.** A small bucket alone still allows
  ``ipm + max_batch_size`` images per minute when batches are larger than one (4-image
  requests at ``ipm=10`` would go at 0 s, 24 s and 48 s: 12 images), and its credit
  could add up to 5 % of a request more. So each limit also keeps a log of the last
  minute's admissions (at their actual times) and never lets it exceed the limit: the
  credit makes up for late wake-ups but no ``60 / safety`` seconds ever go over the limit.
* **Margin.** Pacing runs at ``safety`` (99.5 %) of the limit and the minute log spans
  ``60 / safety`` seconds (60.3 s): timing jitter of up to 0.3 s between us and a server
  that counts exactly ``rpm`` per sliding 60 s does not cause a 429.
* **A batch that can never fit is an error, not a hang.** All of a request's images count
  in the same instant, so a request of ``n`` images needs ``n <= ipm``;
  :meth:`RateLimiter.check_batch_size` (and ``acquire``) raise :class:`ConfigError` otherwise.

After a 429 the whole engine slows down, and the limit the 429 named is **learned**:

* A shared **cooldown**: no request is admitted until it ends. It lasts ``Retry-After``
  when the server sent one (at most an hour), else 1 s doubling per consecutive 429, at
  most 8 s. 429s of requests that were in flight together count as one.
* **The limit is what the server held.** A server counting a sliding minute refuses
  exactly when its minute is full, so the limit is what we had admitted in the minute
  before the refused request and that was not refused itself. ``acquire`` returns a
  :class:`Ticket`; handed back with the 429 it makes that count exact (the refused
  request is marked and taken out of the minute log: the server did not count it).
  Without a ticket the minute before the 429's arrival is counted. The 429 names the
  limit (``limit="IPM"`` or ``"RPM"``); if it names none, both are learned. Not a rate
  from a 1-2 s burst (2,162/min against a limit of 120), not a halving: the limit itself.
  Within a minute of a lesson, later lessons only lower it (requests in flight together
  report one overrun, some late). The known limit is then the lower of the configured
  and the learned one, with the same minute log as a configured limit; the bucket of a
  learned limit runs at twice its rate, because the server's minute frees up as fast
  as the probe filled it (pacing at the limit would leave the next minute at 73 %).
  A learned limit used for a whole minute without a 429 is raised 2 %, so a lesson made
  too low (another process on the same key) recovers; each such probe costs about one
  429 a minute and a half (0.7 % of requests at IPM 120).
* **Probing an unknown limit** (``probe=True``): an unconfigured limit does not start
  unlimited but at 30 a minute, doubling every 15 s in which it was used at least half.
  The first 429 then finds the server's minute filled over about a minute, not in a few
  seconds: the minute after it frees up as steadily as it filled, and sending never
  stops for long. Against the emulator at IPM 120 and 8 s latency, told nothing: every
  trailing minute holds >= 90 % of the limit from 60 s on, 0.7 % 429s, the longest
  pause 2.2 s (without the probe: 105 s, a 28 s pause). ``probe=False`` (the default, as
  before) starts unlimited until the first 429; :meth:`RateLimiter.probe_unknown` starts
  the probe later (the key pool calls it once answers take seconds), from the rate
  admitted so far.

How it is built: a FIFO lock lets one waiter at a time through the gates (cooldown,
adaptive leaky buckets, minute logs). Each gate says how long until it admits the request
without consuming anything; the waiter sleeps that long and checks again, and only when
all are open does it record the admission in all of them in one step. Waiting in one
gate therefore never spends capacity in another, a 429 during the sleep is seen before
admission, and a cancelled waiter leaves nothing behind. aiolimiter's ``AsyncLimiter``,
holding one request's worth plus the credit and draining at each configured limit (not
the paced rate, so it never adds a second late sleep), is acquired at that instant as a
hard ceiling: the adaptive buckets never run faster than it, so it only waits if the
adaptive logic is wrong. Why not simply ``await rpm.acquire(); await ipm.acquire(n)``: an
``AsyncLimiter`` cannot wait without taking capacity, so the first records an admission
that the second may then delay, and with mixed batch sizes two requests can go out closer
together than one request interval. And its rate cannot be changed once built (rebuilding
empties the bucket: a burst), which is why the adaptive rate lives in the small
:class:`_LeakyBucket` here.

All timing uses the running loop's clock (``loop.time()``, ``asyncio.sleep``), like
aiolimiter; tests run it in an event loop with virtual time.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from aiolimiter import AsyncLimiter

from sfbatch.errors import ConfigError

__all__ = ["RateLimiter", "Ticket"]

_MINUTE_S = 60.0
# A probing (unknown) limit starts here and doubles every step in which it was used at
# least half: a minute's worth is then spread over about a minute, not sent in seconds.
_PROBE_START_PER_MIN = 30.0
_PROBE_STEP_S = 15.0
_PROBE_USED = 0.5
# A learned limit that was used for a whole minute without a 429 is raised this much:
# another process sharing the key may have made the lesson too low.
_LEARNED_GROWTH = 1.02
_HISTORY_S = 61.0
_LEARNED_BURST = 2.0
# A server counting a sliding minute refuses for up to a minute after being overrun,
# however slowly we go now: 429s in that minute are no news about the lowered rate.
_HOLD_S = 60.0
_BACKOFF_BASE_S = 1.0
_BACKOFF_CAP_S = 8.0
_MAX_COOLDOWN_S = 3600.0
# Float rounding can leave a wait of a few nanoseconds; don't sleep for those.
_EPSILON_S = 1e-9
# How far below empty a leaky bucket may drain, as a fraction of its capacity: a waiter
# that wakes up late (asyncio.sleep always does, by ~1 % of a 100 ms interval) gets the
# time back on the next admission instead of losing it for good.
_CREDIT = 0.05


class _LeakyBucket:
    """Holds up to ``capacity``, drains ``per_minute`` per minute; ``None`` is unlimited.

    An admission by a waiter whose timer fired ``late_s`` late may find the bucket drained
    below empty by that lateness, up to ``credit`` (``_CREDIT * capacity``): the admission
    is counted as if it had happened on time, so a late wake-up's lost time is made up by
    the next admission rather than lost for good. Idle time, or time spent waiting for
    another gate, earns no credit. The level never goes below ``-credit``, so over any
    window of ``w`` seconds it admits at most ``per_minute * w / 60 + capacity + credit``
    (more exactly, ``per_minute / 60`` times ``w`` plus the first admission's lateness).
    """

    __slots__ = ("_at", "_level", "capacity", "credit", "per_minute")

    def __init__(self, capacity: float, per_minute: float | None) -> None:
        self.capacity = capacity
        self.credit = capacity * _CREDIT
        self.per_minute = per_minute
        self._level = 0.0
        self._at = -math.inf

    def _level_at(self, now: float, floor: float = 0.0) -> float:
        if self.per_minute is None or self._level <= floor:
            return self._level
        elapsed = max(0.0, now - self._at)
        return max(floor, self._level - elapsed * self.per_minute / _MINUTE_S)

    def delay_s(self, amount: float, now: float) -> float:
        if self.per_minute is None:
            return 0.0
        excess = self._level_at(now) + amount - self.capacity
        return max(0.0, excess * _MINUTE_S / self.per_minute)

    def add(self, amount: float, now: float, late_s: float = 0.0) -> None:
        if self.per_minute is not None:
            credit = min(self.credit, max(0.0, late_s) * self.per_minute / _MINUTE_S)
            self._level = self._level_at(now, -credit) + amount
            self._at = now

    def set_rate(self, per_minute: float | None, now: float) -> None:
        self._level = self._level_at(now)
        self._at = now
        self.per_minute = per_minute


class _MinuteLog:
    """At most ``limit`` admitted in any ``window_s`` seconds."""

    __slots__ = ("_log", "_total", "limit", "window_s")

    def __init__(self, limit: float, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._log: deque[tuple[float, float]] = deque()
        self._total = 0.0

    def _expire(self, now: float) -> None:
        while self._log and self._log[0][0] + self.window_s - now <= _EPSILON_S:
            self._total -= self._log.popleft()[1]

    def delay_s(self, amount: float, now: float) -> float:
        self._expire(now)
        excess = self._total + amount - self.limit
        if excess <= 0:
            return 0.0
        for at, admitted in self._log:
            excess -= admitted
            if excess <= 0:
                return at + self.window_s - now
        raise AssertionError(f"{amount} can never fit a limit of {self.limit}")  # see check

    def add(self, amount: float, now: float) -> None:
        self._expire(now)
        self._log.append((now, amount))
        self._total += amount

    def remove(self, amount: float, at: float) -> None:
        """Forget one admission of ``amount`` at ``at``, if still in the log."""
        try:
            self._log.remove((at, amount))
        except ValueError:
            return
        self._total -= amount


class _Limit:
    """One per-minute limit (requests or images): pacing at the known limit, or probing.

    The known limit is the lower of the configured one and the one learned from 429s.
    Known: a bucket at ``known * safety`` plus a minute log that never holds more than
    ``known``. Unknown: unlimited, or with ``probe`` a bucket that starts at
    ``_PROBE_START_PER_MIN`` and doubles every ``_PROBE_STEP_S`` that it was used.
    """

    __slots__ = (
        "_backstop",
        "_safety",
        "bucket",
        "capacity",
        "configured",
        "learned",
        "learned_at",
        "log",
        "probe_from",
    )

    def __init__(
        self, *, configured: float | None, capacity: float, safety: float, probe: bool
    ) -> None:
        self.configured = configured
        self.capacity = capacity
        self._safety = safety
        self.learned: float | None = None
        self.learned_at = -math.inf
        self.log: _MinuteLog | None = None
        # when the probing rate last changed; None when not probing
        self.probe_from: float | None = None
        self.bucket = _LeakyBucket(capacity, None)
        self._backstop: AsyncLimiter | None = None
        if configured is not None:
            self._set_known(configured, now=-math.inf, history=())
            # At the configured rate, not the paced one, so it never adds a second (late)
            # sleep. It holds the bucket's credit too: both get the same admissions, it
            # drains faster and its floor (0) is the bucket's (-credit) plus the credit, so
            # its level never exceeds the bucket's plus the credit, and it has capacity
            # whenever the bucket admits. Any w seconds: at most configured * w / 60 plus
            # 1.05 requests' worth.
            backstop_capacity = capacity * (1.0 + _CREDIT)
            self._backstop = AsyncLimiter(
                backstop_capacity, backstop_capacity * _MINUTE_S / configured
            )
        elif probe:
            self.bucket.set_rate(max(_PROBE_START_PER_MIN, capacity), -math.inf)
            self.probe_from = -math.inf

    @property
    def per_minute(self) -> float | None:
        return self.bucket.per_minute

    @property
    def unlimited(self) -> bool:
        """Nothing paces this limit now: not known, not probing (so no log, no ceiling)."""
        return self.bucket.per_minute is None and self.log is None

    @property
    def known(self) -> float | None:
        rates = [rate for rate in (self.configured, self.learned) if rate is not None]
        return min(rates) if rates else None

    def _set_known(self, known: float, now: float, history: Iterable[tuple[float, float]]) -> None:
        self.probe_from = None
        self.bucket.set_rate(self._pace(known), now)
        # below 1 per minute the bucket alone paces; the log must still admit one request
        self.log = _MinuteLog(max(known, self.capacity, 1.0), _MINUTE_S / self._safety)
        for at, amount in history:
            self.log.add(amount, at)

    def _pace(self, known: float) -> float:
        """The bucket's rate: ``safety`` of a configured limit; twice a learned one.

        When a limit is learned, the server's minute holds what was sent while probing, at
        up to twice the limit's rate; the server admits again as that ages out, and the
        minute log lets the same amounts through as they do. A bucket at the limit would
        hold that back and the next minute would fall short (73 % instead of 100 %).
        """
        if self.configured is None:
            return known * self._safety * _LEARNED_BURST
        return min(known * _LEARNED_BURST, self.configured) * self._safety

    def start_probe(self, now: float, from_per_minute: float) -> bool:
        """Probe this limit from now, at ``from_per_minute`` or the probe's start rate if
        higher, when nothing is known of it (not configured, not learned, not probing)."""
        if self.known is not None or self.probe_from is not None:
            return False
        self.bucket.set_rate(max(_PROBE_START_PER_MIN, self.capacity, from_per_minute), now)
        self.probe_from = now
        return True

    def delay_s(self, amount: float, now: float) -> float:
        delay = self.bucket.delay_s(amount, now)
        if self.log is not None:
            delay = max(delay, self.log.delay_s(amount, now))
        return delay

    def add(self, amount: float, now: float, late_s: float) -> None:
        self.bucket.add(amount, now, late_s)
        if self.log is not None:
            self.log.add(amount, now)

    def refund(self, amount: float, at: float) -> None:
        """The server refused what was admitted at ``at``: it does not count in its minute."""
        if self.log is not None:
            self.log.remove(amount, at)

    async def acquire_ceiling(self, amount: float) -> None:
        if self._backstop is not None:
            await self._backstop.acquire(amount)

    def learn(self, admitted: float, now: float, history: Iterable[tuple[float, float]]) -> bool:
        """A 429 named this limit while the server held ``admitted`` of ours in its minute.

        That amount is the limit (a sliding-window server refuses exactly when its minute
        is full). 429s within a minute of the last lesson can only lower it: requests in
        flight together report one overrun, some of them late. True if the limit changed.
        """
        estimate = max(admitted, self.capacity)
        if self.learned is not None and now < self.learned_at + _HOLD_S:
            estimate = min(estimate, self.learned)
        if self.configured is not None and estimate >= self.configured:
            estimate_known = self.configured
        else:
            estimate_known = estimate
        changed = estimate_known != self.known
        self.learned, self.learned_at = estimate, now
        self._set_known(estimate_known, now, history)
        return changed

    def growth_due(self, now: float) -> float | None:
        """The window (s) whose use :meth:`grow` needs now, or None if no step is due."""
        if self.probe_from is not None:
            return _PROBE_STEP_S if now >= self.probe_from + _PROBE_STEP_S else None
        if self.learned is not None and now >= self.learned_at + _MINUTE_S:
            return _MINUTE_S
        return None

    def grow(self, now: float, used: float) -> None:
        """Probe upward: double a used probing rate; raise a used learned limit by 2 %.

        ``used`` is what was admitted over the last ``_PROBE_STEP_S`` (probing) or the last
        minute (learned). An unused rate says nothing about the server, so it stays.
        """
        rate = self.per_minute
        if self.probe_from is not None and rate is not None:
            if now >= self.probe_from + _PROBE_STEP_S:
                self.probe_from = now
                if used >= _PROBE_USED * rate * _PROBE_STEP_S / _MINUTE_S:
                    self.bucket.set_rate(rate * 2.0, now)
        elif self.learned is not None and now >= self.learned_at + _MINUTE_S:
            self.learned_at = now
            if used >= _PROBE_USED * self.learned and (
                self.configured is None or self.learned < self.configured
            ):
                self.learned *= _LEARNED_GROWTH
                known = self.known
                assert known is not None
                self.bucket.set_rate(self._pace(known), now)
                if self.log is not None:
                    self.log.limit = max(known, self.capacity, 1.0)


def _check_rate(name: str, value: float | None) -> None:
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{name} must be a positive number per minute or None, got {value!r}")


def batch_fit_problem(batch_size: int, ipm: float | None) -> str | None:
    """Why a request of ``batch_size`` images can never fit an ``ipm`` limit, or ``None``.

    >>> batch_fit_problem(2, 2) is None and batch_fit_problem(4, None) is None
    True
    >>> print(batch_fit_problem(3, 2))  # doctest: +ELLIPSIS
    batch_size 3 can never fit an images-per-minute limit of 2: all of a request's images ...
    """
    if ipm is None or batch_size <= ipm:
        return None
    return (
        f"batch_size {batch_size} can never fit an images-per-minute limit of {ipm:g}: "
        f"all of a request's images count in the same minute, so it needs "
        f"ipm >= batch_size; lower the batch_size or raise the ipm limit"
    )


@dataclass(slots=True, eq=False)
class Ticket:
    """One admission by :meth:`RateLimiter.acquire`: when, and how many images.

    Hand it back with the answer (``on_success(ticket=...)``, ``on_rate_limited(...,
    ticket=...)``): a refused request is then taken out of the minute's count, and the
    limit is learned from exactly what the server held when it refused.
    """

    at: float
    images: int
    refused: bool = False


class RateLimiter:
    """Requests-per-minute and images-per-minute limits shared by a pool of workers.

    Create one per run and per event loop; ``None`` means no known limit (it is then
    learned from 429s; with ``probe=True`` the rate meanwhile starts low and doubles, so
    the first 429 does not find a minute's worth sent in a few seconds). See the module
    docstring for the exact guarantees::

        limiter = RateLimiter(rpm=60, ipm=120, max_batch_size=4)
        limiter.check_batch_size(4)          # at start: ConfigError if it can never fit
        ...
        ticket = await limiter.acquire(images=4)    # in each worker, before each request
    """

    def __init__(
        self,
        *,
        rpm: float | None,
        ipm: float | None,
        max_batch_size: int = 1,
        safety: float = 0.995,
        probe: bool = False,
    ) -> None:
        _check_rate("rpm", rpm)
        _check_rate("ipm", ipm)
        if (
            isinstance(max_batch_size, bool)
            or not isinstance(max_batch_size, int)
            or max_batch_size < 1
        ):
            raise ConfigError(
                f"max_batch_size must be a whole number of at least 1, got {max_batch_size!r}"
            )
        if isinstance(safety, bool) or not isinstance(safety, int | float) or not 0 < safety <= 1:
            raise ConfigError(f"safety must be in (0, 1], got {safety!r}")
        self._max_batch_size = max_batch_size
        image_capacity = float(max_batch_size if ipm is None else min(max_batch_size, ipm))
        self._requests = _Limit(configured=rpm, capacity=1.0, safety=safety, probe=probe)
        self._images = _Limit(configured=ipm, capacity=image_capacity, safety=safety, probe=probe)
        self._turnstile = asyncio.Lock()
        self._cooldown_until = -math.inf
        self._consecutive_429 = 0
        # a request went out since the last 429: a new one is not just its in-flight sibling
        self._fresh = True
        # every admission of the last minute (and a little more), refused ones marked
        self._history: deque[Ticket] = deque()
        self._first_admitted_at: float | None = None
        self._acquires = 0
        self._images_admitted = 0
        self._waiting = 0
        self._wait_s_total = 0.0
        self._rate_limited = 0
        self._decreases = 0
        self._successes = 0

    def check_batch_size(self, batch_size: int) -> None:
        """Raise :class:`ConfigError` if a request of ``batch_size`` images can never be admitted.

        A request's images all count at once, so it needs ``batch_size <= ipm``; it must
        also fit the ``max_batch_size`` the limiter was built for.

        >>> limiter = RateLimiter(rpm=None, ipm=2, max_batch_size=4)
        >>> limiter.check_batch_size(2)
        >>> limiter.check_batch_size(4)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        sfbatch.errors.ConfigError: batch_size 4 can never fit an images-per-minute limit of 2: ...
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(
                f"batch_size must be a whole number of at least 1, got {batch_size!r}"
            )
        unfit = batch_fit_problem(batch_size, self._images.configured)
        if unfit is not None:
            raise ConfigError(unfit)
        if batch_size > self._max_batch_size:
            raise ConfigError(
                f"batch_size {batch_size} is larger than max_batch_size {self._max_batch_size} "
                f"the rate limiter was sized for: build it with the largest batch_size of the run"
            )

    async def acquire(self, images: int = 1) -> Ticket:
        """Wait until one request of ``images`` images may be sent, and count it as sent.

        Waiters are admitted in arrival order. Cancelling a waiting ``acquire`` uses up
        nothing. Raises :class:`ConfigError` at once if ``images`` can never fit
        (see :meth:`check_batch_size`). Returns the admission's :class:`Ticket`::

            ticket = await limiter.acquire(images=row.batch_size)
            response = await client.generate(row)
        """
        self.check_batch_size(images)
        loop = asyncio.get_running_loop()
        started = loop.time()
        if (
            self._requests.unlimited
            and self._images.unlimited
            and started >= self._cooldown_until
            and not self._turnstile.locked()
        ):
            # every gate is open and nobody waits: what the loop below would do at once
            return self._admit(images, started, late_s=0.0)
        self._waiting += 1
        try:
            async with self._turnstile:
                wake_at = math.inf  # when the last sleep should have ended
                while True:
                    now = loop.time()
                    delay = self._delay_s(images, now)
                    if delay > _EPSILON_S:
                        wake_at = now + delay
                        await asyncio.sleep(delay)
                        continue
                    # the ceilings have capacity whenever the gates are open (they only
                    # wait if the adaptive logic is wrong), so this does not suspend; if it
                    # does, a 429 may have come meanwhile, and its cooldown comes first
                    await self._requests.acquire_ceiling(1)
                    await self._images.acquire_ceiling(images)
                    now = loop.time()
                    if self._delay_s(images, now) <= _EPSILON_S:
                        break
                # a late timer's lost time (at most the buckets' credit) is made up
                ticket = self._admit(images, now, late_s=max(0.0, now - wake_at))
        finally:
            self._waiting -= 1
        self._wait_s_total += now - started
        return ticket

    def delay_s(self, images: int = 1) -> float:
        """Seconds until a request of ``images`` would be admitted if nobody else asks.

        Consumes nothing; a key pool asks each of its limiters and picks the soonest.
        """
        now = self._now()
        return max(0.0, self._delay_s(images, now))

    @property
    def images_per_request(self) -> float:
        """Mean images per admitted request so far (1.0 before the first); O(1)."""
        return self._images_admitted / self._acquires if self._acquires else 1.0

    @property
    def probing(self) -> bool:
        """Whether a limit is being probed: its rate is a try, not a known limit."""
        return self._requests.probe_from is not None or self._images.probe_from is not None

    def target_rate_per_min(self, images_per_request: float = 1.0) -> float | None:
        """The requests per minute this limiter may admit now (its buckets' rates).

        What a :class:`~sfbatch.concurrency.ConcurrencyWindow` is sized for; None while
        nothing limits the rate. For a learned limit that is twice the limit: after the
        lesson the server's minute frees up as fast as the probe filled it, and a window
        sized for the limit alone would not carry that (the minute log keeps the limit).

        >>> RateLimiter(rpm=None, ipm=120, max_batch_size=4).target_rate_per_min(2.0)
        59.7
        """
        rates = []
        for limit, per_request in ((self._requests, 1.0), (self._images, images_per_request)):
            if limit.per_minute is not None:
                rates.append(limit.per_minute / max(per_request, 1e-9))
        return min(rates) if rates else None

    def on_rate_limited(
        self,
        retry_after_s: float | None = None,
        *,
        limit: str | None = None,
        ticket: Ticket | None = None,
    ) -> None:
        """Slow every worker down after a 429: shared cooldown, then the learned limit.

        ``retry_after_s`` is the server's ``Retry-After`` in seconds, if it sent one;
        ``limit`` the limit the 429 named (``"RPM"``, ``"IPM"``, ...; ``None`` if it named
        none: both are learned); ``ticket`` what :meth:`acquire` returned for the request::

            except RateLimitError as exc:
                limiter.on_rate_limited(exc.retry_after_s, limit=exc.limit, ticket=ticket)
        """
        now = self._now()
        self._rate_limited += 1
        if self._fresh:
            self._fresh = False
            self._consecutive_429 += 1
        if ticket is not None and not ticket.refused:
            ticket.refused = True
            self._requests.refund(1, ticket.at)
            self._images.refund(ticket.images, ticket.at)
        # what the server held of ours in its minute when it refused: the limit
        at = ticket.at if ticket is not None else now
        requests, images = self._held_before(at, exclude=ticket)
        named = (limit or "").upper()
        changed = False
        if named != "IPM":
            history = [(t.at, 1.0) for t in self._history if not t.refused]
            changed |= self._requests.learn(requests, now, history)
        if named != "RPM":
            history = [(t.at, float(t.images)) for t in self._history if not t.refused]
            changed |= self._images.learn(images, now, history)
        if changed:
            self._decreases += 1
        if retry_after_s is not None and math.isfinite(retry_after_s) and retry_after_s >= 0:
            pause_s = min(float(retry_after_s), _MAX_COOLDOWN_S)
        else:
            exponent = max(self._consecutive_429, 1) - 1
            pause_s = min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2.0 ** min(exponent, 32))
        self._cooldown_until = max(self._cooldown_until, now + pause_s)

    def probe_unknown(self) -> bool:
        """Start probing (see ``probe=True``) when no limit is known: none configured,
        none learned, none probing. From the rate admitted over the last minute, if higher
        than the probe's start, so a run that was going fast is not cut back. True if it
        started.

        A run told nothing starts unlimited, which keeps one whose answers come in
        milliseconds fast; once answers take seconds, an unlimited window would fill the
        server's minute in a burst and then stall, so its owner calls this.
        """
        if any(
            limit.known is not None or limit.probe_from is not None
            for limit in (self._requests, self._images)
        ):
            return False
        now = self._now()
        observed_rpm, observed_ipm = self._observed(now)
        started = self._requests.start_probe(now, observed_rpm or 0.0)
        started |= self._images.start_probe(now, observed_ipm or 0.0)
        return started

    def on_success(self, *, ticket: Ticket | None = None) -> None:
        """Report a successful request: ends a run of 429s.

        ::

            response = await client.generate(row)
            limiter.on_success(ticket=ticket)
        """
        del ticket  # accepted for symmetry with on_rate_limited; nothing to undo
        self._successes += 1
        self._consecutive_429 = 0

    def statistics(self) -> dict[str, float | int | bool | None]:
        """Counters and current rates, for progress lines and tests. Rates are per minute.

        >>> stats = RateLimiter(rpm=60, ipm=None).statistics()
        >>> stats["effective_rpm"], stats["effective_ipm"], stats["cooldown_active"]
        (59.7, None, False)
        """
        now = self._now()
        observed_rpm, observed_ipm = self._observed(now)
        return {
            "rpm_limit": self._requests.configured,
            "ipm_limit": self._images.configured,
            "learned_rpm": self._requests.learned,
            "learned_ipm": self._images.learned,
            "probing": self._requests.probe_from is not None or self._images.probe_from is not None,
            "effective_rpm": self._requests.per_minute,
            "effective_ipm": self._images.per_minute,
            "observed_rpm": observed_rpm,
            "observed_ipm": observed_ipm,
            "acquires": self._acquires,
            "images": self._images_admitted,
            "waiting": self._waiting,
            "wait_s_total": self._wait_s_total,
            "rate_limited": self._rate_limited,
            "rate_decreases": self._decreases,
            "consecutive_rate_limited": self._consecutive_429,
            "successes": self._successes,
            "cooldown_active": now < self._cooldown_until,
            "cooldown_remaining_s": max(0.0, self._cooldown_until - now),
        }

    def _delay_s(self, images: int, now: float) -> float:
        self._grow(now)
        return max(
            self._cooldown_until - now,
            self._requests.delay_s(1, now),
            self._images.delay_s(images, now),
        )

    def _grow(self, now: float) -> None:
        for limit, images in ((self._requests, False), (self._images, True)):
            window_s = limit.growth_due(now)
            if window_s is not None:
                used = sum(
                    (t.images if images else 1)
                    for t in self._history
                    if t.at > now - window_s and not t.refused
                )
                limit.grow(now, used)

    def _admit(self, images: int, now: float, late_s: float) -> Ticket:
        self._requests.add(1, now, late_s)
        self._images.add(images, now, late_s)
        ticket = Ticket(now, images)
        self._history.append(ticket)
        self._expire(now)
        if self._first_admitted_at is None:
            self._first_admitted_at = now
        self._fresh = True
        self._acquires += 1
        self._images_admitted += images
        return ticket

    def _expire(self, now: float) -> None:
        while self._history and self._history[0].at <= now - _HISTORY_S:
            self._history.popleft()

    def _held_before(self, at: float, exclude: Ticket | None) -> tuple[float, float]:
        """Requests and images admitted in the minute before ``at`` and not refused."""
        requests = images = 0.0
        for t in self._history:
            if at - _MINUTE_S < t.at <= at and not t.refused and t is not exclude:
                requests += 1
                images += t.images
        return requests, images

    def _observed(self, now: float) -> tuple[float | None, float | None]:
        """Requests and images per minute admitted over the last minute (or since the start)."""
        self._expire(now)
        recent = [t for t in self._history if t.at > now - _MINUTE_S]
        if not recent or self._first_admitted_at is None:
            return None, None
        span_s = max(1.0, min(_MINUTE_S, now - self._first_admitted_at))
        per_minute = _MINUTE_S / span_s
        return len(recent) * per_minute, sum(t.images for t in recent) * per_minute

    @staticmethod
    def _now() -> float:
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:
            # outside a loop (e.g. statistics() from a sync caller): the default loops' clock
            return time.monotonic()

    def __repr__(self) -> str:
        return (
            f"<RateLimiter rpm={self._requests.per_minute!r} ipm={self._images.per_minute!r} "
            f"waiting={self._waiting}>"
        )
