"""Retry policy: capped exponential backoff with full jitter (tenacity-style).

A :class:`RetryPolicy` is pure data plus two small functions; the generation worker owns
the loop, the sleeping and the decision of *what* is retryable (``SfbatchError.retryable``)::

    attempts = 0
    while True:
        attempts += 1
        try:
            return await client.generate(row)
        except SfbatchError as exc:
            if not exc.retryable or policy.gives_up(attempts):
                raise
        await asyncio.sleep(policy.delay_s(attempts, rng))

The random generator is passed in, never global, so a seeded ``random.Random`` makes a
run's delays reproducible and tests need no real waiting. The policy is also a part of
:class:`~sfbatch.config.RunConfig` (job-file table ``[retry]``). A 429's ``Retry-After`` is not
this module's business: :meth:`sfbatch.limiter.RateLimiter.on_rate_limited` turns it into a
cooldown shared by every worker.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from sfbatch.errors import ConfigError
from sfbatch.settings import check, setting

__all__ = ["RetryPolicy"]

# 2.0**1023 is the largest power of two a float holds; beyond it every delay is capped anyway.
_MAX_EXPONENT = 1023


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often to retry a failed request and how long to wait before each retry.

    The wait before retry ``n`` (1 for the first retry) is uniform in
    ``[0, min(cap_s, base_s * 2**(n-1))]`` ("full jitter"): workers that failed together
    spread out instead of retrying in lock-step.

    >>> policy = RetryPolicy(max_retries=3, base_s=0.5, cap_s=4.0)
    >>> [policy.max_delay_s(n) for n in range(1, 6)]
    [0.5, 1.0, 2.0, 4.0, 4.0]
    """

    SECTION: ClassVar[str] = "retry"

    max_retries: int = setting(5, help="retries of a failing request (default 5)", at_least=0)
    """Retries after the first attempt: ``max_retries=5`` allows 6 attempts in all."""
    base_s: float = setting(
        1.0, key="backoff_base_s", help="longest wait before the first retry, s", above=0
    )
    """Upper bound of the first retry's wait, in seconds; it doubles for each further retry."""
    cap_s: float = setting(
        60.0, key="backoff_cap_s", help="longest wait before any retry, s", above=0
    )
    """No wait is ever longer than this, in seconds."""

    def __post_init__(self) -> None:
        check(self)
        if self.cap_s < self.base_s:
            raise ConfigError(  # by their job keys (flags --backoff-cap, --backoff-base)
                f"backoff_cap_s ({self.cap_s:g}) must be at least backoff_base_s ({self.base_s:g})"
            )

    def max_delay_s(self, retry: int) -> float:
        """The longest wait before retry number ``retry`` (1 for the first retry).

        >>> RetryPolicy(base_s=1.0, cap_s=60.0).max_delay_s(7)
        60.0
        """
        if retry < 1:
            raise ValueError(f"retry counts from 1, got {retry!r}")
        return min(self.cap_s, self.base_s * 2.0 ** min(retry - 1, _MAX_EXPONENT))

    def delay_s(self, retry: int, rng: random.Random) -> float:
        """A random wait in ``[0, max_delay_s(retry)]`` before retry number ``retry``.

        >>> policy = RetryPolicy(base_s=1.0, cap_s=60.0)
        >>> a = policy.delay_s(3, random.Random(42))
        >>> a == policy.delay_s(3, random.Random(42)) and 0.0 <= a <= 4.0
        True
        """
        return rng.uniform(0.0, self.max_delay_s(retry))

    def gives_up(self, attempts: int) -> bool:
        """Whether ``attempts`` attempts so far (the first one included) are all there may be.

        >>> policy = RetryPolicy(max_retries=2)
        >>> [policy.gives_up(n) for n in (1, 2, 3)]
        [False, False, True]
        """
        if attempts < 0:
            raise ValueError(f"attempts must be 0 or more, got {attempts!r}")
        return attempts > self.max_retries
