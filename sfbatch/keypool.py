"""One rate limiter and one daily quota per (API key, model); work goes to a key with room.

SiliconFlow limits each account per model (RPM, IPM, IPD). A run may hold several keys
(``SILICONFLOW_API_KEYS=key1,key2``) of separate accounts; ``--rpm/--ipm/--ipd`` apply
to each (key, model), a job file may override them per model. One key is the common case
and behaves exactly like one :class:`~sfbatch.limiter.RateLimiter` plus one
:class:`~sfbatch.generator.DailyQuota`::

    pool = KeyPool(keys=3, limits=ModelLimits(ipm=60, ipd=400))
    lease = await pool.acquire("Kwai-Kolors/Kolors", images=1)   # waits for the soonest key
    client = clients[lease.key_index]
    try:
        generation = await client.generate(request)
    except RateLimitError as exc:
        pool.on_rate_limited(lease, retry_after_s=exc.retry_after_s, limit=exc.limit,
                             daily=isinstance(exc, DailyQuotaError))
    else:
        pool.on_success(lease)

Every lease is settled exactly once (:meth:`KeyPool.on_success`,
:meth:`KeyPool.on_rate_limited` or :meth:`KeyPool.on_error`), which settles its daily
quota reservation. A key that reaches its daily quota for a model (our ``ipd``, or a 429
naming IPD/RPD) is set aside for that model; a key whose balance is gone (403) for every
model; the others go on. When no key can go on for a model, :meth:`KeyPool.acquire` raises
:class:`NoKeyLeftError` (exit 4 when a daily quota is why, resumable tomorrow; exit 5
when only balances are). Leases and statistics name a key by its position in the key
list (``key_index``), never by any part of the key.

Choosing: one waiter at a time per model (a FIFO lock) asks every usable key's limiter how long
until it would admit (:meth:`RateLimiter.delay_s`, which consumes nothing), sleeps until
the soonest (woken early by any settled lease or set-aside key, so a key that a 429
cools down never holds the others up), checks again and is admitted by that key's
limiter. With one usable key it waits in that limiter's :meth:`~RateLimiter.acquire`
directly, whose late-timer credit then applies. Ties go to the key used least recently,
so equal keys share the work evenly.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from sfbatch.errors import ConfigError, QuotaReachedError
from sfbatch.generator import DailyQuota
from sfbatch.limiter import RateLimiter, Ticket

__all__ = ["KeyPool", "KeyStatistics", "Lease", "ModelLimits", "NoKeyLeftError", "SetAside"]

SetAside = Literal["daily_quota", "balance"]

_DAILY_LIMITS = frozenset({"IPD", "RPD"})
# a key whose quota is all reserved by requests in flight may get some back
_RESERVED_RECHECK_S = 1.0
# how many of a (key, model)'s first answers say whether answers take seconds: one slow
# answer among fast ones (a loaded machine, a GC pause) is no reason to probe
_PROBE_DECIDED_AFTER = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelLimits:
    """The limits of one (key, model); ``None`` is unknown (rpm/ipm learned) or unlimited."""

    rpm: float | None = None
    ipm: float | None = None
    ipd: int | None = None

    def __post_init__(self) -> None:
        if self.ipd is not None and (
            isinstance(self.ipd, bool) or not isinstance(self.ipd, int) or self.ipd < 1
        ):
            raise ConfigError(f"ipd must be a whole number of at least 1, got {self.ipd!r}")


@dataclass(slots=True, eq=False)
class Lease:
    """One admitted request: which key sends it, for which model, and its limiter ticket."""

    key_index: int
    model: str
    images: int
    ticket: Ticket
    settled: bool = field(default=False, repr=False)


class NoKeyLeftError(QuotaReachedError):
    """No key can go on for a model: each reached its daily quota or its balance."""

    def __init__(self, message: str, *, reason: SetAside) -> None:
        super().__init__(message)
        self.reason: SetAside = reason

    @property
    def exit_code(self) -> int:
        """4: resumable tomorrow (a daily quota); 5: every key's balance is gone."""
        return 4 if self.reason == "daily_quota" else 5


@dataclass(frozen=True, slots=True)
class KeyStatistics:
    """One (key, model) of the pool, for the progress line and ``summary.json``."""

    key_index: int
    model: str
    set_aside: SetAside | None
    acquires: int
    rate_limited: int
    target_rate_per_min: float | None
    images_today: int | None


class _Slot:
    __slots__ = (
        "acquires",
        "answers",
        "last_used",
        "limiter",
        "quickest_s",
        "quota",
        "rate_limited",
    )

    def __init__(self, limiter: RateLimiter, quota: DailyQuota | None) -> None:
        self.limiter = limiter
        self.quota = quota
        self.last_used = -1
        self.acquires = 0
        self.rate_limited = 0
        self.answers = 0  # answered 200, with a latency
        self.quickest_s = float("inf")


class KeyPool:
    """Limiters and daily quotas per (key index, model), created on first use."""

    def __init__(
        self,
        *,
        keys: int,
        limits: ModelLimits,
        per_model: Mapping[str, ModelLimits] | None = None,
        max_batch_size: int = 1,
        probe: bool = False,
        probe_after_latency_s: float | None = None,
        used_today: Callable[[int, str], int] = lambda key_index, model: 0,
        utc_offset_h: float = 8.0,
        models: Sequence[str] = (),
    ) -> None:
        if isinstance(keys, bool) or not isinstance(keys, int) or keys < 1:
            raise ConfigError(f"a key pool needs at least one key, got {keys!r}")
        self.keys = keys
        self._limits = limits
        self._per_model = dict(per_model or {})
        self._max_batch_size = max_batch_size
        self._probe = probe
        self._probe_after_latency_s = probe_after_latency_s
        self._used_today = used_today
        self._utc_offset_h = utc_offset_h
        self._slots: dict[tuple[int, str], _Slot] = {}
        self._aside: dict[tuple[int, str | None], SetAside] = {}
        self._turnstiles: dict[str, asyncio.Lock] = {}
        self._asked: set[str] = set()
        self._turn = itertools.count()
        self._changed: set[asyncio.Event] = set()
        for model_limits in (limits, *self._per_model.values()):
            # fail at start, not at the first row: a batch that can never fit
            RateLimiter(rpm=model_limits.rpm, ipm=model_limits.ipm, max_batch_size=max_batch_size)
        # the run's models known up front: the window has a target rate from the start
        for key_index, model in itertools.product(range(keys), models):
            self._slot(key_index, model)

    def limits_for(self, model: str) -> ModelLimits:
        return self._per_model.get(model, self._limits)

    def limiter(self, key_index: int, model: str) -> RateLimiter:
        """The limiter of (key, model), created on first use."""
        return self._slot(key_index, model).limiter

    def check_batch_size(self, model: str, batch_size: int) -> None:
        """:class:`ConfigError` if a request of ``batch_size`` can never fit ``model``'s limits."""
        self.limiter(0, model).check_batch_size(batch_size)

    async def acquire(self, model: str, images: int = 1) -> Lease:
        """Wait for the soonest key with room for ``images`` of ``model``; reserve and admit.

        Raises :class:`NoKeyLeftError` when every key is set aside for ``model``, and
        :class:`ConfigError` if ``images`` can never fit its limits.
        """
        self.check_batch_size(model, images)
        self._asked.add(model)
        turnstile = self._turnstiles.get(model)
        if turnstile is None:
            turnstile = self._turnstiles[model] = asyncio.Lock()
        async with turnstile:
            while True:
                soonest: tuple[float, int, int] | None = None
                busy = False
                usable = 0
                for key_index in range(self.keys):
                    if self.set_aside_reason(key_index, model) is not None:
                        continue
                    slot = self._slot(key_index, model)
                    quota = slot.quota
                    if quota is not None and quota.used + images > quota.limit:
                        self.set_aside(key_index, "daily_quota", model=model)
                        continue
                    if quota is not None and quota.remaining < images:
                        busy = True  # reserved by requests in flight: some may come back
                        continue
                    usable += 1
                    choice = (slot.limiter.delay_s(images), slot.last_used, key_index)
                    soonest = choice if soonest is None else min(soonest, choice)
                if soonest is None:
                    if not busy:
                        raise self._no_key_left(model)
                    await self._wait_for_change(_RESERVED_RECHECK_S)
                    continue
                delay_s, _, key_index = soonest
                if delay_s > 0 and (usable > 1 or busy):
                    # another key may come first (a 429 cools this one down, a key is set
                    # aside): wait here, where any change wakes us, not in one limiter
                    await self._wait_for_change(delay_s)
                    continue
                lease = await self._admit(key_index, model, images)
                if self.set_aside_reason(lease.key_index, model) is None:
                    return lease
                self._settle(lease, billed=False)  # set aside while it waited: not sent

    def on_success(self, lease: Lease, *, latency_s: float | None = None) -> None:
        """The request was answered 200 after ``latency_s``: its images are billed.

        When the first answers of the key for the model (4) all took
        ``probe_after_latency_s`` or longer, its limiter starts probing if nothing is known
        of its limits (:meth:`RateLimiter.probe_unknown`).
        """
        slot = self._settle(lease, billed=True)
        if slot is None:
            return
        slot.limiter.on_success(ticket=lease.ticket)
        after = self._probe_after_latency_s
        if after is None or latency_s is None or slot.answers >= _PROBE_DECIDED_AFTER:
            return
        slot.answers += 1
        slot.quickest_s = min(slot.quickest_s, latency_s)
        if slot.answers == _PROBE_DECIDED_AFTER and slot.quickest_s >= after:
            slot.limiter.probe_unknown()

    def on_rate_limited(
        self,
        lease: Lease,
        *,
        retry_after_s: float | None = None,
        limit: str | None = None,
        daily: bool = False,
    ) -> None:
        """A 429. One naming a daily limit (IPD/RPD, or ``daily``) sets the key aside for
        the model; any other slows that key's limiter for the model down."""
        slot = self._settle(lease, billed=False)
        if slot is None:
            return
        slot.rate_limited += 1
        if daily or (limit or "").upper() in _DAILY_LIMITS:
            self.set_aside(lease.key_index, "daily_quota", model=lease.model)
        else:
            slot.limiter.on_rate_limited(retry_after_s, limit=limit, ticket=lease.ticket)

    def on_error(self, lease: Lease, *, billed: bool = False) -> None:
        """Any other answer (or none): settle the quota; ``billed`` if it was paid for."""
        self._settle(lease, billed=billed)

    def set_aside(self, key_index: int, reason: SetAside, *, model: str | None = None) -> None:
        """Send nothing more with this key: for ``model``, or for every model (``None``)."""
        if not 0 <= key_index < self.keys:
            raise IndexError(f"key_index {key_index} out of range 0..{self.keys - 1}")
        self._aside.setdefault((key_index, model), reason)
        self._notify()

    def set_aside_reason(self, key_index: int, model: str) -> SetAside | None:
        return self._aside.get((key_index, None)) or self._aside.get((key_index, model))

    def used_models(self) -> list[str]:
        """The models some key was asked for (by :meth:`acquire`) so far."""
        return sorted(self._asked)

    def can_go_on(self, model: str) -> bool:
        """Whether some key is not set aside for ``model``."""
        return any(self.set_aside_reason(k, model) is None for k in range(self.keys))

    def target_rate_per_min(self) -> float | None:
        """Requests per minute the usable (key, model) limiters aim for together.

        What the :class:`~sfbatch.concurrency.ConcurrencyWindow` is sized for; None when
        one of them has no rate (nothing limits it).
        """
        total = 0.0
        for (key_index, model), slot in self._slots.items():
            if self.set_aside_reason(key_index, model) is not None:
                continue
            # called after every answer: O(1), never the limiter's statistics() (a scan)
            rate = slot.limiter.target_rate_per_min(slot.limiter.images_per_request)
            if rate is None:
                return None
            total += rate
        return total or None

    def knows_its_limits(self) -> bool:
        """Whether no usable (key, model) limiter is probing an unknown limit: the rate
        aimed for is a limit, told or learned, not a try at one."""
        return not any(
            slot.limiter.probing
            for (key_index, model), slot in self._slots.items()
            if self.set_aside_reason(key_index, model) is None
        )

    def statistics(self) -> list[KeyStatistics]:
        return [
            KeyStatistics(
                key_index=key_index,
                model=model,
                set_aside=self.set_aside_reason(key_index, model),
                acquires=slot.acquires,
                rate_limited=slot.rate_limited,
                target_rate_per_min=slot.limiter.target_rate_per_min(),
                images_today=None if slot.quota is None else slot.quota.used,
            )
            for (key_index, model), slot in sorted(self._slots.items())
        ]

    def _slot(self, key_index: int, model: str) -> _Slot:
        slot = self._slots.get((key_index, model))
        if slot is None:
            limits = self.limits_for(model)
            limiter = RateLimiter(
                rpm=limits.rpm,
                ipm=limits.ipm,
                max_batch_size=self._max_batch_size,
                probe=self._probe,
            )
            quota = None
            if limits.ipd is not None:
                quota = DailyQuota(
                    limit=limits.ipd,
                    used=self._used_today(key_index, model),
                    utc_offset_h=self._utc_offset_h,
                )
            slot = self._slots[(key_index, model)] = _Slot(limiter, quota)
        return slot

    async def _admit(self, key_index: int, model: str, images: int) -> Lease:
        slot = self._slot(key_index, model)
        if slot.quota is not None:
            slot.quota.reserve(images)
        try:
            ticket = await slot.limiter.acquire(images)
        except BaseException:
            if slot.quota is not None:
                slot.quota.settle(images, 0)
            raise
        slot.last_used = next(self._turn)
        slot.acquires += 1
        return Lease(key_index=key_index, model=model, images=images, ticket=ticket)

    def _settle(self, lease: Lease, *, billed: bool) -> _Slot | None:
        if lease.settled:
            return None
        lease.settled = True
        slot = self._slot(lease.key_index, lease.model)
        if slot.quota is not None:
            slot.quota.settle(lease.images, lease.images if billed else 0)
        self._notify()
        return slot

    async def _wait_for_change(self, timeout_s: float) -> None:
        """Sleep ``timeout_s``, or less if a lease settles or a key is set aside."""
        changed = asyncio.Event()
        self._changed.add(changed)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout_s)
        finally:
            self._changed.discard(changed)

    def _notify(self) -> None:
        for changed in self._changed:
            changed.set()

    def _no_key_left(self, model: str) -> NoKeyLeftError:
        """Why no key can go on; exit 4 (tomorrow) when any key is only out for the day."""
        reasons = [self.set_aside_reason(k, model) for k in range(self.keys)]
        reason: SetAside = "daily_quota" if "daily_quota" in reasons else "balance"
        what = {"daily_quota": "has reached its daily quota", "balance": "has reached its balance"}
        if self.keys == 1:
            why = f"the key {what[reason]}"
        elif len(set(reasons)) == 1:
            why = f"each of the {self.keys} keys {what[reason]}"
        else:
            why = "; ".join(f"key #{k} {what[r]}" for k, r in enumerate(reasons) if r is not None)
        return NoKeyLeftError(
            f"no key can go on with {model}: {why}"
            + ("; run again tomorrow to resume" if reason == "daily_quota" else ""),
            reason=reason,
        )
