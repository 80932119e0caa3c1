"""Figure 5: the download stage alone, sfbatch's ``Downloader`` vs img2dataset, same URLs.

The emulator (its own process, pinned to CPU 1) serves 256x256 PNGs (about 120 KB). The
URL list is made once: 50 generations of 4 images give 200 distinct images, and the list
cycles through them with a ``?n=I`` suffix so every URL is distinct while the emulator
serves each image from its render cache (rendering a 256 px PNG takes about 4 ms, which
would make the emulator the bottleneck; the cache is warmed before timing). Each client
runs in a child process pinned to CPU 0, with 16 concurrent downloads:

- sfbatch: ``Downloader.fetch`` (stream to ``.tmp``, sha256, magic bytes, size cap,
  fsync, rename into ``images/SHARD/``) from 16 workers on one aiohttp session; with
  fsync on (the default) and patched off (img2dataset does not fsync).
- img2dataset: ``download(thread_count=16, processes_count=1, output_format="files",
  disable_all_reencoding=True, compute_hash="sha256")``: its whole call, and the
  duration its own stats file reports (the download loop without its start-up).

    python benchmarks/bench_downloads.py [--quick]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_util import (
    KEY,
    MODEL,
    EmulatorProcess,
    child_main,
    fmt,
    median,
    run_child,
    script_main,
    table,
    work_dir,
)

SCRIPT = Path(__file__).resolve()
CLIENT_CPU, EMULATOR_CPU = 0, 1
WORKERS = 16
DISTINCT = 200  # the emulator's render cache holds 256
SIZES = {"full": (2000, 3), "quick": (1000, 3), "smoke": (100, 1)}


def _cpu_with_children() -> float:
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _sfbatch_child(urls_file: str, out_dir: str, fsync: bool) -> dict[str, Any]:
    import asyncio

    import aiohttp

    from sfbatch.downloader import Downloader
    from sfbatch.loader import image_shard_dir

    urls = Path(urls_file).read_text().split()

    async def main() -> tuple[int, int]:
        connector = aiohttp.TCPConnector(limit=WORKERS)
        async with aiohttp.ClientSession(connector=connector) as session:
            downloader = Downloader(out_dir=Path(out_dir), session=session, fsync=fsync)
            jobs = iter(enumerate(urls, start=1))
            done = [0, 0]

            async def worker() -> None:
                for i, url in jobs:
                    row_id = f"{i:09d}"
                    stored = await downloader.fetch(
                        url, f"images/{image_shard_dir(row_id)}/{row_id}_0"
                    )
                    done[0] += 1
                    done[1] += stored.bytes

            async with asyncio.TaskGroup() as tg:
                for _ in range(WORKERS):
                    tg.create_task(worker())
            return done[0], done[1]

    cpu0, t0 = _cpu_with_children(), time.perf_counter()
    ok, nbytes = asyncio.run(main())
    elapsed = time.perf_counter() - t0
    return {"ok": ok, "bytes": nbytes, "elapsed_s": elapsed, "cpu_s": _cpu_with_children() - cpu0}


def _img2dataset_child(urls_file: str, out_dir: str) -> dict[str, Any]:
    import contextlib
    import io

    from img2dataset import download

    n = len(Path(urls_file).read_text().split())
    cpu0, t0 = _cpu_with_children(), time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        download(
            url_list=urls_file,
            input_format="txt",
            output_format="files",
            output_folder=out_dir,
            processes_count=1,
            thread_count=WORKERS,
            disable_all_reencoding=True,
            compute_hash="sha256",
            timeout=30,
            retries=0,
            enable_wandb=False,
            extract_exif=False,
            number_sample_per_shard=n + 1,
        )
    elapsed = time.perf_counter() - t0
    cpu = _cpu_with_children() - cpu0
    ok, duration = 0, 0.0
    for stats in Path(out_dir).glob("*_stats.json"):
        doc = json.loads(stats.read_text())
        ok += doc["successes"]
        duration = max(duration, doc["duration"])
    nbytes = sum(
        p.stat().st_size
        for p in Path(out_dir).rglob("*")
        if p.is_file() and p.suffix not in (".json", ".txt", ".parquet")
    )
    return {"ok": ok, "bytes": nbytes, "elapsed_s": elapsed, "duration_s": duration, "cpu_s": cpu}


def _child(kind: str, **params: Any) -> dict[str, Any]:
    if kind == "sfbatch":
        return _sfbatch_child(**params)
    return _img2dataset_child(**params)


def _make_urls(emu: EmulatorProcess, path: Path, n: int) -> int:
    """Write ``n`` distinct URLs over ``DISTINCT`` images; returns the image size in bytes."""
    import urllib.request

    distinct: list[str] = []
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for k in range(DISTINCT // 4):
        body = json.dumps(
            {
                "model": MODEL,
                "prompt": f"download benchmark {k}",
                "batch_size": 4,
                "image_size": "1024x1024",
            }
        ).encode()
        req = urllib.request.Request(
            emu.base_url + "/images/generations", data=body, headers=headers, method="POST"
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            distinct += [image["url"] for image in json.loads(resp.read())["images"]]
    size = 0
    for url in distinct:  # warm the emulator's render cache
        with urllib.request.urlopen(url, timeout=30) as resp:
            size = len(resp.read())
    path.write_text("".join(f"{distinct[i % len(distinct)]}?n={i}\n" for i in range(n)))
    return size


def img2dataset_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("img2dataset") is not None


def measure(mode: str = "full", log: Any = print) -> dict[str, Any]:
    n, rounds = SIZES[mode]
    runs: dict[str, list[dict[str, Any]]] = {"sfbatch": [], "sfbatch_nofsync": []}
    if img2dataset_available():
        runs["img2dataset"] = []
    else:
        log("  fig5: img2dataset is not installed (pip install img2dataset): baseline skipped")
    with work_dir("dl") as tmp, EmulatorProcess(cpu=EMULATOR_CPU, image_px=256) as emu:
        urls = tmp / "urls.txt"
        image_bytes = _make_urls(emu, urls, n)
        for _ in range(rounds):
            for name in runs:
                out = tmp / f"out-{name}"
                if name == "img2dataset":
                    params: dict[str, Any] = {
                        "kind": "img2dataset",
                        "urls_file": str(urls),
                        "out_dir": str(out),
                    }
                else:
                    params = {
                        "kind": "sfbatch",
                        "urls_file": str(urls),
                        "out_dir": str(out),
                        "fsync": name == "sfbatch",
                    }
                emu_cpu0 = emu.cpu_seconds()
                r = run_child(SCRIPT, params, timeout=600, cpu=CLIENT_CPU)
                r["emulator_cpu_pct"] = 100 * (emu.cpu_seconds() - emu_cpu0) / r["elapsed_s"]
                runs[name].append(r)
                import shutil

                shutil.rmtree(out, ignore_errors=True)
            log(
                "  fig5 round: "
                + ", ".join(
                    f"{k} {v[-1]['ok'] / v[-1]['elapsed_s']:,.0f} img/s" for k, v in runs.items()
                )
            )

    def med(name: str, key: str = "elapsed_s") -> dict[str, float] | None:
        rs = runs.get(name)
        if not rs:
            return None
        return {
            "images_per_s": median([r["ok"] / r[key] for r in rs]),
            "mb_per_s": median([r["bytes"] / 1e6 / r[key] for r in rs]),
            "cpu_ms_per_image": median([1000 * r["cpu_s"] / max(r["ok"], 1) for r in rs]),
            "ok": min(r["ok"] for r in rs),
            "emulator_cpu_pct": median([r["emulator_cpu_pct"] for r in rs]),
        }

    result = {
        "mode": mode,
        "urls": n,
        "image_bytes": image_bytes,
        "rounds": rounds,
        "sfbatch": med("sfbatch"),
        "sfbatch_nofsync": med("sfbatch_nofsync"),
        "img2dataset": med("img2dataset"),
        "img2dataset_loop": med("img2dataset", "duration_s"),
    }
    loop = result["img2dataset_loop"]
    result["ratio"] = result["sfbatch"]["images_per_s"] / loop["images_per_s"] if loop else None
    return result


def report(r: dict[str, Any]) -> str:
    rows = [
        [
            name,
            fmt(r[k]["images_per_s"]),
            fmt(r[k]["mb_per_s"], 1),
            fmt(r[k]["cpu_ms_per_image"], 2),
            f"{r[k]['ok']}/{r['urls']}",
            fmt(r[k]["emulator_cpu_pct"]) + " %",
        ]
        for name, k in (
            ("sfbatch Downloader (fsync on, default)", "sfbatch"),
            ("sfbatch Downloader (fsync off)", "sfbatch_nofsync"),
            ("img2dataset, whole download() call", "img2dataset"),
            ("img2dataset, its own download-loop duration", "img2dataset_loop"),
        )
        if r[k] is not None
    ]
    ratio = (
        "img2dataset is not installed: no baseline"
        if r["ratio"] is None
        else f"sfbatch (fsync) / img2dataset (loop) = {r['ratio']:.2f}x"
    )
    return (
        f"{r['urls']:,} URLs of {r['image_bytes'] / 1000:.0f} KB PNGs, 16 concurrent, "
        f"median of {r['rounds']}\n"
        + table(rows, ["client", "images/s", "MB/s", "CPU ms/image", "ok", "emulator CPU"])
        + f"\n{ratio}"
    )


def main() -> int:
    return script_main("figure 5: downloads", measure, report)


if __name__ == "__main__":
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if not child_main(_child):
        sys.exit(main())
