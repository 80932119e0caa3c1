"""Upload figure: ``sfbatch run`` writing images to local disk vs ``--images-to s3://``.

The same prompts, the same emulator (``python -m sfbatch emulator``, no latency, no limits,
``image_px`` square PNGs) and the same pools (``--concurrency 16 --download-concurrency 16``);
once into ``--out`` on local disk (fsync on, the default), once with ``--images-to
s3://bench/run`` to moto's S3 server in its own process on 127.0.0.1 (each image to
``DIR/.tmp``, a HEAD and a PUT). Items/s and MB/s of image bytes, wall clock of the child
``python -m sfbatch run``, including start-up (the store's write check is part of it).

    python benchmarks/bench_s3run.py [--quick | --smoke]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
from bench_export import S3_ENV, MotoProcess
from bench_memory import _wait4
from bench_util import EmulatorProcess, fmt, script_main, table, work_dir, write_prompts

SIZES: dict[str, dict[str, int]] = {
    "full": {"items": 3_000, "image_px": 512},
    "quick": {"items": 1_000, "image_px": 512},
    "smoke": {"items": 40, "image_px": 64},
}


def _run(prompts: Path, out: Path, base_url: str, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "sfbatch", "run", str(prompts), "--out", str(out)]
    cmd += ["--base-url", base_url, "--concurrency", "16", "--download-concurrency", "16"]
    cmd += ["--no-progress", "-q", *extra]
    r = _wait4(cmd, timeout=1800)
    if r["code"] != 0:
        raise RuntimeError(f"sfbatch run exited {r['code']}:\n{r['output'][-3000:]}")
    summary = orjson.loads((out / "summary.json").read_bytes())
    return {**r, "bytes": summary["run"]["bytes"], "images": summary["run"]["images"]}


def measure(mode: str = "full", log: Any = print) -> dict[str, Any]:
    size = SIZES[mode]
    results: dict[str, Any] = {"mode": mode, **size}
    with (
        work_dir("s3run") as work,
        MotoProcess() as moto,
        EmulatorProcess(image_px=size["image_px"]) as emu,
    ):
        prompts = write_prompts(work / "prompts.txt", size["items"])
        os.environ["SILICONFLOW_API_KEY"] = "sk-emulator"
        os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": moto.endpoint})
        try:
            for label, extra in (
                ("local disk", ()),
                ("moto S3", ("--images-to", "s3://bench/run")),
            ):
                log(f"run → {label} ({size['items']} items)", file=sys.stderr)
                r = _run(prompts, work / label.replace(" ", "-"), emu.base_url, *extra)
                results[label] = {
                    "elapsed_s": r["elapsed_s"],
                    "items_s": r["images"] / r["elapsed_s"],
                    "mb_s": r["bytes"] / 1e6 / r["elapsed_s"],
                    "mb": r["bytes"] / 1e6,
                    "rss_mb": r["rss_mb"],
                }
        finally:
            for key in ("SILICONFLOW_API_KEY", *S3_ENV, "AWS_ENDPOINT_URL"):
                os.environ.pop(key, None)
    return results


def report(r: dict[str, Any]) -> str:
    rows = [
        [
            f"run → {label}",
            fmt(r[label]["items_s"]),
            fmt(r[label]["mb_s"], 1),
            fmt(r[label]["elapsed_s"], 1),
            fmt(r[label]["rss_mb"]),
        ]
        for label in ("local disk", "moto S3")
    ]
    head = (
        f"## run with --images-to: {r['items']:,} items of {r['image_px']} px "
        f"({fmt(r['local disk']['mb'], 1)} MB) [{r['mode']} mode]\n\n"
    )
    return head + table(rows, ["what", "images/s", "MB/s", "wall s", "peak RSS MB"])


if __name__ == "__main__":
    sys.exit(
        script_main(
            "sfbatch run: images to local disk vs --images-to s3:// (moto).", measure, report
        )
    )
