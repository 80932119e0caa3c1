#!/usr/bin/env python3
"""Issue 12's quota figures that need only the limiter, the window and the key pool.

A small driver of its own (not yet the engine: the pipeline wiring comes next) runs a
fixed pool of workers gated by a :class:`ConcurrencyWindow`, leases from a
:class:`KeyPool` and sends with :class:`SiliconFlowClient` to the emulator in this
process over 127.0.0.1:

- **quota fill**: latency 10 ± 5 s, IPM 300, 150 prompts, told ``ipm=300``: auto window
  vs fixed concurrency 4 and 64;
- **unknown limit**: IPM 120, latency 8 s, told nothing: time until every trailing
  minute holds >= 90 % of the limit, 429 share, longest stall; with and without
  Retry-After; against today's learning without the probe, and told 4x the limit;
- **three keys** of IPM 60: the total against 180/min, and key 1 running out of its
  daily quota mid-run while keys 0 and 2 go on.

``--time virtual`` (the default) runs the event loop on a virtual clock that jumps to
the next timer whenever every task waits, and points the emulator's sliding windows at
that clock: the HTTP, the emulator and the client are real, only waiting is skipped
(all figures in about 5 s). ``--time real`` runs the same on the wall clock (about
5 minutes, the scenarios at once)::

    python benchmarks/bench_quota.py                 # virtual time
    python benchmarks/bench_quota.py --time real     # wall clock
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sfbatch.client import SiliconFlowClient
from sfbatch.concurrency import ConcurrencyWindow
from sfbatch.emulator import Emulator, EmulatorConfig
from sfbatch.emulator import limits as emulator_limits
from sfbatch.errors import DailyQuotaError, RateLimitError
from sfbatch.keypool import KeyPool, ModelLimits, NoKeyLeftError
from sfbatch.testing.virtual_time import VirtualTimeLoop

MODEL = "Kwai-Kolors/Kolors"


def loop_time() -> float:
    return asyncio.get_running_loop().time()


@dataclass
class Trace:
    """What the driver saw: every send (time, key), every accepted send, every 429."""

    start: float = 0.0
    sends: list[tuple[float, int]] = field(default_factory=list)
    accepted: list[tuple[float, int]] = field(default_factory=list)
    refused: int = 0
    finished: float = 0.0
    window_sizes: list[int] = field(default_factory=list)
    hint: str | None = None


async def drive(
    emu: Emulator,
    keys: Sequence[str],
    pool: KeyPool,
    window: ConcurrencyWindow,
    *,
    prompts: int | None,
    duration_s: float,
) -> Trace:
    """The wiring the pipeline will get: max_size workers, each gated by the window."""
    trace = Trace(start=loop_time())
    counter = itertools.count()
    stop_at = trace.start + duration_s
    clients = [SiliconFlowClient(base_url=emu.base_url, api_key=key) for key in keys]
    for client in clients:
        await client.__aenter__()

    async def worker() -> None:
        while True:
            await window.acquire()
            item = next(counter)
            if (prompts is not None and item >= prompts) or loop_time() >= stop_at:
                window.release(outcome="error")
                return
            while True:
                try:
                    lease = await pool.acquire(MODEL)
                except NoKeyLeftError:
                    window.release(outcome="error")
                    return
                sent_at = loop_time()
                trace.sends.append((sent_at - trace.start, lease.key_index))
                try:
                    await clients[lease.key_index].generate({"model": MODEL, "prompt": "x"})
                except RateLimitError as exc:
                    trace.refused += 1
                    pool.on_rate_limited(
                        lease,
                        retry_after_s=exc.retry_after_s,
                        limit=getattr(exc, "limit", None),  # the robust helper adds it
                        daily=isinstance(exc, DailyQuotaError),
                    )
                    window.release(outcome="rate_limited")
                    window.set_target_rate(pool.target_rate_per_min())
                    await window.acquire()
                    continue
                pool.on_success(lease)
                trace.accepted.append((sent_at - trace.start, lease.key_index))
                window.release(latency_s=loop_time() - sent_at, outcome="ok")
                window.set_target_rate(pool.target_rate_per_min())
                trace.window_sizes.append(window.size)
                trace.hint = trace.hint or window.hint()
                break

    window.set_target_rate(pool.target_rate_per_min())
    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(window.max_size):
                group.create_task(worker())
    finally:
        for client in clients:
            await client.close()
    trace.finished = loop_time() - trace.start
    return trace


def held(times: Sequence[float], at: float) -> int:
    return sum(1 for t in times if at - 60.0 < t <= at)


def sustained_from(times: Sequence[float], limit: float, end: float) -> float:
    """First second from which every trailing minute until ``end`` holds >= 90 % of limit."""
    first = math.inf
    for second in range(int(end), 59, -1):
        if held(times, float(second)) < 0.9 * limit:
            break
        first = float(second)
    return first


def longest_stall_s(trace: Trace) -> float:
    times = [0.0, *sorted(t for t, _ in trace.sends)]
    return max(b - a for a, b in itertools.pairwise(times))


# --- the figures ------------------------------------------------------------------------


async def quota_fill(fixed: int | None) -> dict[str, Any]:
    config = EmulatorConfig(
        host="127.0.0.1", port=0, ipm=300, latency_s=10.0, latency_jitter_s=5.0, seed=1
    )
    async with Emulator(config) as emu:
        pool = KeyPool(keys=1, limits=ModelLimits(ipm=300), models=[MODEL])
        window = ConcurrencyWindow(fixed=fixed, max_size=256)
        trace = await drive(emu, [emu.api_key], pool, window, prompts=150, duration_s=3600)
    sends = sorted(t for t, _ in trace.accepted)
    after = [t for t in sends if t >= 15.0]  # after the first window of latency (10 + 5 s)
    span = (sends[-1] - 15.0) if len(after) > 1 else math.nan
    rate = len(after) / span * 60.0 if span and span > 0 else math.nan
    return {
        "name": f"quota fill, {'auto' if fixed is None else f'fixed {fixed}'}",
        "share_after_first_latency": rate / 300.0,
        "wall_s": trace.finished,
        "refused": trace.refused,
        "peak_window": max(trace.window_sizes, default=0),
        "hint": trace.hint,
    }


async def unknown_limit(
    retry_after: bool, *, probe: bool = True, told_ipm: float | None = None
) -> dict[str, Any]:
    config = EmulatorConfig(
        host="127.0.0.1",
        port=0,
        ipm=120,
        latency_s=8.0,
        retry_after_s=0.0 if retry_after else None,
    )
    duration_s = 300.0
    async with Emulator(config) as emu:
        pool = KeyPool(keys=1, limits=ModelLimits(ipm=told_ipm), probe=probe, models=[MODEL])
        window = ConcurrencyWindow(max_size=256)
        trace = await drive(emu, [emu.api_key], pool, window, prompts=None, duration_s=duration_s)
    accepted = [t for t, _ in trace.accepted]
    label = "told 4x (480)" if told_ipm else ("probe" if probe else "learning without the probe")
    return {
        "name": f"unknown IPM 120, {label}, Retry-After {'on' if retry_after else 'off'}",
        "sustained_90_from_s": sustained_from(accepted, 120, duration_s),
        "share_429": trace.refused / max(1, len(trace.sends)),
        "longest_stall_s": longest_stall_s(trace),
        "last_minute_share": held(accepted, duration_s) / 120,
        "learned_ipm": pool.limiter(0, MODEL).statistics()["learned_ipm"],
    }


async def three_keys() -> dict[str, Any]:
    keys = ["sk-key-0", "sk-key-1", "sk-key-2"]
    config = EmulatorConfig(
        host="127.0.0.1", port=0, api_keys=frozenset(keys), ipm=60, latency_s=5.0
    )
    duration_s = 300.0
    async with Emulator(config) as emu:
        # key 1 has 60 of its 400 images left today: it runs out after about a minute
        pool = KeyPool(
            keys=3,
            limits=ModelLimits(ipm=60, ipd=400),
            used_today=lambda key, model: 340 if key == 1 else 0,
            models=[MODEL],
        )
        window = ConcurrencyWindow(max_size=256)
        trace = await drive(emu, keys, pool, window, prompts=None, duration_s=duration_s)
    out_at = max(t for t, key in trace.accepted if key == 1)
    first_minute = [t for t, _ in trace.accepted if t < 60.0]
    late = [(t, key) for t, key in trace.accepted if out_at + 60 < t <= duration_s]
    late_span = duration_s - (out_at + 60)
    per_key_late = {k: sum(1 for _, key in late if key == k) / late_span * 60 for k in (0, 2)}
    return {
        "name": "three keys of IPM 60, key 1 out of daily quota mid-run",
        "first_minute_share_of_180": len(first_minute) / 180,
        "key1_out_at_s": out_at,
        "keys_0_2_per_min_after": per_key_late,
        "refused": trace.refused,
    }


def run(make: Callable[[], Coroutine[Any, Any, dict[str, Any]]], virtual: bool) -> dict[str, Any]:
    if not virtual:
        return asyncio.run(make())
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(make())


async def gather(makers: Sequence[Callable[[], Coroutine[Any, Any, dict[str, Any]]]]) -> Any:
    return await asyncio.gather(*(make() for make in makers))


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {fmt(v)}" for k, v in value.items())
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time", choices=("virtual", "real"), default="virtual")
    args = parser.parse_args(argv)
    virtual = args.time == "virtual"
    if virtual:
        # the emulator's sliding windows follow the loop's (virtual) clock
        emulator_limits.Clock.mono = lambda self: loop_time() + self.offset_s  # type: ignore[method-assign]
    makers: list[Callable[[], Coroutine[Any, Any, dict[str, Any]]]] = [
        lambda: quota_fill(None),
        lambda: quota_fill(4),
        lambda: quota_fill(64),
        lambda: unknown_limit(False),
        lambda: unknown_limit(True),
        lambda: unknown_limit(False, probe=False),
        lambda: unknown_limit(True, probe=False),
        lambda: unknown_limit(False, told_ipm=480),
        three_keys,
    ]
    started = time.monotonic()
    if virtual:
        results = [run(make, virtual=True) for make in makers]
    else:  # paced by the limits, not the CPU: all at once
        results = asyncio.run(gather(makers))
    print(f"## bench_quota ({args.time} time, {time.monotonic() - started:.1f} s wall)\n")
    for result in results:
        name = result.pop("name")
        print(f"- **{name}**: " + "; ".join(f"{k} {fmt(v)}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
