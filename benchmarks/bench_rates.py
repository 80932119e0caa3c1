"""Figures 2 and 3: latency hiding, and how exactly the engine uses a rate limit.

Each scenario runs in its own child process with its own emulator process, so all the
scenarios of both figures run at the same time (they are paced by the limits, not by
the CPU: about 10 requests per second each). The emulator counts every request it
admits in a per-second histogram (``/_stats`` ``accepted_per_s`` / ``images_per_s``);
utilisation is what it admitted over the steady-state window (after ``warm_s``) divided
by the limit over the same window. The engine is stopped by ``Pipeline.interrupt()`` at
the end of the window (in-flight work then lands); the baselines stop taking prompts.

Figure 2 (latency hiding): emulator latency 2 s and 10 s and an RPM limit of 600, the
engine told ``rpm=600`` with concurrency enough to cover the latency; the sequential
and threaded baselines against the same emulator.

Figure 3 (limit accuracy): emulator latency 1 s ± 0.5 s; an RPM limit of 600 and an IPM
limit of 1,200 (batch_size 2), the engine told the same; then the engine told 4x the
real RPM limit (2,400 against 600) for a longer window: 429 share over the whole run,
time to converge (the end of the last stall: 10 s or more with nothing admitted, the
engine waiting out cooldowns while the server's sliding minute still holds a burst), and
the share of the limit used after that. The threaded baseline (16 threads, 1 s sleep on
429) is run against the same RPM limit.

    python benchmarks/bench_rates.py            # about 4 minutes (everything at once)
    python benchmarks/bench_rates.py --quick    # about 40 s
"""

from __future__ import annotations

import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_util import (
    KEY,
    EmulatorProcess,
    child_main,
    fmt,
    run_child,
    script_main,
    table,
    work_dir,
    write_prompts,
)

SCRIPT = Path(__file__).resolve()
LIMIT = 600  # requests (or images) per minute: 10 per second, measurable in a minute
TARGET_UTIL = 99.0
TARGET_OVER_429_PCT = 5.0

TIMING: dict[str, dict[str, float]] = {
    "full": {"warm": 5, "window": 60, "over_window": 240, "latencies": (2, 10)},  # type: ignore[dict-item]
    "quick": {"warm": 3, "window": 12, "over_window": 25, "latencies": (2, 10)},  # type: ignore[dict-item]
    "smoke": {"warm": 1, "window": 3, "over_window": 4, "latencies": (0.5, 1)},  # type: ignore[dict-item]
}


def scenarios(mode: str) -> list[dict[str, Any]]:
    t = TIMING[mode]
    warm, window = t["warm"], t["window"]
    out: list[dict[str, Any]] = []
    for latency in t["latencies"]:  # type: ignore[attr-defined]
        emu = {"latency": latency, "rpm": LIMIT}
        conc = math.ceil(LIMIT / 60 * latency * 1.5) + 8
        out.append(
            {
                "name": f"latency {latency:g}s engine",
                "figure": 2,
                "system": "engine",
                "emulator": emu,
                "rpm": LIMIT,
                "concurrency": conc,
            }
        )
        for system in ("sequential", "threads"):
            out.append(
                {
                    "name": f"latency {latency:g}s {system}",
                    "figure": 2,
                    "system": system,
                    "emulator": emu,
                }
            )
    jitter = {"latency": 1.0, "latency_jitter": 0.5}
    out += [
        {
            "name": "rpm known engine",
            "figure": 3,
            "system": "engine",
            "emulator": {**jitter, "rpm": LIMIT},
            "rpm": LIMIT,
            "concurrency": 32,
        },
        {
            "name": "ipm known engine",
            "figure": 3,
            "system": "engine",
            "emulator": {**jitter, "ipm": 2 * LIMIT},
            "ipm": 2 * LIMIT,
            "batch_size": 2,
            "concurrency": 32,
            "measure": "images",
        },
        {
            "name": "rpm 4x over engine",
            "figure": 3,
            "system": "engine",
            "emulator": {**jitter, "rpm": LIMIT},
            "rpm": 4 * LIMIT,
            "concurrency": 64,
            "window": t["over_window"],
            "warm": 0,
            "converge": True,
        },
        {
            "name": "rpm known threads",
            "figure": 3,
            "system": "threads",
            "emulator": {**jitter, "rpm": LIMIT},
        },
    ]
    for s in out:
        s.setdefault("warm", warm)
        s.setdefault("window", window)
        s.setdefault("measure", "requests")
        s.setdefault("batch_size", 1)
    return out


# --------------------------------------------------------------------------- child


def _run_engine(s: dict[str, Any], base_url: str, prompts: Path, out: Path, deadline: float) -> Any:
    import asyncio

    from sfbatch.config import RequestDefaults, RunConfig
    from sfbatch.loader import PromptSource
    from sfbatch.models import ModelRegistry
    from sfbatch.pipeline import Pipeline

    registry = ModelRegistry.builtin()
    config = RunConfig(
        out_dir=out,
        api_key=KEY,
        base_url=base_url,
        rpm=s.get("rpm"),
        ipm=s.get("ipm"),
        concurrency=s["concurrency"],
        download_concurrency=16,
        defaults=RequestDefaults(batch_size=s["batch_size"]),
        request_timeout_s=120.0,
    )
    source = PromptSource(prompts, defaults=config.defaults, registry=registry)

    async def main() -> Any:
        pipeline = Pipeline(config, source, registry=registry)
        loop = asyncio.get_running_loop()
        loop.call_later(max(0.0, deadline - time.monotonic()), pipeline.interrupt)
        return await pipeline.run()

    result = asyncio.run(main())
    return {
        "engine_429": result.summary["run"]["rate_limited_429"],
        "ok": result.summary["run"].get("ok", 0),
    }


def _child(scenario: dict[str, Any], start_at: float) -> dict[str, Any]:
    s = scenario
    warm, window = s["warm"], s["window"]
    with work_dir("rates") as tmp, EmulatorProcess(**s["emulator"]) as emu:
        rate = 4 * LIMIT / 60  # no scenario admits more than this per second on average
        n = int(rate * (warm + window + 30)) + 100
        prompts = write_prompts(tmp / "prompts.txt", n)
        time.sleep(max(0.0, start_at - time.time()))
        emu.control(reset_stats=True)
        t0 = time.monotonic()
        deadline = t0 + warm + window + 0.5
        if s["system"] == "engine":
            extra = _run_engine(s, emu.base_url, prompts, tmp / "out", deadline)
        else:
            from baselines import sequential, threads

            lines = prompts.read_text().splitlines()
            runner = sequential.run if s["system"] == "sequential" else threads.run
            result = runner(
                emu.base_url, lines, tmp / "out", batch_size=s["batch_size"], deadline=deadline
            )
            extra = {"ok": result["ok"]}
        elapsed = time.monotonic() - t0
        stats = emu.stats()
    key = "images_per_s" if s["measure"] == "images" else "accepted_per_s"
    hist = {int(k): v for k, v in stats[key].items()}
    admitted = sum(v for sec, v in hist.items() if warm <= sec < warm + window)
    limit_per_s = LIMIT / 60 * (2 if s["measure"] == "images" else 1)
    requests = stats["generation_requests"]
    n429 = int(stats["status_counts"].get("429", 0))
    result = {
        "name": s["name"],
        "figure": s["figure"],
        "system": s["system"],
        "utilization_pct": 100 * admitted / (limit_per_s * window),
        "admitted_per_s": admitted / window,
        "requests": requests,
        "n429": n429,
        "pct429": 100 * n429 / requests if requests else 0.0,
        "max_60s": stats["max_images_60s" if s["measure"] == "images" else "max_requests_60s"],
        "elapsed_s": elapsed,
        "window_s": window,
        "warm_s": warm,
        **extra,
    }
    if s.get("converge"):
        result.update(_convergence(hist, warm + window, limit_per_s))
        result["timeline"] = [hist.get(sec, 0) for sec in range(int(elapsed) + 1)]
    return result


STALL_S = 10  # this many seconds in a row with nothing admitted is a stall


def _convergence(hist: dict[int, int], window: float, limit_per_s: float) -> dict[str, Any]:
    """When the engine stopped stalling, and how much of the limit it used after that.

    A stall is ``STALL_S`` or more seconds in a row in which the emulator admitted
    nothing (the engine waiting out 429 cooldowns while the server's sliding minute
    still holds an earlier burst). Converged: the end of the last stall that ends
    inside the window; ``None`` if a stall runs into the end of the window.
    """
    end = int(window)
    if end < 90:  # the server's minute must pass at least once for this to mean anything
        return {"converge_s": None, "stalls": [], "stalled_s": None,
                "utilization_after_pct": None, "too_short": True}  # fmt: skip
    stalls: list[tuple[int, int]] = []
    run_start = None
    for sec in range(end):
        if hist.get(sec, 0) == 0:
            run_start = sec if run_start is None else run_start
        else:
            if run_start is not None and sec - run_start >= STALL_S:
                stalls.append((run_start, sec))
            run_start = None
    unfinished = run_start is not None and end - run_start >= STALL_S
    converged = None if unfinished else (stalls[-1][1] if stalls else 0)
    after = None
    if converged is not None and end - converged >= 30:
        admitted = sum(hist.get(sec, 0) for sec in range(converged, end))
        after = 100 * admitted / (limit_per_s * (end - converged))
    return {
        "converge_s": converged,
        "stalls": stalls,
        "stalled_s": sum(b - a for a, b in stalls) + (end - run_start if unfinished else 0),
        "utilization_after_pct": after,
    }


# --------------------------------------------------------------------------- parent


def measure(mode: str = "full", log: Any = print) -> dict[str, Any]:
    """Run every scenario of figures 2 and 3 at once; the results by scenario name."""
    todo = scenarios(mode)
    start_at = time.time() + (10 if mode == "full" else 6)
    longest = max(s["warm"] + s["window"] for s in todo)
    timeout = start_at - time.time() + longest + 120
    with ThreadPoolExecutor(max_workers=len(todo)) as pool:
        futures = {
            s["name"]: pool.submit(
                run_child, SCRIPT, {"scenario": s, "start_at": start_at}, timeout=timeout
            )
            for s in todo
        }
        results = {name: f.result() for name, f in futures.items()}
    for r in results.values():
        log(
            f"  fig{r['figure']} {r['name']}: {r['utilization_pct']:.1f} % of limit, "
            f"{r['n429']} x 429 of {r['requests']} requests"
        )
    return {"mode": mode, "scenarios": results}


def report(r: dict[str, Any]) -> str:
    rows = []
    for s in r["scenarios"].values():
        converge = "-"
        if s.get("too_short"):
            converge = "window too short"
        elif "converge_s" in s:
            converge = (
                "not in window" if s["converge_s"] is None else f"{s['converge_s']} s"
            ) + f", {s['stalled_s']} s stalled"
            if s["utilization_after_pct"] is not None:
                converge += f", {s['utilization_after_pct']:.0f} % of limit after"
        rows.append(
            [
                s["name"],
                f"{s['utilization_pct']:.1f} %",
                fmt(s["admitted_per_s"], 2),
                str(s["n429"]),
                f"{s['pct429']:.1f} %",
                str(s["max_60s"]),
                converge,
                f"{s['warm_s']:g}+{s['window_s']:g} s",
            ]
        )
    header = ["scenario", "% of limit", "admitted/s", "429s", "429 share", "max in 60 s",
              "converged after", "warm+window"]  # fmt: skip
    lines = [table(rows, header)]
    for s in r["scenarios"].values():
        if "timeline" in s:
            lines.append(f"{s['name']}: admitted per second: {s['timeline']}")
    return "\n".join(lines)


def main() -> int:
    return script_main("figures 2 and 3: rates", measure, report)


if __name__ == "__main__":
    if not child_main(_child):
        sys.exit(main())
