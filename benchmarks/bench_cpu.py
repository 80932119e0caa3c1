"""Figure 7: whole-process CPU per item at zero latency, vs the docs' loop and a plain script.

Each system runs as its own process, start-up imports included, pinned to CPU 0 (the
emulator, ``image_px`` 64, no latency or limits, on CPU 1); its CPU is the rusage that
``os.wait4`` returns for it. Systems:

- ``sfbatch``: ``python -m sfbatch run --concurrency 64 --download-concurrency 64`` (type
  check, sha256, ``.part`` + rename, group-commit fsync, manifest), and with
  ``--no-fsync-images``;
- ``sequential``: the API docs' ``requests`` loop (benchmarks/baselines/sequential.py);
- ``plain``: aiohttp + aiolimiter, 64 workers, download and write a file, nothing else
  (benchmarks/baselines/plain_aiohttp.py);
- ``plain_kept``: the same script with ``--kept-work``: plus, in the cheapest plain form,
  the per-image work sfbatch keeps (type check, sha256, ``.part`` + rename, a flushed
  manifest line; no fsync), to show how much of the gap that work is by itself.

Rounds interleave the systems; medians are reported. Output on disk (``benchmarks/_work``)
and on tmpfs (``/dev/shm``)::

    python benchmarks/bench_cpu.py            # 3,000 and 30,000 items (about 10 minutes)
    python benchmarks/bench_cpu.py --quick    # 3,000 items, 3 rounds; 30,000 once
    python benchmarks/bench_cpu.py --large    # 30,000 items only, 5 rounds
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_util import (
    BENCH,
    EmulatorProcess,
    child_env,
    fmt,
    median,
    pin,
    script_main,
    table,
    work_dir,
    write_prompts,
)

CLIENT_CPU, EMULATOR_CPU = 0, 1
TMPFS = Path("/dev/shm")
SEQUENTIAL = (
    "import sys, json; from pathlib import Path; from baselines import sequential; "
    "r = sequential.run(sys.argv[1], Path(sys.argv[2]).read_text().splitlines()"
    "[:int(sys.argv[4])], Path(sys.argv[3])); print(json.dumps(r))"
)
# (items, rounds, systems) per size; a system is (name, place)
SIZES: dict[str, list[tuple[int, int, list[tuple[str, str]]]]] = {
    "full": [
        (1, 3, [("sfbatch", "disk"), ("plain", "disk"), ("sequential", "disk")]),
        (3_000, 5, [("sfbatch", "disk"), ("sfbatch_nofsync", "disk"), ("sfbatch", "tmpfs"),
                    ("plain", "disk"), ("sequential", "disk")]),
        (30_000, 3, [("sfbatch", "disk"), ("sfbatch_nofsync", "disk"), ("plain", "disk"),
                     ("plain_kept", "disk"), ("sfbatch", "tmpfs"), ("sfbatch_nofsync", "tmpfs"),
                     ("plain", "tmpfs"), ("plain_kept", "tmpfs")]),
    ],
    "quick": [
        (1, 1, [("sfbatch", "disk"), ("plain", "disk"), ("sequential", "disk")]),
        (3_000, 3, [("sfbatch", "disk"), ("sfbatch_nofsync", "disk"), ("plain", "disk"),
                    ("sequential", "disk")]),
        (30_000, 1, [("sfbatch", "disk"), ("plain", "disk"), ("plain_kept", "disk"),
                     ("sfbatch", "tmpfs"), ("plain", "tmpfs")]),
    ],
    "smoke": [
        (200, 1, [("sfbatch", "disk"), ("plain", "disk"), ("plain_kept", "disk"),
                  ("sequential", "disk")]),
    ],
    "large": [
        (30_000, 5, [("sfbatch", "disk"), ("sfbatch_nofsync", "disk"), ("plain", "disk"),
                     ("plain_kept", "disk"), ("sfbatch", "tmpfs"), ("plain", "tmpfs"),
                     ("plain_kept", "tmpfs")]),
    ],
}  # fmt: skip


def _command(system: str, base_url: str, prompts: Path, out: Path, items: int) -> list[str]:
    if system.startswith("sfbatch"):
        cmd = [sys.executable, "-m", "sfbatch", "run", str(prompts), "--out", str(out)]
        cmd += ["--base-url", base_url, "--concurrency", "64", "--download-concurrency", "64"]
        cmd += ["--limit", str(items), "--no-progress"]
        return cmd + (["--no-fsync-images"] if system == "sfbatch_nofsync" else [])
    if system.startswith("plain"):
        script = BENCH / "baselines" / "plain_aiohttp.py"
        flags = ["--limit", str(items)] + (["--kept-work"] if system == "plain_kept" else [])
        return [sys.executable, str(script), base_url, str(prompts), str(out), *flags]
    return [sys.executable, "-c", SEQUENTIAL, base_url, str(prompts), str(out), str(items)]


def _ok(system: str, out: Path, stdout: bytes) -> int:
    if system.startswith("sfbatch"):
        summary = json.loads((out / "summary.json").read_bytes())
        return int(summary["run"].get("ok", 0))
    return int(json.loads(stdout.strip().splitlines()[-1])["ok"])


def _trial(
    emu: EmulatorProcess, system: str, place: str, prompts: Path, items: int
) -> dict[str, Any]:
    """One whole-process run: CPU from ``os.wait4``'s rusage, wall time, items ok."""
    base = TMPFS if place == "tmpfs" else None
    with work_dir(f"cpu-{system}", base=base) as tmp:
        out = tmp / "out"
        stdout_path = tmp.parent / f"{tmp.name}.stdout"
        with open(stdout_path, "wb") as stdout:
            started = time.perf_counter()
            proc = subprocess.Popen(
                _command(system, emu.base_url, prompts, out, items),
                env=child_env(),
                cwd=BENCH.parent,
                stdout=stdout,
                stderr=subprocess.DEVNULL,
            )
            pin(CLIENT_CPU, proc.pid)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            wall_s = time.perf_counter() - started
        text = stdout_path.read_bytes()
        stdout_path.unlink()
        if proc.returncode != 0:
            raise RuntimeError(f"{system} ({items} items) exited {proc.returncode}")
        ok = _ok(system, out, text)
    cpu_s = usage.ru_utime + usage.ru_stime
    return {
        "ok": ok,
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "cpu_ms_per_item": 1000 * cpu_s / max(ok, 1),
        "sys_ms_per_item": 1000 * usage.ru_stime / max(ok, 1),
        "items_per_s": ok / wall_s,
    }


def measure(mode: str = "full", log: Any = print) -> dict[str, Any]:
    """Run figure 7; returns medians per ``"ITEMS system place"``."""
    sizes = SIZES[mode]
    tmpfs_ok = os.access(TMPFS, os.W_OK)
    runs: dict[str, list[dict[str, Any]]] = {}
    n_max = max(items for items, _, _ in sizes)
    with (
        work_dir("cpu-prompts") as tmp,
        EmulatorProcess(cpu=EMULATOR_CPU, image_px=64) as emu,
    ):
        prompts = write_prompts(tmp / "prompts.txt", n_max)
        for items, rounds, systems in sizes:
            for r in range(rounds):
                for system, place in systems:
                    if place == "tmpfs" and not tmpfs_ok:
                        continue
                    key = f"{items} {system} {place}"
                    result = _trial(emu, system, place, prompts, items)
                    log(
                        f"  round {r + 1}/{rounds} {key}: {result['cpu_ms_per_item']:.2f} "
                        f"CPU-ms/item, {result['items_per_s']:.0f} items/s"
                    )
                    runs.setdefault(key, []).append(result)
    medians = {
        key: {field: median([x[field] for x in results]) for field in results[0]}
        for key, results in runs.items()
    }
    return {"mode": mode, "median": medians, "runs": runs}


def ratio(r: dict[str, Any], items: int, what: str, versus: str, place: str = "disk") -> Any:
    """sfbatch's (``what``) CPU per item over a baseline's, or None if either is missing."""
    med = r["median"]
    a, b = med.get(f"{items} {what} {place}"), med.get(f"{items} {versus} {place}")
    if a is None or b is None:
        return None
    return a["cpu_ms_per_item"] / b["cpu_ms_per_item"]


def report(r: dict[str, Any]) -> str:
    rows = []
    for key, m in r["median"].items():
        items, system, place = key.split()
        per_item = f"{m['cpu_s'] * 1000:.0f} ms (start-up)" if items == "1" else None
        rows.append(
            [
                f"{int(items):,}",
                system,
                place,
                per_item or fmt(m["cpu_ms_per_item"], 3),
                fmt(m["sys_ms_per_item"], 3) if per_item is None else "-",
                fmt(m["items_per_s"]),
                str(len(r["runs"][key])),
            ]
        )
    head = ["items", "system", "output", "CPU-ms/item", "of it kernel", "items/s", "runs"]
    lines = [table(rows, head), ""]
    pairs = [(3_000, "sequential"), (30_000, "plain"), (200, "plain")]
    for items, versus in [*pairs, (30_000, "plain_kept"), (200, "plain_kept")]:
        for place in ("disk", "tmpfs"):
            for what in ("sfbatch", "sfbatch_nofsync", "plain_kept"):
                x = ratio(r, items, what, versus, place) if what != versus else None
                if x is not None:
                    lines.append(f"- {items:,} items on {place}: {what} / {versus} = {x:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    large = "30,000 items only, 5 rounds (about 10 minutes)"
    sys.exit(script_main("figure 7: CPU per item", measure, report, modes={"large": large}))
