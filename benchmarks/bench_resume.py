"""Resume speed with the side file ``manifest.idx`` (issues 10 and 12), each beside the naive
full parse of the same manifest in the same run.

1. Reading the resume index of a big manifest (``--records``, default 10,000,000), in
   child processes (seconds in the child, peak RSS polled): ``read_index`` of the text
   alone (what resume did before the side file), the first resume (no side file yet:
   the text, then ``refresh_side`` writes one), a resume with the side file, and the
   naive ``{id: status}`` of ``orjson.loads`` of every line. The manifest is
   ``bench_memory.write_manifest``'s (1 % failed, 0.1 % invalid, 100 generated).
2. Seconds to the first request (``--rows``, default 1,000,000): a ``.txt`` of that many
   prompts whose rows but the last are done (a manifest written by ``ManifestWriter``,
   realistic records), resumed by ``python -m sfbatch run`` against the emulator: the
   time from spawning the process to the emulator's first generation request (polled
   every 5 ms), for the manifest (a) with the side file the writer left, (b) after a
   resume compacted it, (c) the same plus the resume cursor (``manifest.cursor``) an
   earlier resume left, (d) without either. Beside it: the naive full parse of the
   same manifest in a child (seconds in the child, and spawn to exit).

    python3 benchmarks/bench_resume.py [--records N] [--rows N] [--dir /tmp]
    python3 benchmarks/bench_resume.py --smoke

Files go under ``--dir`` (default /tmp; a 10,000,000-record manifest is about 7 GB)
and are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import orjson
from bench_memory import _wait4, write_manifest
from bench_util import EmulatorProcess, child_env, child_main, table, work_dir, write_prompts

SCRIPT = Path(__file__).resolve()
MODEL = "Kwai-Kolors/Kolors"
SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def real_record() -> dict[str, Any]:
    """An ``ok`` record as a run writes it (every field, one image)."""
    return {
        "id": "3202f6a5aabe",
        "status": "ok",
        "finished_at": "2025-01-01T00:00:00.000Z",
        "billed_images": 1,
        "fingerprint": "0123456789abcdef",
        "line": 1,
        "file": "prompts.txt",
        "variation": 0,
        "prompt": "a lighthouse at dusk",
        "negative_prompt": None,
        "model": MODEL,
        "image_size": "1024x1024",
        "batch_size": 1,
        "num_inference_steps": 20,
        "guidance_scale": 7.5,
        "prompt_enhancement": False,
        "requested_seed": 1234567,
        "seed": 1234567,
        "timings": {"inference": 1.234},
        "images": [{"path": "images/000/3202f6a5aabe_0.png", "sha256": SHA, "bytes": 12345}],
        "attempts": 1,
        "latency_s": 1.301,
        "trace_id": "ti_0123456789abcdefghij",
        "key_index": 0,
        "error": None,
        "duplicate_of": None,
    }


# --------------------------------------------------------------------------- children


def _child(kind: str, path: str, **params: Any) -> dict[str, Any]:
    manifest = Path(path)
    if kind in ("text", "first", "side"):
        from sfbatch.resume import read_index, refresh_side

        t0 = time.perf_counter()
        day_start = "2026-01-01T00:00:00.000Z"
        index = read_index([manifest], day_start=day_start, use_side=kind != "text")
        read_s = time.perf_counter() - t0
        wrote = refresh_side(index, manifest) if kind == "first" else False
        source = index.sources[manifest]
        return {
            "seconds": time.perf_counter() - t0,
            "read_s": read_s,
            "wrote_side": wrote,
            "records": index.records,
            "text_records": source.text_records,
            "counts": dict(index.counts()),
            "damaged": len(index.damaged),
            "generated": len(index.generated),
        }
    if kind == "naive":
        t0 = time.perf_counter()
        status: dict[str, str] = {}
        with open(manifest, "rb") as f:
            for line in f:
                rec = orjson.loads(line)
                status[rec["id"]] = rec["status"]
        return {"seconds": time.perf_counter() - t0, "records": len(status)}
    if kind == "prepare":
        return _prepare(manifest, Path(params["prompts"]))
    raise ValueError(kind)


def _json_child(kind: str, path: Path, **params: Any) -> dict[str, Any]:
    body = orjson.dumps({"kind": kind, "path": str(path), **params}).decode()
    r = _wait4([sys.executable, str(SCRIPT), "--child", body], timeout=1800)
    if r["code"] != 0:
        raise RuntimeError(f"{kind} exited {r['code']}:\n{r['output'][-3000:]}")
    return {**orjson.loads(r["output"].strip().splitlines()[-1]), **r, "output": None}


def _prepare(manifest: Path, prompts: Path) -> dict[str, Any]:
    """Write an ``ok`` record for every row of ``prompts`` but the last, as a run would."""
    from sfbatch.loader import PromptSource
    from sfbatch.manifest import ManifestWriter

    template = real_record()
    rows = list_rows = 0
    t0 = time.perf_counter()
    with ManifestWriter(manifest) as writer:
        source = PromptSource(prompts)
        previous = None
        for row in source:
            if previous is not None:
                writer.append(
                    {  # type: ignore[typeddict-item]
                        **template,
                        "id": previous.id,
                        "fingerprint": previous.fingerprint,
                        "line": previous.line,
                        "prompt": previous.prompt,
                        "requested_seed": previous.request["seed"],
                        "seed": previous.request["seed"],
                        "images": [{**template["images"][0], "path": f"images/{previous.id}.png"}],
                    }
                )
                rows += 1
            previous = row
            list_rows += 1
    return {"records": rows, "rows": list_rows, "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- parent


def first_request_s(emu: EmulatorProcess, prompts: Path, out: Path) -> dict[str, Any]:
    """Spawn ``sfbatch run`` and time it until the emulator sees its first generation."""
    before = emu.stats()["generation_requests"]
    cmd = [sys.executable, "-m", "sfbatch", "run", str(prompts), "--out", str(out)]
    cmd += ["--base-url", emu.base_url, "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = None
    while first is None:
        if emu.stats()["generation_requests"] > before:
            first = time.perf_counter() - t0
        elif proc.poll() is not None:
            _, err = proc.communicate()
            raise RuntimeError(f"run ended before any request: {err[-2000:]!r}")
        else:
            time.sleep(0.005)
    _, err = proc.communicate(timeout=600)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"run exited {proc.returncode}: {err[-2000:]!r}")
    return {"first_request_s": first, "exit_s": total}


def measure(records: int, rows: int, base: Path, log: Any = print) -> dict[str, Any]:
    res: dict[str, Any] = {"records": records, "rows": rows}
    with work_dir("resume", base) as tmp:
        if records:
            manifest = tmp / "big" / "manifest.jsonl"
            manifest.parent.mkdir()
            t0 = time.perf_counter()
            res["manifest_mb"] = write_manifest(manifest, records, real_record()) / 1e6
            log(f"  manifest of {records:,} records: {res['manifest_mb']:,.0f} MB, "
                f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
            for kind in ("naive", "text", "first", "side", "naive", "side"):
                r = _json_child(kind, manifest)
                res.setdefault(kind, []).append(r)
                log(f"  {kind}: {r['seconds']:.1f} s in the child, peak {r['rss_mb']:.0f} MB")
            shutil.rmtree(manifest.parent)
        if rows:
            prompts = write_prompts(tmp / "prompts.txt", rows)
            base_dir = tmp / "base"
            base_dir.mkdir()
            man = base_dir / "manifest.jsonl"
            res["prepare"] = _json_child("prepare", man, prompts=str(prompts))
            res["resume_manifest_mb"] = man.stat().st_size / 1e6
            log(f"  {rows:,}-row file, manifest {res['resume_manifest_mb']:,.0f} MB written")
            # The side file is bound to the manifest's inode (a copy is another file): each
            # case runs on the one manifest, cut back to its size after, with its side file.
            sides = tmp / "sides"
            sides.mkdir()
            shutil.copy(base_dir / "manifest.idx", sides / "writer.idx")
            _json_child("first", man)  # what a resume leaves: one snapshot block
            shutil.copy(base_dir / "manifest.idx", sides / "compacted.idx")
            size = man.stat().st_size
            cursor = base_dir / "manifest.cursor"

            def reset(case: str) -> None:
                os.truncate(man, size)
                shutil.rmtree(base_dir / "images", ignore_errors=True)
                for suffix in (".idx", ".cursor"):
                    made = base_dir / f"manifest{suffix}"
                    made.unlink(missing_ok=True)
                    saved = sides / f"{case}{suffix}"
                    if saved.exists():
                        shutil.copy(saved, made)

            with EmulatorProcess(image_px=64) as emu:
                # A resume that gets to the last row leaves a cursor past the done rows.
                first_request_s(emu, prompts, base_dir)
                shutil.copy(cursor, sides / "cursor.cursor")
                shutil.copy(sides / "compacted.idx", sides / "cursor.idx")
                cases: dict[str, list[dict[str, Any]]] = {}
                for _ in range(2):
                    for case in ("writer", "compacted", "cursor", "none"):
                        reset(case)
                        r = first_request_s(emu, prompts, base_dir)
                        cases.setdefault(case, []).append(r)
                        log(f"  first request, {case}: {r['first_request_s']:.2f} s")
                    reset("none")
                    n = _json_child("naive", man)
                    cases.setdefault("naive", []).append(n)
                    log(f"  naive parse: {n['seconds']:.2f} s in the child, {n['elapsed_s']:.2f} s")
                res["first_request"] = cases
    return res


def report(r: dict[str, Any]) -> str:
    out = []
    if r["records"]:

        def span(kind: str, key: str = "seconds") -> str:
            values = [x[key] for x in r[kind]]
            return " / ".join(f"{v:.2f}" for v in values)

        cases = (
            ("text", "read_index, text only (before the side file)"),
            ("first", "first resume: text, then refresh_side writes manifest.idx"),
            ("side", "resume with manifest.idx"),
            ("naive", "naive orjson.loads of every line"),
        )
        rows = [[name, span(kind) + " s", span(kind, "rss_mb") + " MB"] for kind, name in cases]
        out.append(f"resume index over {r['records']:,} records ({r['manifest_mb']:,.0f} MB):")
        out.append(table(rows, ["case", "seconds (in the child)", "peak RSS"]))
    if r["rows"]:
        f = r["first_request"]

        def both(case: str) -> str:
            return " / ".join(f"{x['first_request_s']:.2f}" for x in f[case])

        naive = [x["seconds"] for x in f["naive"]]
        naive_wall = [x["elapsed_s"] for x in f["naive"]]
        rows = [
            ["side file as the writer left it (entries blocks)", both("writer") + " s"],
            ["side file compacted by an earlier resume (snapshot)", both("compacted") + " s"],
            ["... and the cursor an earlier resume left (jump)", both("cursor") + " s"],
            ["no side file (text parse, then one is written)", both("none") + " s"],
            [
                "naive full parse: in the child / spawn to exit",
                " / ".join(f"{a:.2f}" for a in naive)
                + " s; "
                + " / ".join(f"{b:.2f}" for b in naive_wall)
                + " s",
            ],
        ]
        out.append(
            f"\nseconds from spawning `sfbatch run` to the emulator's first request, "
            f"{r['rows']:,}-row .txt, all rows but the last done "
            f"(manifest {r['resume_manifest_mb']:,.0f} MB):"
        )
        out.append(table(rows, ["case", "seconds (two rounds)"]))
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000_000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--smoke", action="store_true", help="20,000 records and rows")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.smoke:
        args.records = args.rows = 20_000
    res = measure(args.records, args.rows, args.dir, log=lambda m: print(m, file=sys.stderr))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    print(report(res))
    return 0


if __name__ == "__main__":
    if not child_main(_child):
        sys.exit(main())
