"""Figure 1: engine throughput against a zero-latency emulator, vs the docs' loop and threads.

The emulator runs in its own process pinned to CPU 1 (``image_px`` 64, no limits, no
latency); every measured client (the engine, the sequential and the threaded baseline)
runs in a child process pinned to CPU 0, so each side has a core of the 2-core machine.
An item is one generation request, one image download (streamed, sha256, fsync, rename)
and one manifest record. Rounds interleave the systems so machine noise hits all of them;
medians are reported::

    python benchmarks/bench_throughput.py            # tuning + 3 rounds (about 2 minutes)
    python benchmarks/bench_throughput.py --quick    # smaller runs

The downloader fsyncs every image (``Downloader(fsync=True)``, and ``RunConfig`` has no
knob to turn it off), so the engine is also measured with fsync patched off
(``sfbatch.pipeline.Downloader`` replaced by a ``partial(..., fsync=False)`` in the
child) to show what it costs. One more engine run under pyinstrument gives the profile.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_util import (
    KEY,
    EmulatorProcess,
    child_main,
    fmt,
    median,
    run_child,
    script_main,
    self_cpu_seconds,
    table,
    work_dir,
    write_prompts,
)

SCRIPT = Path(__file__).resolve()
ENGINE_CPU, EMULATOR_CPU = 0, 1
TARGET_ITEMS_PER_S = 2000.0
TARGET_VS_SEQUENTIAL = 20.0

SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "engine": 12_000,
        "tune": 6_000,
        "sequential": 1_000,
        "threads": 3_000,
        "rounds": 3,
        "configs": [(16, 16), (32, 32), (64, 64)],
        "profile": 6_000,
    },
    "quick": {
        "engine": 2_000,
        "tune": 0,
        "sequential": 200,
        "threads": 600,
        "rounds": 3,
        "configs": [(32, 32)],
        "profile": 2_000,
    },
    "smoke": {
        "engine": 300,
        "tune": 0,
        "sequential": 30,
        "threads": 60,
        "rounds": 1,
        "configs": [(16, 16)],
        "profile": 200,
    },
}


# --------------------------------------------------------------------------- children


def _child(kind: str, base_url: str, prompts: str, items: int, out_dir: str, **opts: Any) -> Any:
    if kind == "engine":
        return _engine_child(base_url, Path(prompts), items, Path(out_dir), **opts)
    if kind == "floor":
        return _floor_child(base_url, Path(prompts), items, **opts)
    lines = Path(prompts).read_text().splitlines()[:items]
    if kind == "sequential":
        from baselines import sequential

        cpu0 = self_cpu_seconds()
        result = sequential.run(base_url, lines, Path(out_dir))
    else:
        from baselines import threads

        cpu0 = self_cpu_seconds()
        result = threads.run(base_url, lines, Path(out_dir))
    return {**result, "items": items, "cpu_s": self_cpu_seconds() - cpu0}


def _engine_child(
    base_url: str,
    prompts: Path,
    items: int,
    out_dir: Path,
    *,
    concurrency: int,
    download_concurrency: int,
    fsync: bool = True,
    profile: bool = False,
) -> dict[str, Any]:
    import asyncio
    import functools

    import sfbatch.pipeline
    from sfbatch.config import RunConfig
    from sfbatch.downloader import Downloader
    from sfbatch.loader import PromptSource
    from sfbatch.models import ModelRegistry
    from sfbatch.pipeline import Pipeline

    if not fsync:
        sfbatch.pipeline.Downloader = functools.partial(Downloader, fsync=False)  # type: ignore[misc]
    registry = ModelRegistry.builtin()
    config = RunConfig(
        out_dir=out_dir,
        api_key=KEY,
        base_url=base_url,
        concurrency=concurrency,
        download_concurrency=download_concurrency,
        request_timeout_s=60.0,
        download_timeout_s=60.0,
    )
    source = PromptSource(prompts, defaults=config.defaults, registry=registry, limit=items)

    async def main() -> Any:
        return await Pipeline(config, source, registry=registry).run()

    profiler = None
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005, async_mode="disabled")
        profiler.start()
    cpu0, t0 = self_cpu_seconds(), time.perf_counter()
    result = asyncio.run(main())
    elapsed, cpu = time.perf_counter() - t0, self_cpu_seconds() - cpu0
    out: dict[str, Any] = {
        "items": items,
        "ok": result.summary["manifest"].get("ok", 0),
        "elapsed_s": elapsed,
        "cpu_s": cpu,
        "requests": result.summary["run"]["requests"],
    }
    if profiler is not None:
        profiler.stop()
        out["profile"] = _profile_summary(profiler)
    return out


def _floor_child(base_url: str, prompts: Path, items: int, *, concurrency: int) -> dict[str, Any]:
    """The least an aiohttp client must do per item: POST, GET, read the body; no disk."""
    import asyncio

    import aiohttp
    import orjson
    from baselines.sequential import payload

    lines = prompts.read_text().splitlines()[:items]
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    counts = {"ok": 0, "bytes": 0}

    async def main() -> None:
        source = iter(lines)
        connector = aiohttp.TCPConnector(limit=2 * concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def worker() -> None:
                for prompt in source:
                    async with session.post(
                        base_url + "/images/generations",
                        data=orjson.dumps(payload(prompt)),
                        headers=headers,
                    ) as resp:
                        doc = orjson.loads(await resp.read())
                    for image in doc["images"]:
                        async with session.get(image["url"]) as resp:
                            counts["bytes"] += len(await resp.read())
                    counts["ok"] += 1

            async with asyncio.TaskGroup() as tg:
                for _ in range(concurrency):
                    tg.create_task(worker())

    cpu0, t0 = self_cpu_seconds(), time.perf_counter()
    asyncio.run(main())
    return {
        "items": items,
        "ok": counts["ok"],
        "elapsed_s": time.perf_counter() - t0,
        "cpu_s": self_cpu_seconds() - cpu0,
    }


def _profile_summary(profiler: Any, top: int = 15) -> dict[str, Any]:
    """Self time by function and by package, from a pyinstrument session."""
    root = profiler.last_session.root_frame()
    by_function: dict[str, float] = {}
    by_package: dict[str, float] = {}
    total = root.time if root is not None else 0.0

    def package_of(path: str) -> str:
        if "/sfbatch/" in path:
            return "sfbatch." + path.rsplit("/sfbatch/", 1)[1].removesuffix(".py").replace("/", ".")
        if "site-packages/" in path:
            return path.split("site-packages/", 1)[1].split("/", 1)[0]
        if "/lib/python3" in path:
            tail = path.split("/lib/python3", 1)[1].split("/", 1)[1]
            return "stdlib." + tail.split("/", 1)[0].removesuffix(".py")
        return "<built-in>" if not path or path.startswith("<") else path

    stack = [root] if root is not None else []
    while stack:
        frame = stack.pop()
        children = list(frame.children)
        stack.extend(c for c in children if not c.is_synthetic)
        own = frame.time - sum(c.time for c in children if not c.is_synthetic)
        if own <= 0 or frame.is_synthetic:
            continue
        path = frame.file_path or ""
        name = f"{frame.function} ({Path(path).name}:{frame.line_no})"
        by_function[name] = by_function.get(name, 0.0) + own
        pkg = package_of(path)
        by_package[pkg] = by_package.get(pkg, 0.0) + own

    def ranked(d: dict[str, float]) -> list[tuple[str, float, float]]:
        items = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return [(k, round(v, 3), round(100 * v / total, 1) if total else 0.0) for k, v in items]

    return {
        "total_s": round(total, 3),
        "functions": ranked(by_function),
        "packages": ranked(by_package),
    }


# --------------------------------------------------------------------------- parent

# (key, label, kind, options): what each round runs, in order.
SYSTEMS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("engine", "sfbatch (default: fsync on)", "engine", {}),
    ("engine_nofsync", "sfbatch, fsync patched off", "engine", {"fsync": False}),
    (
        "engine_tmpfs",
        "sfbatch, fsync off, output on tmpfs",
        "engine",
        {"fsync": False, "tmpfs": True},
    ),
    ("floor", "aiohttp floor: POST+GET, no disk", "floor", {}),
    ("sequential", "sequential (docs loop)", "sequential", {}),
    ("threads", "threads (16, requests)", "threads", {}),
]
TMPFS = Path("/dev/shm")


def _trial(
    emu: EmulatorProcess, kind: str, prompts: Path, items: int, *, tmpfs: bool = False, **opts: Any
) -> dict[str, Any]:
    with work_dir(f"tp-{kind}", base=TMPFS if tmpfs else None) as out:
        emu_cpu0 = emu.cpu_seconds()
        params = {
            "kind": kind,
            "base_url": emu.base_url,
            "prompts": str(prompts),
            "items": items,
            "out_dir": str(out),
            **opts,
        }
        result = run_child(SCRIPT, params, timeout=600, cpu=ENGINE_CPU)
        emu_cpu = emu.cpu_seconds() - emu_cpu0
    ok = result["ok"]
    elapsed = result["elapsed_s"]
    result["items_per_s"] = ok / elapsed if elapsed else 0.0
    result["cpu_s_per_1000"] = 1000 * result["cpu_s"] / max(ok, 1)
    # The emulator is only busy while the child runs, so this is its utilisation then.
    result["emulator_cpu_pct"] = 100 * emu_cpu / elapsed if elapsed else 0.0
    if ok != items:
        result["warning"] = f"{kind}: only {ok} of {items} items ok"
    return result


def measure(mode: str = "full", log: Any = print) -> dict[str, Any]:
    """Run figure 1; returns medians, ratios, the chosen config, and the profile."""
    size = SIZES[mode]
    n_max = max(size["engine"], size["tune"], size["profile"], size["threads"])
    systems = [s for s in SYSTEMS if not s[3].get("tmpfs") or os.access(TMPFS, os.W_OK)]
    with work_dir("tp-prompts") as tmp, EmulatorProcess(cpu=EMULATOR_CPU, image_px=64) as emu:
        prompts = write_prompts(tmp / "prompts.txt", n_max)
        tuning: list[dict[str, Any]] = []
        best = size["configs"][0]
        if size["tune"] and len(size["configs"]) > 1:
            for conc, dl in size["configs"]:
                r = _trial(
                    emu, "engine", prompts, size["tune"], concurrency=conc, download_concurrency=dl
                )
                tuning.append({"concurrency": conc, "download_concurrency": dl, **r})
                log(f"  fig1 tune {conc}/{dl}: {r['items_per_s']:,.0f} items/s")
            best_run = max(tuning, key=lambda r: r["items_per_s"])
            best = (best_run["concurrency"], best_run["download_concurrency"])
        engine_opts = {"concurrency": best[0], "download_concurrency": best[1]}
        runs: dict[str, list[dict[str, Any]]] = {key: [] for key, *_ in systems}
        for round_no in range(size["rounds"]):
            for key, _label, kind, opts in systems:
                n = size[kind] if kind in ("sequential", "threads") else size["engine"]
                if kind == "engine":
                    opts = {**engine_opts, **opts}
                elif kind == "floor":
                    opts = {"concurrency": engine_opts["concurrency"]}
                runs[key].append(_trial(emu, kind, prompts, n, **opts))
            log(
                f"  fig1 round {round_no + 1}: "
                + ", ".join(f"{k} {fmt(v[-1]['items_per_s'])}" for k, v in runs.items())
                + " items/s"
            )
        prof = None
        if importlib.util.find_spec("pyinstrument") is not None:
            prof = _trial(emu, "engine", prompts, size["profile"], profile=True, **engine_opts)
        else:
            log("  fig1: pyinstrument is not installed (pip install pyinstrument): no profile")
    med = {
        k: {
            m: median([r[m] for r in v])
            for m in ("items_per_s", "cpu_s_per_1000", "emulator_cpu_pct")
        }
        for k, v in runs.items()
    }
    warnings = [r["warning"] for v in runs.values() for r in v if "warning" in r]
    tuning_keys = ("concurrency", "download_concurrency", "items_per_s", "cpu_s_per_1000")
    return {
        "mode": mode,
        "config": engine_opts,
        "tuning": [{k: t[k] for k in tuning_keys} for t in tuning],
        "items": {k: size[k] for k in ("engine", "sequential", "threads")},
        "rounds": size["rounds"],
        "labels": {key: label for key, label, *_ in systems},
        "median": med,
        "runs": {k: [round(r["items_per_s"], 1) for r in v] for k, v in runs.items()},
        "vs_sequential": med["engine"]["items_per_s"] / med["sequential"]["items_per_s"],
        "vs_threads": med["engine"]["items_per_s"] / med["threads"]["items_per_s"],
        "profile": prof["profile"] if prof else None,
        "profile_items_per_s": prof["items_per_s"] if prof else None,
        "warnings": warnings,
        "cpus": os.cpu_count(),
    }


def report(r: dict[str, Any]) -> str:
    med = r["median"]
    rows = [
        [
            label,
            fmt(med[k]["items_per_s"]),
            fmt(med[k]["cpu_s_per_1000"], 2),
            fmt(med[k]["emulator_cpu_pct"]) + " %",
            ", ".join(fmt(x) for x in r["runs"][k]),
        ]
        for k, label in r["labels"].items()
    ]
    header = ["system", "items/s (median)", "CPU-s / 1000 items", "emulator CPU", "runs"]
    tuning = ", ".join(
        f"{t['concurrency']}/{t['download_concurrency']}: {t['items_per_s']:,.0f}"
        for t in r["tuning"]
    )
    lines = [
        f"engine config: concurrency {r['config']['concurrency']}, download_concurrency "
        f"{r['config']['download_concurrency']} (tuning, items/s: {tuning or 'skipped'}); "
        f"items per run: {r['items']}; {r['rounds']} rounds",
        table(rows, header),
        f"sfbatch / sequential = {r['vs_sequential']:.1f}x, sfbatch / threads = "
        f"{r['vs_threads']:.1f}x",
    ]
    p = r["profile"]
    if p is None:
        return "\n".join([*lines, "no profile: pyinstrument is not installed"])
    lines.append(
        f"pyinstrument profile of one default run ({p['total_s']} s sampled, "
        f"{r['profile_items_per_s']:,.0f} items/s under the profiler); self time by package:"
    )
    lines += [f"  {pct:5.1f} %  {name}" for name, _, pct in p["packages"][:10]]
    lines.append("  top functions by self time:")
    lines += [f"  {pct:5.1f} %  {name}" for name, _, pct in p["functions"][:15]]
    if r["warnings"]:
        lines.append("warnings: " + "; ".join(r["warnings"]))
    return "\n".join(lines)


def main() -> int:
    return script_main("figure 1: engine throughput", measure, report)


if __name__ == "__main__":
    if not child_main(_child):
        sys.exit(main())
