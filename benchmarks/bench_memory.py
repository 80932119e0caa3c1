"""Figure 4: peak memory on a big prompt file, and resume over a big manifest.

1. The engine as users run it, ``python -m sfbatch run FILE --out DIR --base-url ...
   --limit N`` (``SILICONFLOW_API_KEY=sk-emulator``, a zero-latency emulator process), on
   a small and on a huge prompt file with the same ``--limit``, so both runs make the same
   items: flat memory means the huge file does not raise the peak RSS. Peak RSS is the
   child's own ``ru_maxrss`` from ``os.wait4``. Baseline: the threaded docs loop as users
   write it, ``prompts = [line.strip() for line in open(FILE)]`` and then the same
   ``N`` items.
2. Resume: a synthetic ``manifest.jsonl`` of as many records as the huge file has lines,
   in the documented format (the template is a real record of run 1; 1 % ``failed``,
   0.1 % ``invalid``, 100 ``generated``, the rest ``ok``; content-style ids and a
   fingerprint of their own), read back by ``sfbatch.resume.read_index`` in a child
   process: seconds and peak RSS. Baseline:
   what a hand-written resume does, ``{rec["id"]: rec["status"]}`` with ``orjson.loads``
   of every line.

Files go under ``benchmarks/_work/`` and are deleted at the end (a 10,000,000-line
manifest is about 6 GB: check ``df -h`` first; ``--quick`` uses 1,000,000 lines).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import orjson
from bench_util import (
    EmulatorProcess,
    child_env,
    child_main,
    fmt,
    script_main,
    table,
    work_dir,
    write_prompts,
)

SCRIPT = Path(__file__).resolve()
TARGET_RSS_MB = 100.0
TARGET_RESUME_S = 30.0

SIZES: dict[str, dict[str, int]] = {
    "full": {"small": 10_000, "big": 10_000_000, "limit": 10_000},
    "quick": {"small": 10_000, "big": 1_000_000, "limit": 2_000},
    "smoke": {"small": 1_000, "big": 20_000, "limit": 200},
}


def _hwm_mb(pid: int) -> float | None:
    """VmHWM (peak RSS) of a running process, in MB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _wait4(cmd: list[str], *, timeout: float) -> dict[str, Any]:
    """Run ``cmd``; its exit code, wall seconds, peak RSS (MB) and output.

    Peak RSS is the child's ``VmHWM``, polled every 10 ms until it exits. (``ru_maxrss``
    from ``wait4`` is no good here: Linux carries the parent's peak over the exec of a
    vforked child, so a child of a big parent would report the parent's size.)
    """
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
        deadline = t0 + timeout
        peak = 0.0
        while True:
            hwm = _hwm_mb(proc.pid)
            if hwm is not None:
                peak = max(peak, hwm)
            pid, status, _usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise RuntimeError(f"{cmd[:4]} timed out after {timeout:g} s")
            time.sleep(0.01)
        elapsed = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    return {"code": proc.returncode, "elapsed_s": elapsed, "rss_mb": peak, "output": text}


def _engine_run(emu: EmulatorProcess, prompts: Path, out: Path, limit: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "sfbatch",
        "run",
        str(prompts),
        "--out",
        str(out),
        "--base-url",
        emu.base_url,
        "--limit",
        str(limit),
        "--concurrency",
        "16",
        "--download-concurrency",
        "16",
    ]
    r = _wait4(cmd, timeout=600)
    if r["code"] != 0:
        raise RuntimeError(f"sfbatch run exited {r['code']}:\n{r['output'][-3000:]}")
    return r


def _baseline_run(emu: EmulatorProcess, prompts: Path, out: Path, limit: int) -> dict[str, Any]:
    params = {
        "kind": "threads",
        "base_url": emu.base_url,
        "prompts": str(prompts),
        "out": str(out),
        "limit": limit,
    }
    r = _wait4([sys.executable, str(SCRIPT), "--child", orjson.dumps(params).decode()], timeout=600)
    if r["code"] != 0:
        raise RuntimeError(f"baseline exited {r['code']}:\n{r['output'][-3000:]}")
    return r


def _child(kind: str, **params: Any) -> dict[str, Any]:
    if kind == "threads":
        from baselines import threads

        with open(params["prompts"], encoding="utf-8") as f:
            prompts = [line.strip() for line in f]
        result = threads.run(params["base_url"], prompts[: params["limit"]], Path(params["out"]))
        return {"ok": result["ok"], "lines": len(prompts)}
    if kind == "read_index":
        from sfbatch.manifest import day_start_iso
        from sfbatch.resume import read_index

        t0 = time.perf_counter()
        state = read_index([Path(params["path"])], day_start=day_start_iso(8.0))
        return {
            "seconds": time.perf_counter() - t0,
            "records": state.records,
            "counts": dict(state.counts()),
            "generated": len(state.generated),
            "damaged": len(state.damaged),
            "table_mb": (state.done.nbytes() + state.other.nbytes()) / 1e6,
        }
    if kind == "naive_resume":
        t0 = time.perf_counter()
        status: dict[str, str] = {}
        with open(params["path"], "rb") as f:
            for line in f:
                rec = orjson.loads(line)
                status[rec["id"]] = rec["status"]
        return {"seconds": time.perf_counter() - t0, "records": len(status)}
    raise ValueError(kind)


def _json_child(kind: str, path: Path) -> dict[str, Any]:
    params = orjson.dumps({"kind": kind, "path": str(path)}).decode()
    r = _wait4([sys.executable, str(SCRIPT), "--child", params], timeout=900)
    if r["code"] != 0:
        raise RuntimeError(f"{kind} exited {r['code']}:\n{r['output'][-3000:]}")
    return {**orjson.loads(r["output"].strip().splitlines()[-1]), "rss_mb": r["rss_mb"]}


# --------------------------------------------------------------------------- manifest


def _templates(real: dict[str, Any]) -> dict[str, bytes]:
    """Byte templates (``%(i)09d`` style) of each status, built from a real ``ok`` record."""

    def template(record: dict[str, Any]) -> bytes:
        text = orjson.dumps(record).replace(b"%", b"%%")
        for sentinel, fmt_ in (
            (b'"@ID@"', b'"%(id)s"'),
            (b'"@FP@"', b'"%(fp)s"'),
            (b'"@LINE@"', b"%(line)d"),
            (b"@PROMPT@", b"%(prompt)s"),
            (b"@PATH@", b"%(path)s"),
            (b'"@SEED@"', b"%(seed)d"),
            (b"@SHA@", b"%(sha)s"),
        ):
            text = text.replace(sentinel, fmt_)
        return text + b"\n"

    ok = dict(real)
    ok.update(
        id="@ID@",
        fingerprint="@FP@",
        line="@LINE@",
        prompt="@PROMPT@",
        requested_seed="@SEED@",
        seed="@SEED@",
        finished_at="2025-01-01T00:00:00.000Z",
    )
    ok["images"] = [{**real["images"][0], "path": "@PATH@", "sha256": "@SHA@"}]
    failed = {
        **ok,
        "status": "failed",
        "images": [],
        "seed": None,
        "timings": None,
        "billed_images": 0,
        "error": {
            "status": 503,
            "code": 50505,
            "message": "Model service overloaded. Please try again later.",
        },
    }
    invalid = {
        **failed,
        "status": "invalid",
        "attempts": 0,
        "requested_seed": None,
        "error": {
            "status": None,
            "code": "invalid",
            "message": "prompts.txt:12: batch_size must be 1..4, got 9",
        },
    }
    generated = {
        **ok,
        "status": "generated",
        "images": [],
        "urls": ["http://127.0.0.1:1/files/@SHA@.png"],
        "generated_at": 1.0e9,
    }
    return {
        name: template(rec)
        for name, rec in (
            ("ok", ok),
            ("failed", failed),
            ("invalid", invalid),
            ("generated", generated),
        )
    }


def write_manifest(path: Path, n: int, real: dict[str, Any], *, chunk: int = 100_000) -> int:
    """``n`` records: 1 % failed, 0.1 % invalid, 100 generated, the rest ok; returns bytes."""
    t = _templates(real)
    generated_every = max(1, n // 100)
    sha = b"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    with open(path, "wb") as f:
        for start in range(1, n + 1, chunk):
            lines = []
            for i in range(start, min(n + 1, start + chunk)):
                if i % generated_every == 7:
                    tpl = t["generated"]
                elif i % 1000 == 3:
                    tpl = t["invalid"]
                elif i % 100 == 5:
                    tpl = t["failed"]
                else:
                    tpl = t["ok"]
                mixed = i * 0x9E3779B97F4A7C15 & 0xFFFF_FFFF_FFFF_FFFF
                rid = b"%012x" % (mixed >> 16)
                lines.append(
                    tpl
                    % {
                        b"id": rid,
                        b"fp": b"%016x" % (mixed ^ 0x5BD1E995),
                        b"line": i,
                        b"seed": i * 7919 % 9999999999,
                        b"prompt": b"prompt number %d, a lighthouse at dusk, oil painting" % i,
                        b"path": b"images/%03d/%s_0.png" % (i % 1000, rid),
                        b"sha": sha,
                    }
                )
            f.write(b"".join(lines))
        return f.tell()


# --------------------------------------------------------------------------- parent


def measure(mode: str = "full", log: Any = print) -> dict[str, Any]:
    size = SIZES[mode]
    need_gb = size["big"] * 700 / 1e9 + 1
    free_gb = shutil.disk_usage(SCRIPT.parent).free / 1e9
    if free_gb < need_gb:
        raise RuntimeError(
            f"need about {need_gb:.1f} GB free under benchmarks/, have {free_gb:.1f}"
        )
    res: dict[str, Any] = {"mode": mode, **size}
    with work_dir("mem") as tmp, EmulatorProcess(image_px=64) as emu:
        t0 = time.perf_counter()
        small = write_prompts(tmp / "small.txt", size["small"])
        big = write_prompts(tmp / "big.txt", size["big"])
        res["prompt_file_mb"] = big.stat().st_size / 1e6
        res["prompt_gen_s"] = time.perf_counter() - t0
        for name, path in (("small", small), ("big", big)):
            res[f"engine_{name}"] = _engine_run(emu, path, tmp / f"out-{name}", size["limit"])
            res[f"baseline_{name}"] = _baseline_run(emu, path, tmp / f"base-{name}", size["limit"])
            log(
                f"  fig4 {name} file ({path.stat().st_size / 1e6:,.0f} MB): sfbatch peak "
                f"{res[f'engine_{name}']['rss_mb']:.0f} MB, baseline "
                f"{res[f'baseline_{name}']['rss_mb']:.0f} MB"
            )
        with open(tmp / "out-small" / "manifest.jsonl", "rb") as f:
            real = orjson.loads(f.readline())
        shutil.rmtree(tmp / "out-small", ignore_errors=True)
        shutil.rmtree(tmp / "out-big", ignore_errors=True)
        for p in (big, small):
            p.unlink()
        manifest = tmp / "manifest.jsonl"
        t0 = time.perf_counter()
        res["manifest_mb"] = write_manifest(manifest, size["big"], real) / 1e6
        res["manifest_gen_s"] = time.perf_counter() - t0
        res["resume"] = _json_child("read_index", manifest)
        log(
            f"  fig4 resume over {size['big']:,} records ({res['manifest_mb']:,.0f} MB): "
            f"{res['resume']['seconds']:.1f} s, peak {res['resume']['rss_mb']:.0f} MB"
        )
        res["naive_resume"] = _json_child("naive_resume", manifest)
        log(
            f"  fig4 naive resume: {res['naive_resume']['seconds']:.1f} s, peak "
            f"{res['naive_resume']['rss_mb']:.0f} MB"
        )
    for key in ("engine_small", "engine_big", "baseline_small", "baseline_big"):
        res[key].pop("output", None)
    return res


def report(r: dict[str, Any]) -> str:
    rows = [
        [
            f"peak RSS, {r['small']:,}-line file, --limit {r['limit']:,}",
            fmt(r["engine_small"]["rss_mb"]) + " MB",
            fmt(r["baseline_small"]["rss_mb"]) + " MB",
        ],
        [
            f"peak RSS, {r['big']:,}-line file ({r['prompt_file_mb']:,.0f} MB), "
            f"--limit {r['limit']:,}",
            fmt(r["engine_big"]["rss_mb"]) + " MB",
            fmt(r["baseline_big"]["rss_mb"]) + " MB",
        ],
        [
            "run wall time, small / big file",
            f"{r['engine_small']['elapsed_s']:.1f} / {r['engine_big']['elapsed_s']:.1f} s",
            f"{r['baseline_small']['elapsed_s']:.1f} / {r['baseline_big']['elapsed_s']:.1f} s",
        ],
        [
            f"resume: read {r['big']:,}-record manifest ({r['manifest_mb']:,.0f} MB)",
            f"{r['resume']['seconds']:.1f} s",
            f"{r['naive_resume']['seconds']:.1f} s",
        ],
        [
            "resume: peak RSS",
            fmt(r["resume"]["rss_mb"]) + " MB",
            fmt(r["naive_resume"]["rss_mb"]) + " MB",
        ],
    ]
    return table(rows, ["figure 4", "sfbatch", "baseline"]) + (
        f"\nbaselines: threads docs loop reading the prompt list into memory; resume by "
        f"orjson.loads of every line into {{id: status}}. manifest written in "
        f"{r['manifest_gen_s']:.0f} s; read_index counts: {r['resume']['counts']}, "
        f"damaged lines {r['resume']['damaged']}, key table {r['resume']['table_mb']:.0f} MB"
    )


def main() -> int:
    return script_main("figure 4: memory and resume", measure, report)


if __name__ == "__main__":
    if not child_main(_child):
        sys.exit(main())
