"""Deadlines of many requests on one timer: :class:`Deadlines`.

``asyncio.timeout()`` and aiohttp's ``ClientTimeout`` schedule and cancel a timer per
request (and ``sock_read`` one more per network read): at thousands of requests a second,
that heap work is a measured share of the CPU (a plain aiohttp script spends 6 % less
without it). Here a request only registers its task and deadline; one timer, a few times
a second, cancels the tasks past theirs, which then raise :class:`TimeoutError` as under
``asyncio.timeout()``. A deadline fires up to a twentieth of its length late (at most
0.5 s)::

    deadlines = Deadlines()
    with deadlines.within(300.0):
        async with session.post(url, data=body) as resp:
            ...

An idle bound (``idle_s``) fails a request sooner when nothing arrives for that long: the
wait for the answer's headers, then, once the body is watched (:meth:`Deadline.watch`),
any ``idle_s`` in which its byte count does not grow. Checked on the same timer, so a
body costs nothing per read.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Protocol

__all__ = ["Deadline", "Deadlines"]

_MAX_TICK_S = 0.5
_MIN_TICK_S = 0.001


class ByteCount(Protocol):
    """What a watched body shows: the bytes received so far (aiohttp's ``StreamReader``)."""

    @property
    def total_bytes(self) -> int: ...


class Deadline:
    """One request's deadline (a ``with`` block; made by :meth:`Deadlines.within`).

    With ``idle_s`` it is the sooner of the end and ``idle_s`` after entering, or after
    the watched body last grew.
    """

    __slots__ = (
        "_body",
        "_cancelling",
        "_end",
        "_idle_s",
        "_owner",
        "_seen",
        "_task",
        "expired",
        "when",
    )

    def __init__(self, owner: Deadlines, seconds: float, idle_s: float | None) -> None:
        self._owner = owner
        self._end = seconds  # made absolute on entry
        self._idle_s = idle_s
        self._task: asyncio.Task[object] | None = None
        self._body: ByteCount | None = None
        self._seen = 0
        self._cancelling = 0
        self.expired = False
        self.when = 0.0

    def __enter__(self) -> Deadline:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline needs a running task")
        self._task = task
        self._cancelling = task.cancelling()
        loop = task.get_loop()
        now = loop.time()
        self._end += now
        self.when = self._end if self._idle_s is None else min(self._end, now + self._idle_s)
        self._owner._add(self, self.when - now, loop)
        return self

    def watch(self, body: ByteCount) -> None:
        """The headers are in: from now the idle bound waits on ``body``'s byte count."""
        self._body, self._seen = body, body.total_bytes
        if self._idle_s is not None and self._task is not None:
            self.when = min(self._end, self._task.get_loop().time() + self._idle_s)

    def _still_going(self, now: float) -> bool:
        """Past :attr:`when`: whether only the idle bound is up and the body grew since
        (then the bound counts again from ``now``)."""
        body = self._body
        if body is None or self._idle_s is None or now >= self._end:
            return False
        seen, self._seen = self._seen, body.total_bytes
        if self._seen == seen:
            return False
        self.when = min(self._end, now + self._idle_s)
        return True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._owner._active.discard(self)
        # as asyncio.timeout(): the cancel was ours unless another one came too
        if (
            self.expired
            and self._task is not None
            and self._task.uncancel() <= self._cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc

    def _expire(self) -> None:
        self.expired = True
        if self._task is not None:
            self._task.cancel()


class Deadlines:
    """The deadlines of one loop's requests, checked by one repeating timer that runs
    only while some deadline is set."""

    def __init__(self) -> None:
        self._active: set[Deadline] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._tick_s = _MAX_TICK_S

    def within(self, seconds: float, *, idle_s: float | None = None) -> Deadline:
        """A ``with`` block that raises :class:`TimeoutError` once ``seconds`` have passed,
        or ``idle_s`` with nothing arriving (see :meth:`Deadline.watch`)."""
        return Deadline(self, seconds, idle_s)

    def _add(self, deadline: Deadline, seconds: float, loop: asyncio.AbstractEventLoop) -> None:
        self._active.add(deadline)
        tick_s = min(_MAX_TICK_S, max(_MIN_TICK_S, seconds / 20))
        timer = self._timer
        if timer is not None and (tick_s < self._tick_s or self._timer_loop is not loop):
            timer.cancel()  # too far off for this deadline, or left by a loop now gone
            timer = None
        self._tick_s = min(self._tick_s, tick_s)
        if timer is None:
            self._timer = loop.call_later(self._tick_s, self._check, loop)
            self._timer_loop = loop

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        for deadline in [d for d in self._active if not d.expired and d.when <= now]:
            if not deadline._still_going(now):
                deadline._expire()
        if self._active:
            self._timer = loop.call_later(self._tick_s, self._check, loop)
