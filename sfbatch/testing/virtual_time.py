"""An event loop on a virtual clock, for tests and benchmarks that simulate minutes or days.

:class:`VirtualTimeLoop`'s ``time()`` jumps straight to the next timer whenever every task
is waiting, so ``asyncio.sleep``, ``loop.call_later`` and the timers of libraries such as
aiolimiter all follow the same clock: ten simulated minutes take milliseconds, and nothing
depends on how loaded the machine is. Sockets are real: I/O that is ready is served first,
and time moves only when nothing is ready.

    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        runner.run(scenario())

Against the emulator in the same loop, :func:`emulator_on_loop_clock` points the emulator's
sliding windows at that clock too: the HTTP is real, only the waiting is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import selectors
from collections.abc import Iterator
from typing import Any

from sfbatch.emulator.limits import Clock

__all__ = ["VirtualTimeLoop", "emulator_on_loop_clock"]

#: How far a loop may run before it is taken for one that waits forever: a simulated week.
HORIZON_S = 7 * 24 * 3600.0


class _FastForwardSelector(selectors.DefaultSelector):
    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        ready: list[Any] = super().select(0)
        if ready:
            return ready
        if timeout is None:
            raise RuntimeError("deadlock: every task is waiting and no timer is set")
        self._loop.advance(timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` only moves when all tasks wait for a timer."""

    def __init__(self) -> None:
        self._now = 1000.0
        super().__init__(_FastForwardSelector(self))

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` on (subclasses may make timers late)."""
        # always move by at least one ulp, so a timer due "now" can never spin forever
        self._now = max(self._now + seconds, math.nextafter(self._now, math.inf))
        if self._now > HORIZON_S:
            raise RuntimeError("virtual time ran past a simulated week: something waits forever")


@contextlib.contextmanager
def emulator_on_loop_clock() -> Iterator[None]:
    """Within: every emulator's monotonic clock (its rate windows) is the running loop's."""
    real = Clock.mono

    def loop_mono(clock: Clock) -> float:
        return asyncio.get_running_loop().time() + clock.offset_s

    setattr(Clock, "mono", loop_mono)  # noqa: B010 - a method, swapped back on exit
    try:
        yield
    finally:
        setattr(Clock, "mono", real)  # noqa: B010
