"""Where sfbatch's CPU goes at zero latency: one whole run under cProfile, top functions.

The run is figure 7's (``benchmarks/bench_cpu.py``): ``python -m sfbatch run
--concurrency 64 --download-concurrency 64`` pinned to CPU 0 against a zero-latency
emulator (``image_px`` 64) on CPU 1. It runs twice: once plain, for the CPU per item
(``os.wait4`` rusage, start-up included), and once under ``python -m cProfile``, for the
own time of each module group (sfbatch's modules, aiohttp, asyncio, C functions) and the
top functions. cProfile sees the main thread only (not the group commit's worker thread),
counts wall time (the loop's idle wait in epoll is left out) and slows Python calls down:
read the shares, not the seconds::

    python benchmarks/profile_cpu.py                        # 30,000 items, output on disk
    python benchmarks/profile_cpu.py --items 3000 --tmpfs --top 30
"""

from __future__ import annotations

import argparse
import os
import pstats
import subprocess
import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cpu import CLIENT_CPU, EMULATOR_CPU, TMPFS, _command, _trial
from bench_util import BENCH, EmulatorProcess, child_env, pin, table, work_dir, write_prompts

# The event loop waiting for the network or the disk: wall time, not CPU
_IDLE = "<method 'poll' of 'select.epoll' objects>"


def _group(path: str) -> str:
    """A function's module group: ``sfbatch/limiter.py``, ``aiohttp``, ``asyncio``, ``C``."""
    if path == "~":
        return "C (builtins, sockets, hashlib, orjson)"
    for package in ("sfbatch", "aiohttp", "asyncio", "yarl", "multidict", "concurrent"):
        marker = f"/{package}/"
        if marker in path:
            return package + "/" + path.split(marker)[-1] if package == "sfbatch" else package
    return Path(path).name


def profile(items: int, place: str, top: int) -> str:
    base = TMPFS if place == "tmpfs" else None
    with (
        work_dir("profile-prompts") as tmp,
        EmulatorProcess(cpu=EMULATOR_CPU, image_px=64) as emu,
    ):
        prompts = write_prompts(tmp / "prompts.txt", items)
        plain = _trial(emu, "sfbatch", place, prompts, items)
        with work_dir("profile", base=base) as run_dir:
            stats_path = tmp / "run.prof"
            command = _command("sfbatch", emu.base_url, prompts, run_dir / "out", items)
            command = [sys.executable, "-m", "cProfile", "-o", str(stats_path), *command[1:]]
            proc = subprocess.Popen(
                command,
                env=child_env(),
                cwd=BENCH.parent,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            pin(CLIENT_CPU, proc.pid)
            if proc.wait() != 0:
                raise RuntimeError(f"the profiled run exited {proc.returncode}")
        stats = pstats.Stats(str(stats_path))
    own: Counter[str] = Counter()
    functions: list[tuple[float, int, str]] = []
    for (path, line, name), (_, calls, own_s, _, _) in stats.stats.items():
        if name == _IDLE:
            continue
        own[_group(path)] += own_s
        where = name if path == "~" else f"{_group(path)}:{line} {name}"
        functions.append((own_s, calls, where))
    total = sum(own.values()) or 1.0
    lines = [
        f"{items:,} items, output on {place}, without the profiler: "
        f"{plain['cpu_ms_per_item']:.3f} CPU-ms/item "
        f"({plain['sys_ms_per_item']:.3f} kernel), {plain['items_per_s']:,.0f} items/s",
        "",
        table(
            [[group, f"{100 * s / total:.1f} %"] for group, s in own.most_common(top)],
            ["own time of", "share (main thread, under cProfile)"],
        ),
        "",
        table(
            [
                [where, f"{100 * s / total:.1f} %", f"{calls / items:.1f}"]
                for s, calls, where in sorted(functions, reverse=True)[:top]
            ],
            ["function", "share", "calls per item"],
        ),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=30_000)
    parser.add_argument("--tmpfs", action="store_true", help="output on /dev/shm")
    parser.add_argument("--top", type=int, default=25, help="rows of each table")
    args = parser.parse_args()
    if args.tmpfs and not os.access(TMPFS, os.W_OK):
        parser.error(f"{TMPFS} is not writable")
    print(profile(args.items, "tmpfs" if args.tmpfs else "disk", args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
