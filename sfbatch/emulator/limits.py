"""The emulator's clock and its per-key rate limits.

SiliconFlow limits an account by requests per minute (RPM), images per minute (IPM,
a request costs ``batch_size`` images) and images per day (IPD). The emulator keeps,
per API key, a sliding 60-second window of *admitted* requests and a per-day image
count; a refused request consumes nothing::

    >>> clock = Clock()
    >>> limits = RateLimits(Limits(rpm=1), clock=clock)
    >>> limits.admit("sk-a", 1) is None
    True
    >>> limits.admit("sk-a", 1).details
    'RPM limit reached.'
    >>> clock.advance(60)
    >>> limits.admit("sk-a", 1) is None
    True

Window arithmetic is done in whole milliseconds of :meth:`Clock.mono_ms`: an event at
``t`` counts while ``now - t < 60_000``. Events in the same millisecond share one
entry, so a window holds at most 60,000 entries however fast requests arrive.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

__all__ = ["WINDOW_MS", "Clock", "Limits", "RateLimits", "Refusal", "SlidingWindow"]

WINDOW_MS = 60_000
_DAY_S = 86_400


class Clock:
    """The emulator's time: the real clocks plus an offset that only moves forward.

    :meth:`advance` moves both the wall clock (URL expiry, the IPD day) and the
    monotonic clock (the sliding windows), so tests never sleep.
    """

    __slots__ = ("offset_s",)

    def __init__(self) -> None:
        self.offset_s = 0.0

    def wall(self) -> float:
        """Epoch seconds, as the emulator sees them."""
        return time.time() + self.offset_s

    def mono(self) -> float:
        """Monotonic seconds, as the emulator sees them."""
        return time.monotonic() + self.offset_s

    def mono_ms(self) -> int:
        return int(self.mono() * 1000)

    def advance(self, seconds: float) -> None:
        """Jump ``seconds`` into the future."""
        if not seconds >= 0:
            raise ValueError(f"the clock only moves forward, got {seconds!r}")
        self.offset_s += seconds


class SlidingWindow:
    """Requests and their cost (images) admitted in the last 60 s."""

    __slots__ = ("_entries", "images", "requests")

    def __init__(self) -> None:
        # Each entry is [t_ms, requests, images]; lists so the newest can grow in place.
        self._entries: deque[list[int]] = deque()
        self.requests = 0
        self.images = 0

    def prune(self, now_ms: int) -> None:
        """Forget what fell out of the window ending at ``now_ms``."""
        horizon = now_ms - WINDOW_MS
        entries = self._entries
        while entries and entries[0][0] <= horizon:
            _, requests, images = entries.popleft()
            self.requests -= requests
            self.images -= images

    def add(self, now_ms: int, images: int) -> None:
        """Record one request costing ``images`` at ``now_ms``."""
        entries = self._entries
        if entries and entries[-1][0] == now_ms:
            entries[-1][1] += 1
            entries[-1][2] += images
        else:
            entries.append([now_ms, 1, images])
        self.requests += 1
        self.images += images

    def ms_until(
        self, now_ms: int, *, requests: int | None = None, images: int | None = None
    ) -> int:
        """Milliseconds until the window holds at most ``requests`` requests and ``images`` images.

        Call after :meth:`prune`. 0 if it already does; a full window if it never will
        (a negative target).
        """
        excess_requests = self.requests - requests if requests is not None else 0
        excess_images = self.images - images if images is not None else 0
        if excess_requests <= 0 and excess_images <= 0:
            return 0
        for t_ms, n_requests, n_images in self._entries:
            excess_requests -= n_requests
            excess_images -= n_images
            if excess_requests <= 0 and excess_images <= 0:
                return t_ms + WINDOW_MS - now_ms
        return WINDOW_MS


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Per-key limits; ``None`` means unlimited."""

    rpm: int | None = None
    ipm: int | None = None
    ipd: int | None = None

    def __post_init__(self) -> None:
        for name in ("rpm", "ipm", "ipd"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer or None, got {value!r}")
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")

    @property
    def active(self) -> bool:
        return self.rpm is not None or self.ipm is not None or self.ipd is not None


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused, and how long until it would be admitted."""

    limit: Literal["RPM", "IPM", "IPD"]
    wait_s: float

    @property
    def details(self) -> str:
        """The ``Details:`` part of the 429 message, e.g. ``IPM limit reached.``"""
        return f"{self.limit} limit reached."


class _KeyState:
    __slots__ = ("day", "day_images", "minute")

    def __init__(self) -> None:
        self.minute = SlidingWindow()
        self.day = -1
        self.day_images = 0


class RateLimits:
    """RPM, IPM and IPD per API key, checked in that order.

    Only admitted requests are recorded, and only while a limit is set: a window
    never holds more entries than its limit, and with no limits nothing is kept.
    """

    def __init__(self, limits: Limits, *, clock: Clock, day_utc_offset_h: float = 8.0) -> None:
        self.limits = limits
        self._clock = clock
        self._day_offset_s = day_utc_offset_h * 3600.0
        self._keys: dict[str, _KeyState] = {}

    def day_index(self, wall: float) -> int:
        """The calendar day of epoch second ``wall`` in the configured time zone."""
        return math.floor((wall + self._day_offset_s) / _DAY_S)

    def admit(self, key: str, images: int, *, now_ms: int | None = None) -> Refusal | None:
        """Admit (and record) a request costing ``images``, or say why not.

        ``now_ms`` is the clock's :meth:`Clock.mono_ms`, read now if not given.
        """
        limits = self.limits
        if not limits.active:
            return None
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _KeyState()

        if now_ms is None:
            now_ms = self._clock.mono_ms()
        minute = state.minute
        minute.prune(now_ms)
        if limits.rpm is not None and minute.requests + 1 > limits.rpm:
            wait_ms = minute.ms_until(now_ms, requests=limits.rpm - 1)
            return Refusal("RPM", wait_ms / 1000)
        if limits.ipm is not None and minute.images + images > limits.ipm:
            wait_ms = minute.ms_until(now_ms, images=limits.ipm - images)
            return Refusal("IPM", wait_ms / 1000)

        wall = self._clock.wall()
        day = self.day_index(wall)
        if state.day != day:
            state.day, state.day_images = day, 0
        if limits.ipd is not None and state.day_images + images > limits.ipd:
            next_day_s = (day + 1) * _DAY_S - self._day_offset_s
            return Refusal("IPD", max(0.0, next_day_s - wall))

        if limits.rpm is not None or limits.ipm is not None:
            minute.add(now_ms, images)
        state.day_images += images
        return None

    def usage(self, key: str) -> dict[str, int]:
        """What ``key`` has used: requests and images in the current window, images today."""
        state = self._keys.get(key)
        if state is None:
            return {"requests_60s": 0, "images_60s": 0, "images_today": 0}
        state.minute.prune(self._clock.mono_ms())
        today = state.day_images if state.day == self.day_index(self._clock.wall()) else 0
        return {
            "requests_60s": state.minute.requests,
            "images_60s": state.minute.images,
            "images_today": today,
        }
