"""Export figure: throughput of ``sfbatch export`` and its peak memory on a 1M-record manifest.

1. Throughput: a synthetic build of ``images`` ok records (one image each, ``image_kb`` of
   incompressible bytes behind a PNG signature, the record a real-shaped manifest line)
   exported by ``python -m sfbatch export`` as webdataset and parquet to a local
   directory, and as webdataset to a moto S3 server (``python -m moto.server``, its own
   process on 127.0.0.1). Images/s and MB/s of image bytes, wall clock of the child.
2. Store uploads: ``ImageStore.put_file`` of ``uploads`` small (12 KB) images, 16 at a time,
   to a local directory and to the moto server: what ``--images-to`` will cost per image;
   and of one 64 MB file (multipart) against boto3's ``upload_file`` (s3transfer, threads)
   of the same file to the same server: the baseline that says whether moto is the bound.
3. Peak memory: a manifest of ``records`` lines (1,000,000 in full and quick modes; 10 %
   superseded by a later line, 1 % failed) exported as parquet with ``--no-bytes`` (so
   the figure is the index, the join and the writer, not the disk), ``--include-failed``;
   peak RSS is the child's VmHWM. Target: < 200 MB.

    python benchmarks/bench_export.py [--quick | --smoke]

Files go under ``benchmarks/_work/`` and are removed at the end (the 1M manifest is
about 450 MB).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
from bench_memory import _wait4
from bench_util import fmt, free_port, script_main, table, work_dir

TARGET_RSS_MB = 200.0
SIZES: dict[str, dict[str, int]] = {
    "full": {"images": 2_000, "image_kb": 256, "uploads": 2_000, "records": 1_000_000},
    "quick": {"images": 500, "image_kb": 256, "uploads": 500, "records": 1_000_000},
    "smoke": {"images": 40, "image_kb": 64, "uploads": 40, "records": 20_000},
}
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _record(
    i: int, status: str = "ok", path: str | None = None, size: int = 0, sha256: str = "0" * 64
) -> bytes:
    row_id = f"{i:09d}"
    image = {"path": path or f"images/{(i // 1000) % 1000:03d}/{row_id}_0.png", "sha256": sha256}
    record = {
        "id": row_id,
        "status": status,
        "finished_at": "2026-12-01T00:00:00.000Z",
        "billed_images": 1,
        "line": i,
        "file": "prompts.txt",
        "variation": 0,
        "prompt": f"a lighthouse at dusk, study number {i}, oil on canvas",
        "negative_prompt": None,
        "model": "Kwai-Kolors/Kolors",
        "image_size": "1024x1024",
        "batch_size": 1,
        "num_inference_steps": 20,
        "guidance_scale": 7.5,
        "prompt_enhancement": False,
        "requested_seed": i * 7919,
        "seed": i * 7919,
        "timings": {"inference": 3.2},
        "images": [{**image, "bytes": size}] if status == "ok" else [],
        "attempts": 1,
        "latency_s": 4.1,
        "trace_id": f"ti_{i:020d}",
        "error": None if status == "ok" else {"status": 400, "code": 20012, "message": "bad"},
    }
    return orjson.dumps(record) + b"\n"


def write_images_build(out: Path, n: int, image_kb: int) -> int:
    """``n`` ok records with real image files; returns the image bytes."""
    total = 0
    with open(out / "manifest.jsonl", "wb") as manifest:
        for i in range(1, n + 1):
            data = b"\x89PNG\r\n\x1a\n" + os.urandom(image_kb * 1024 - 8)
            path = out / f"images/{(i // 1000) % 1000:03d}/{i:09d}_0.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            manifest.write(_record(i, size=len(data), sha256=hashlib.sha256(data).hexdigest()))
            total += len(data)
    return total


def write_big_manifest(out: Path, n: int) -> None:
    """``n`` records, 1 % failed, then 10 % of them written again (superseding)."""
    with open(out / "manifest.jsonl", "wb") as f:
        batch: list[bytes] = []
        for i in range(1, n + 1):
            batch.append(_record(i, "failed" if i % 100 == 0 else "ok", size=1))
            if len(batch) >= 50_000:
                f.writelines(batch)
                batch = []
        batch += [_record(i, size=1) for i in range(1, n + 1, 10)]
        f.writelines(batch)


class MotoProcess:
    """``python -m moto.server`` on 127.0.0.1, stopped on exit."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> MotoProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, **_boto_kwargs())
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket="bench")
                return self
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _boto_kwargs() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENV["AWS_DEFAULT_REGION"],
    }


def _export(source: Path, fmt_name: str, dest: str, *extra: str, s3: str = "") -> dict[str, Any]:
    cmd = [sys.executable, "-m", "sfbatch", "export", str(source), "--format", fmt_name]
    cmd += ["--to", dest, *extra]
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3} if s3 else {}
    os.environ.update(env)  # _wait4 runs the child with child_env(), which copies os.environ
    try:
        r = _wait4(cmd, timeout=3600)
    finally:
        for key in env:
            os.environ.pop(key, None)
    if r["code"] != 0:
        raise RuntimeError(f"sfbatch export exited {r['code']}:\n{r['output'][-3000:]}")
    return r


async def _put_one(store_url: str, path: Path) -> float:
    from sfbatch.storage import open_store

    async with open_store(store_url) as store:
        t0 = time.perf_counter()
        await store.put_file(path, "big/one.bin")
        return time.perf_counter() - t0


def _boto3_upload(endpoint: str, path: Path) -> float:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, **_boto_kwargs())
    t0 = time.perf_counter()
    client.upload_file(str(path), "bench", "big/boto3.bin")
    return time.perf_counter() - t0


async def _uploads(store_url: str, files: list[Path]) -> float:
    from sfbatch.storage import open_store

    async with open_store(store_url) as store:
        t0 = time.perf_counter()
        slots = asyncio.Semaphore(16)

        async def put(path: Path) -> None:
            async with slots:
                await store.put_file(path, f"images/{path.name}")

        async with asyncio.TaskGroup() as group:
            for path in files:
                group.create_task(put(path))
        return time.perf_counter() - t0


def measure(mode: str = "full", log: Any = print) -> dict[str, Any]:
    size = SIZES[mode]
    results: dict[str, Any] = {"mode": mode, **size}
    with work_dir("export") as work, MotoProcess() as moto:
        build = work / "build"
        build.mkdir()
        image_bytes = write_images_build(build, size["images"], size["image_kb"])
        results["image_mb"] = image_bytes / 1e6
        runs = {
            "webdataset → local dir": ("webdataset", str(work / "wds"), ""),
            "parquet → local dir": ("parquet", str(work / "pq"), ""),
            "webdataset → moto S3": ("webdataset", "s3://bench/wds", moto.endpoint),
        }
        for label, (fmt_name, dest, endpoint) in runs.items():
            log(f"export: {label} ({size['images']} images)", file=sys.stderr)
            r = _export(build, fmt_name, dest, "--shard-size", "64MB", s3=endpoint)
            results[label] = {
                "elapsed_s": r["elapsed_s"],
                "images_s": size["images"] / r["elapsed_s"],
                "mb_s": image_bytes / 1e6 / r["elapsed_s"],
                "rss_mb": r["rss_mb"],
            }

        small = work / "small"
        small.mkdir()
        files = []
        for i in range(size["uploads"]):
            path = small / f"{i:09d}.png"
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(12 * 1024 - 8))
            files.append(path)
        os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": moto.endpoint})
        try:
            for label, url in (("local dir", str(work / "puts")), ("moto S3", "s3://bench/puts")):
                log(f"uploads: {label} ({len(files)} x 12 KB)", file=sys.stderr)
                elapsed = asyncio.run(_uploads(url, files))
                results[f"put_file → {label}"] = {"images_s": len(files) / elapsed}
            big_file = work / "64m.bin"
            big_file.write_bytes(os.urandom(64 << 20))
            log("uploads: one 64 MB file, sfbatch and boto3", file=sys.stderr)
            results["64 MB put_file"] = (
                64 * 1.048576 / asyncio.run(_put_one("s3://bench", big_file))
            )
            results["64 MB boto3"] = 64 * 1.048576 / _boto3_upload(moto.endpoint, big_file)
        finally:
            for key in (*S3_ENV, "AWS_ENDPOINT_URL"):
                os.environ.pop(key, None)

        big = work / "big"
        big.mkdir()
        log(f"memory: writing a {size['records']:,}-record manifest", file=sys.stderr)
        write_big_manifest(big, size["records"])
        results["manifest_mb"] = (big / "manifest.jsonl").stat().st_size / 1e6
        log("memory: exporting it (parquet --no-bytes --include-failed)", file=sys.stderr)
        r = _export(big, "parquet", str(work / "big-pq"), "--no-bytes", "--include-failed")
        results["memory"] = {"elapsed_s": r["elapsed_s"], "rss_mb": r["rss_mb"], "out": r["output"]}
    return results


def report(r: dict[str, Any]) -> str:
    rows = []
    for label in ("webdataset → local dir", "parquet → local dir", "webdataset → moto S3"):
        x = r[label]
        rows.append(
            [f"export {label}", fmt(x["images_s"]), fmt(x["mb_s"], 1), fmt(x["rss_mb"]), "-", ""]
        )
    for label in ("local dir", "moto S3"):
        rows.append(
            [
                f"put_file 12 KB → {label}",
                fmt(r[f"put_file → {label}"]["images_s"]),
                "-",
                "-",
                "-",
                "",
            ]
        )
    for label, key in (
        ("ImageStore.put_file", "64 MB put_file"),
        ("boto3 upload_file", "64 MB boto3"),
    ):
        rows.append([f"one 64 MB file → moto S3, {label}", "-", fmt(r[key], 1), "-", "-", ""])
    mem = r["memory"]
    met = "yes" if mem["rss_mb"] < TARGET_RSS_MB else "**NO**"
    what = f"export {r['records']:,}-record manifest (parquet --no-bytes)"
    rows.append(
        [
            f"{what}, {fmt(mem['elapsed_s'], 1)} s",
            "-",
            "-",
            fmt(mem["rss_mb"]),
            f"< {TARGET_RSS_MB:.0f} MB",
            met,
        ]
    )
    head = (
        f"## export: {r['images']} images of {r['image_kb']} KB ({fmt(r['image_mb'], 1)} MB), "
        f"{r['uploads']} uploads, a {r['records']:,}-record manifest "
        f"({fmt(r['manifest_mb'])} MB) [{r['mode']} mode]\n\n"
    )
    return head + table(rows, ["what", "images/s", "MB/s", "peak RSS MB", "target", "met?"])


if __name__ == "__main__":
    sys.exit(
        script_main(
            "Export throughput (local, moto S3), store uploads, and peak memory on 1M records.",
            measure,
            report,
        )
    )
