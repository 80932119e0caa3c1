"""Generation: one item through the daily quota, the rate limiter, the API and retries.

Errors by class (see :mod:`sfbatch.errors`):

- 400 and other 4xx: the item fails at once; a changed request is the only fix.
- 401/403, 404 on the API path: raised to the pipeline, which stops the job (exit 3).
- 429: the whole engine slows down (:meth:`RateLimiter.on_rate_limited`) and the item
  waits its turn again; these retries are counted apart from ``max_retries``.
- 429 naming a daily limit, or our own ``ipd`` reached: raised, the pipeline stops
  taking new work and lets in-flight items land (exit 4).
- 5xx, reset, timeout, malformed 200: exponential backoff with full jitter, up to
  ``max_retries``; then the last error is raised for the item to be recorded ``failed``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sfbatch.client import Generation, SiliconFlowClient
from sfbatch.errors import BadRequestError, QuotaReachedError, RateLimitError, SfbatchError
from sfbatch.inputs import materialize
from sfbatch.limiter import RateLimiter
from sfbatch.loader import Row
from sfbatch.manifest import day_start_iso
from sfbatch.retry import RetryPolicy

__all__ = ["DailyQuota", "Generator", "Stopped", "WorkItem"]

# A 429 storm that never clears is still an error, not an infinite loop.
_MAX_RATE_LIMITED_RETRIES = 1000


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

    ``sleep`` (the wait between retries) and ``rng`` (their jitter) are injectable, so tests
    need no real waiting.
    """

    def __init__(
        self,
        *,
        client: SiliconFlowClient,
        limiter: RateLimiter,
        retry: RetryPolicy,
        quota: DailyQuota | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self._client = client
        self._limiter = limiter
        self._retry = retry
        self._quota = quota
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._stopping = stopping
        self.requests = 0
        self.retries = 0
        self.rate_limited = 0

    async def generate(self, item: WorkItem) -> None:
        """Generate ``item`` (again, if its URLs expired), with the row's own seed.

        On return ``item.generation`` is the new generation; ``attempts``,
        ``billed_images`` and ``rate_limited`` count what it took, also when it raises.
        Raises :class:`Stopped` instead of sending once the run is stopping.
        """
        request = item.row.request
        if request is None:
            raise ValueError(f"row {item.row.id} is invalid and cannot be generated")
        batch = item.batch_size
        failures = 0
        while True:
            if self._quota is not None:
                self._quota.reserve(batch)
            billed = 0
            try:
                await self._limiter.acquire(batch)
                if self._stopping():
                    raise Stopped
                # Local input images become data URIs only now, so no row holds their bytes.
                body = await materialize(request, item.row.inputs) if item.row.inputs else request
                item.attempts += 1
                self.requests += 1
                generation = await self._client.generate(body)
                billed = batch
                self._limiter.on_success()
                item.billed_images += batch
                item.generation, item.expired = generation, False
                return
            except RateLimitError as exc:
                if not exc.retryable:
                    raise  # a daily limit
                self.rate_limited += 1
                item.rate_limited += 1
                self._limiter.on_rate_limited(exc.retry_after_s)
                if item.rate_limited > _MAX_RATE_LIMITED_RETRIES:
                    raise
            except BadRequestError:
                raise
            except SfbatchError as exc:
                if not exc.retryable:
                    raise
                failures += 1
                if self._retry.gives_up(failures):
                    raise
                self.retries += 1
                await self._sleep(self._retry.delay_s(failures, self._rng))
            finally:
                if self._quota is not None:
                    self._quota.settle(batch, billed)
