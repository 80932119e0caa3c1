"""The emulator's clock and its rate limits, per API key and per model.

SiliconFlow limits an account per model by requests per minute (RPM), images per
minute (IPM, a request costs ``batch_size`` images), requests per day (RPD) and images
per day (IPD). The emulator treats each key as an account and keeps, per (key, model)
pair, a sliding 60-second window of *admitted* requests and per-day counts; a refused
request consumes nothing. The same :class:`Limits` apply to every pair unless a model
has its own (``model_limits``) or, failing that, the key has its own (``key_limits``)::

    >>> clock = Clock()
    >>> limits = RateLimits(Limits(rpm=1), clock=clock)
    >>> limits.admit("sk-a", 1, model="m1") is None
    True
    >>> limits.admit("sk-a", 1, model="m1").details
    'RPM limit reached.'
    >>> limits.admit("sk-a", 1, model="m2") is None      # another model: its own window
    True
    >>> clock.advance(60)
    >>> limits.admit("sk-a", 1, model="m1") is None
    True

Window arithmetic is done in whole milliseconds of :meth:`Clock.mono_ms`: an event at
``t`` counts while ``now - t < 60_000``. Events in the same millisecond share one
entry, so a window holds at most 60,000 entries however fast requests arrive.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping
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
    """The limits of one (key, model) pair; ``None`` means unlimited."""

    rpm: int | None = None
    ipm: int | None = None
    ipd: int | None = None
    rpd: int | None = None

    def __post_init__(self) -> None:
        for name in ("rpm", "ipm", "ipd", "rpd"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer or None, got {value!r}")
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.rpm, self.ipm, self.ipd, self.rpd))


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused, and how long until it would be admitted."""

    limit: Literal["RPM", "IPM", "RPD", "IPD"]
    wait_s: float

    @property
    def details(self) -> str:
        """The ``Details:`` part of the 429 message, e.g. ``IPM limit reached.``"""
        return f"{self.limit} limit reached."


class _PairState:
    __slots__ = ("day", "day_images", "day_requests", "minute")

    def __init__(self) -> None:
        self.minute = SlidingWindow()
        self.day = -1
        self.day_images = 0
        self.day_requests = 0


class RateLimits:
    """RPM, IPM, RPD and IPD per (API key, model) pair, checked in that order.

    ``limits`` apply to every pair unless the model has an entry in ``model_limits``
    or, failing that, the key one in ``key_limits``; an entry replaces them whole.
    Only admitted requests are recorded, and only while a limit is set: a window
    never holds more entries than its limit, and with no limits nothing is kept.
    """

    def __init__(
        self,
        limits: Limits,
        *,
        clock: Clock,
        day_utc_offset_h: float = 8.0,
        model_limits: Mapping[str, Limits] | None = None,
        key_limits: Mapping[str, Limits] | None = None,
    ) -> None:
        self.limits = limits
        self.model_limits: dict[str, Limits] = dict(model_limits or {})
        self.key_limits: dict[str, Limits] = dict(key_limits or {})
        self._clock = clock
        self._day_offset_s = day_utc_offset_h * 3600.0
        self._pairs: dict[tuple[str, str], _PairState] = {}

    def limits_for(self, key: str, model: str) -> Limits:
        """The limits in force for ``key`` using ``model``: the most specific entry."""
        found = self.model_limits.get(model)
        if found is None:
            found = self.key_limits.get(key, self.limits)
        return found

    def day_index(self, wall: float) -> int:
        """The calendar day of epoch second ``wall`` in the configured time zone."""
        return math.floor((wall + self._day_offset_s) / _DAY_S)

    def admit(
        self, key: str, images: int, *, model: str = "", now_ms: int | None = None
    ) -> Refusal | None:
        """Admit (and record) a request of ``key`` for ``model`` costing ``images``, or say why not.

        ``now_ms`` is the clock's :meth:`Clock.mono_ms`, read now if not given.
        """
        limits = self.limits_for(key, model)
        if not limits.active:
            return None
        state = self._pairs.get((key, model))
        if state is None:
            state = self._pairs[(key, model)] = _PairState()

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
            state.day, state.day_images, state.day_requests = day, 0, 0
        next_day_s = (day + 1) * _DAY_S - self._day_offset_s
        if limits.rpd is not None and state.day_requests + 1 > limits.rpd:
            return Refusal("RPD", max(0.0, next_day_s - wall))
        if limits.ipd is not None and state.day_images + images > limits.ipd:
            return Refusal("IPD", max(0.0, next_day_s - wall))

        if limits.rpm is not None or limits.ipm is not None:
            minute.add(now_ms, images)
        state.day_images += images
        state.day_requests += 1
        return None

    def usage(self, key: str, model: str | None = None) -> dict[str, int]:
        """What ``key`` has used of ``model``'s limits (of all models' summed if ``None``).

        Requests and images in the current window, requests and images today. Only
        pairs with a limit in force are counted (nothing is recorded without one).
        """
        now_ms = self._clock.mono_ms()
        today = self.day_index(self._clock.wall())
        total = {"requests_60s": 0, "images_60s": 0, "requests_today": 0, "images_today": 0}
        for (pair_key, pair_model), state in self._pairs.items():
            if pair_key != key or (model is not None and pair_model != model):
                continue
            state.minute.prune(now_ms)
            total["requests_60s"] += state.minute.requests
            total["images_60s"] += state.minute.images
            if state.day == today:
                total["requests_today"] += state.day_requests
                total["images_today"] += state.day_images
        return total
