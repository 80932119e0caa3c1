"""Generation: one item through the window, the key pool, the API and retries.

Errors by class (see :mod:`sfbatch.errors`):

- 400 and other 4xx: the item fails at once; a changed request is the only fix.
- 401, 404 on the API path: raised to the pipeline, which stops the job (exit 3).
- 403 30003 (:class:`ModelDisabledError`): the item fails; the pipeline fails the model's
  later rows without sending them.
- 403 balance/verification: that key is set aside; raised when no key is left (exit 5).
- connection-level failure while the endpoint cannot be reached: not the item's; the
  :class:`~sfbatch.outage.OutageDetector` pauses every worker (exit 5 if it lasts).
- 429: that key's limiter for the model slows down (:meth:`KeyPool.on_rate_limited`) and the item
  waits its turn again; these retries are counted apart from ``max_retries``.
- 429 naming a daily limit, or our own ``ipd`` reached: the key is set aside for the
  model; when none is left :class:`NoKeyLeftError` is raised, the pipeline stops
  taking new work and lets in-flight items land (exit 4).
- 5xx, reset, timeout, malformed 200: exponential backoff with full jitter, up to
  ``max_retries``; then the last error is raised for the item to be recorded ``failed``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sfbatch.client import Generation, SiliconFlowClient
from sfbatch.concurrency import ConcurrencyWindow
from sfbatch.concurrency import Outcome as WindowOutcome
from sfbatch.errors import (
    AccountBlockedError,
    BadRequestError,
    QuotaReachedError,
    RateLimitError,
    SfbatchError,
    TransportError,
)
from sfbatch.inputs import materialize
from sfbatch.loader import Row
from sfbatch.manifest import day_start_iso
from sfbatch.models import DEFAULT_MODEL
from sfbatch.outage import OutageDetector
from sfbatch.retry import RetryPolicy

if TYPE_CHECKING:
    from sfbatch.keypool import KeyPool, Lease

__all__ = ["DailyQuota", "Generator", "Stopped", "WorkItem"]

# A 429 storm that never clears is still an error, not an infinite loop.
_MAX_RATE_LIMITED_RETRIES = 1000
# An attempt's answer "try again at once": no backoff, not a failure of the item.
_AT_ONCE = -1.0

log = logging.getLogger("sfbatch")


class Stopped(Exception):
    """The run is stopping: the request was not sent, so nothing was paid for."""


@dataclass(slots=True)
class WorkItem:
    """A row on its way through the pipeline, with what happened to it so far."""

    row: Row
    started: float = field(default_factory=time.monotonic)
    attempts: int = 0
    billed_images: int = 0
    rate_limited: int = 0
    generation: Generation | None = None
    # When an earlier run made ``generation`` (epoch s), if it came from the manifest.
    pending_at: float = 0.0
    # ``generation``'s URLs expired before its images were downloaded: generate again.
    expired: bool = False
    regenerations: int = 0
    # The position in the key list of the key that sent the last request (never the key).
    key_index: int | None = None

    @property
    def model(self) -> str:
        request = self.row.request or {}
        model: str = request.get("model", DEFAULT_MODEL)
        return model

    @property
    def batch_size(self) -> int:
        request = self.row.request or {}
        size: int = request.get("batch_size", 1)
        return size


class DailyQuota:
    """The images-per-day budget of the account's day (``utc_offset_h``, default UTC+8).

    ``used`` starts from what the manifest says was billed today; requests reserve
    their images before they are sent and give them back if they are not billed.
    """

    def __init__(self, *, limit: int, used: int, utc_offset_h: float) -> None:
        self.limit = limit
        self.used = used
        self._reserved = 0
        self._offset_h = utc_offset_h
        self._day = day_start_iso(utc_offset_h)

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used - self._reserved)

    def reserve(self, images: int) -> None:
        day = day_start_iso(self._offset_h)
        if day != self._day:  # a new day began during the run
            self._day, self.used = day, 0
        if self.used + self._reserved + images > self.limit:
            raise QuotaReachedError(
                f"daily quota of {self.limit} images used up ({self.used} billed today); "
                "run again tomorrow to resume"
            )
        self._reserved += images

    def settle(self, reserved: int, billed: int) -> None:
        self._reserved -= reserved
        self.used += billed


class Generator:
    """Gives a :class:`WorkItem` its :class:`Generation`, or raises why not.

    Each request holds a slot of ``window`` (requests in flight), then a lease of
    ``pool`` (the soonest key with room under its limits for the row's model), and is
    sent with that key's client (``clients[lease.key_index]``). ``outage`` (if given)
    is awaited before each request and told of connection-level failures, which are
    then not charged to the item. ``sleep`` (the wait between retries) and ``rng``
    (their jitter) are injectable, so tests need no real waiting.
    """

    def __init__(
        self,
        *,
        clients: Sequence[SiliconFlowClient],
        pool: KeyPool,
        retry: RetryPolicy,
        window: ConcurrencyWindow | None = None,
        outage: OutageDetector | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        if len(clients) != pool.keys:
            raise ValueError(f"{len(clients)} clients for a pool of {pool.keys} keys")
        self._clients = tuple(clients)
        self._pool = pool
        self._retry = retry
        self._window = window
        self._outage = outage
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._stopping = stopping
        self.requests = 0
        self.retries = 0
        self.rate_limited = 0
        self.outage_failures = 0  # connection-level failures during an outage: not charged
        # tasks waiting for a lease (the limiter's pace) -> whether stop_waiting woke them
        self._leasing: dict[asyncio.Task[Any], bool] = {}

    def stop_waiting(self) -> None:
        """The run stops: requests still waiting for a lease will not be sent, so end their
        waits now (each raises :class:`Stopped`) rather than when the limiter's pace would
        have let them go, which can be long after the in-flight work has landed."""
        for task, woken in self._leasing.items():
            if not woken:
                self._leasing[task] = True
                task.cancel()

    async def _lease(self, model: str, batch: int) -> Lease:
        """A lease from the pool, or :class:`Stopped` if the run stops meanwhile."""
        if self._stopping():
            raise Stopped
        task = asyncio.current_task()
        assert task is not None
        self._leasing[task] = False
        try:
            return await self._pool.acquire(model, batch)
        except asyncio.CancelledError:
            if self._leasing[task] and task.uncancel() == 0:
                raise Stopped from None  # woken by stop_waiting, not cancelled from outside
            raise
        finally:
            del self._leasing[task]

    @property
    def pool(self) -> KeyPool:
        return self._pool

    async def generate(self, item: WorkItem) -> None:
        """Generate ``item`` (again, if its URLs expired), with the row's own seed.

        On return ``item.generation`` is the new generation; ``attempts``,
        ``billed_images`` and ``rate_limited`` count what it took, also when it raises.
        Raises :class:`Stopped` instead of sending once the run is stopping,
        :class:`~sfbatch.keypool.NoKeyLeftError` when no key can go on for the model,
        :class:`~sfbatch.errors.AccountBlockedError` when the last key's balance is gone
        and :class:`~sfbatch.errors.OutageError` when an outage outlasts its limit.
        """
        request = item.row.request
        if request is None:
            raise ValueError(f"row {item.row.id} is invalid and cannot be generated")
        batch = item.batch_size
        model = item.model
        failures = 0
        while True:
            if self._outage is not None:
                await self._outage.wait_ready()
            if self._stopping():
                raise Stopped
            backoff_s = await self._attempt(item, request, model, batch, failures)
            if backoff_s is None:
                return
            if backoff_s != _AT_ONCE:
                failures += 1
                self.retries += 1
                await self._sleep(backoff_s)

    async def _attempt(
        self, item: WorkItem, request: dict[str, Any], model: str, batch: int, failures: int
    ) -> float | None:
        """One try: ``None`` when ``item`` is generated, else the wait before the next
        (``_AT_ONCE``: again at once, not a failure of the item); raises what ends the item."""
        window = self._window
        if window is not None:
            await window.acquire()
        latency_s: float | None = None
        outcome: WindowOutcome = "error"
        lease: Lease | None = None
        try:
            lease = await self._lease(model, batch)
            if self._stopping():
                raise Stopped
            # Local input images become data URIs only now, so no row holds their bytes.
            body = await materialize(request, item.row.inputs) if item.row.inputs else request
            item.attempts += 1
            item.key_index = lease.key_index
            self.requests += 1
            generation = await self._clients[lease.key_index].generate(body)
            self._pool.on_success(lease, latency_s=generation.latency_s)
            item.billed_images += batch
            item.generation, item.expired = generation, False
            latency_s, outcome = generation.latency_s, "ok"
            return None
        except RateLimitError as exc:
            assert lease is not None
            outcome = "rate_limited"
            daily = not exc.retryable
            self._pool.on_rate_limited(
                lease, retry_after_s=exc.retry_after_s, limit=exc.limit, daily=daily
            )
            if daily:
                return _AT_ONCE  # key set aside for the model: acquire() says if any is left
            self.rate_limited += 1
            item.rate_limited += 1
            if item.rate_limited > _MAX_RATE_LIMITED_RETRIES:
                raise
            return _AT_ONCE
        except AccountBlockedError as exc:
            assert lease is not None
            self._pool.on_error(lease)
            if self._pool.set_aside_reason(lease.key_index, model) is None:
                self._pool.set_aside(lease.key_index, "balance")
                if self._pool.keys == 1:
                    raise  # its own words (balance, verification): the run stops on them
                log.warning("key #%d set aside: %s", lease.key_index, exc)
            return _AT_ONCE  # the next lease says whether any key is left, and why not
        except BadRequestError:
            raise
        except TransportError as exc:
            if self._outage is not None and await self._outage.check(exc):
                self.outage_failures += 1
                return _AT_ONCE  # the endpoint is down, not the item: wait_ready() pauses
            return self._backoff(failures, exc)
        except SfbatchError as exc:
            if not exc.retryable:
                raise
            return self._backoff(failures, exc)
        finally:
            if lease is not None:
                self._pool.on_error(lease)  # no-op if already settled
            if window is not None:
                window.release(latency_s=latency_s, outcome=outcome)
                window.set_target_rate(self._pool.target_rate_per_min())
                # "about N would fill it" is of a limit, not of a probe's try at one
                if (hint := window.hint(limit_known=self._pool.knows_its_limits)) is not None:
                    log.info("%s", hint)

    def _backoff(self, failures: int, exc: SfbatchError) -> float:
        if not exc.retryable or self._retry.gives_up(failures + 1):
            raise exc
        return self._retry.delay_s(failures + 1, self._rng)
