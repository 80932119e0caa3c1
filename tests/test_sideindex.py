"""manifest.idx, the side file resume reads instead of the manifest's text: it says exactly
what the text says, and anything wrong with it costs time, never correctness."""

from __future__ import annotations

import asyncio
import os
import sys
from asyncio.subprocess import DEVNULL
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import REPO, run_benchmark

from sfbatch.config import RunConfig
from sfbatch.emulator import Emulator
from sfbatch.loader import PromptSource
from sfbatch.manifest import ManifestWriter, iter_records, now_iso
from sfbatch.models import ModelRegistry
from sfbatch.pipeline import Pipeline
from sfbatch.resume import Cursor, ResumeIndex, read_index, refresh_side
from sfbatch.sideindex import read_blocks, side_path

REG = ModelRegistry.builtin()
FP = "0123456789abcdef"
TODAY = "2026-12-01T00:00:00.000Z"


def rec(row_id: str, status: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": row_id,
        "status": status,
        "finished_at": "2026-11-24T10:00:00.000Z",
        "billed_images": 0,
        "fingerprint": FP,
        **extra,
    }


def summary(index: ResumeIndex, ids: list[str]) -> Any:
    return (
        [index.status(i, FP) for i in ids],
        sorted(r["id"] for r in index.generated.values()),
        index.counts(),
        index.billed_today,
        dict(index.billed_by),
        [(d.line, d.reason) for d in index.damaged],
        index.records,
    )


def write_mixed(path: Path, n: int = 200) -> list[str]:
    """Records of every status in several writer sessions (several side blocks)."""
    ids = [f"r{i}" for i in range(n // 2)]
    for session in range(3):
        with ManifestWriter(path) as w:
            for i in range(session, n, 3):
                status = ("ok", "failed", "generated", "ok", "invalid", "ok")[i % 6]
                billed = {"billed_images": 2, "finished_at": now_iso(), "key_index": i % 2}
                w.append(
                    rec(
                        ids[i % len(ids)],
                        status,
                        model="Kwai-Kolors/Kolors",
                        urls=["http://x/y.png"] if status == "generated" else [],
                        **(billed if status == "ok" else {}),
                    )
                )
    return ids


def text_and_side(path: Path, ids: list[str]) -> tuple[Any, Any]:
    text = read_index([path], day_start=TODAY, use_side=False)
    side = read_index([path], day_start=TODAY)
    return summary(text, ids), summary(side, ids)


def test_the_writer_describes_every_record_and_resume_reads_no_text(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    ids = write_mixed(path)
    assert side_path(path).exists()
    text, side = text_and_side(path, ids)
    assert side == text
    index = read_index([path], day_start=TODAY)
    assert index.sources[path].text_records == 0 and index.sources[path].side_records == 200
    assert index.billed_by[0, "Kwai-Kolors/Kolors"] and index.billed_by[1, "Kwai-Kolors/Kolors"]
    assert sum(index.billed_by.values()) == index.billed_today > 0


def test_lines_appended_by_hand_are_read_as_text_then_a_snapshot_covers_them(
    tmp_path: Path,
) -> None:
    path = tmp_path / "manifest.jsonl"
    ids = write_mixed(path)
    with open(path, "ab") as f:
        f.write(b"not json\n" + orjson.dumps(rec("r1", "ok")) + b"\n" + b'{"id":"torn')
    text, side = text_and_side(path, ids)
    assert side == text and text[5][-1] == (201, "not a complete JSON record")
    index = read_index([path], day_start=TODAY)
    assert index.sources[path].text_records == 1
    assert refresh_side(index, path, min_records=0)
    again = read_index([path], day_start=TODAY)
    assert again.sources[path].text_records == 0 and again.sources[path].side_end > 0
    assert summary(again, ids) == text  # damaged lines still reported, from the snapshot
    # The torn tail is cut by the next writer; its record follows the snapshot.
    with ManifestWriter(path) as w:
        w.append(rec("r2", "ok"))
    last = read_index([path], day_start=TODAY)
    assert last.status("r2", FP) == "ok" and last.sources[path].text_records == 0
    assert summary(last, ids) == summary(read_index([path], day_start=TODAY, use_side=False), ids)


@pytest.mark.parametrize(
    "damage",
    ["torn_block", "garbage", "empty", "truncated_manifest", "edited_manifest", "replaced"],
)
def test_a_wrong_side_file_costs_time_never_correctness(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "manifest.jsonl"
    ids = write_mixed(path)
    side = side_path(path)
    if damage == "torn_block":
        side.write_bytes(side.read_bytes()[:-7])
    elif damage == "garbage":
        raw = bytearray(side.read_bytes())
        raw[200:260] = os.urandom(60)
        side.write_bytes(bytes(raw))
    elif damage == "empty":
        side.write_bytes(b"")
    elif damage == "truncated_manifest":
        raw = path.read_bytes()
        with open(path, "r+b") as f:  # same inode, a shorter file with other lines
            f.truncate(len(raw) // 2)
            f.seek(0, os.SEEK_END)
            f.write(b"\n" + orjson.dumps(rec("new", "ok")) + b"\n")
    elif damage == "edited_manifest":
        raw = path.read_bytes()
        with open(path, "r+b") as f:  # the last record of the file, ok -> failed, in place
            start = raw.rstrip(b"\n").rfind(b"\n") + 1
            f.seek(start)
            f.write(orjson.dumps(rec("r5", "failed", prompt="x" * 40)) + b"\n")
    elif damage == "replaced":
        raw = path.read_bytes()
        path.unlink()
        path.write_bytes(raw.replace(b'"status":"ok"', b'"status":"failed"', 5))
    text, side_summary = text_and_side(path, [*ids, "new"])
    assert side_summary == text
    blocks = list(read_blocks(path))
    if damage in ("garbage", "empty", "replaced"):
        assert blocks == [] or damage == "garbage"
    # The next resume rewrites it, and reads the same again.
    index = read_index([path], day_start=TODAY)
    refresh_side(index, path, min_records=0)
    assert summary(read_index([path], day_start=TODAY), [*ids, "new"]) == text


def test_a_writer_after_a_stale_side_file_writes_nothing_until_it_is_rebuilt(
    tmp_path: Path,
) -> None:
    path = tmp_path / "manifest.jsonl"
    ids = write_mixed(path)
    with open(path, "ab") as f:  # lines the side file does not describe
        f.write(orjson.dumps(rec("r1", "failed")) + b"\n")
    with ManifestWriter(path) as w:
        w.append(rec("r3", "invalid"))
    index = read_index([path], day_start=TODAY)
    assert index.sources[path].text_records == 2  # both read as text
    text = summary(read_index([path], day_start=TODAY, use_side=False), ids)
    assert summary(index, ids) == text
    assert refresh_side(index, path)  # short of the manifest's end: rewritten
    with ManifestWriter(path) as w:
        w.append(rec("r4", "ok"))
    final = read_index([path], day_start=TODAY)
    assert final.sources[path].text_records == 0
    assert summary(final, ids) == summary(read_index([path], day_start=TODAY, use_side=False), ids)


def test_records_older_than_fingerprints_stop_the_side_file(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    with ManifestWriter(path) as w:
        w.append(rec("a", "ok"))
        legacy = {k: v for k, v in rec("000000002", "ok", prompt="p", model="m").items()}
        del legacy["fingerprint"]
        w.append(legacy)  # type: ignore[arg-type]
        w.append(rec("c", "ok"))
    index = read_index([path], day_start="")
    assert index.sources[path].side_records == 1 and index.sources[path].text_records == 2
    assert index.legacy_records == 1 and not refresh_side(index, path, min_records=0)


def config_for(emu: Emulator, out: Path, **overrides: Any) -> RunConfig:
    settings: dict[str, Any] = {
        "out_dir": out,
        "api_key": emu.api_key,
        "base_url": emu.base_url,
        "concurrency": 4,
        "download_concurrency": 4,
        "backoff_base_s": 0.05,
        "backoff_cap_s": 0.5,
        **overrides,
    }
    return RunConfig(**settings)


async def test_a_resumed_run_skips_from_the_side_file_and_keeps_it_right(tmp_path: Path) -> None:
    items = [f"a lighthouse at dusk, study {i}" for i in range(40)]
    async with Emulator(host="127.0.0.1", port=0) as emu:
        cfg = config_for(emu, tmp_path)
        source = PromptSource.from_records(items[:25], defaults=cfg.defaults, registry=REG)
        assert (await Pipeline(cfg, source, registry=REG).run()).exit_code == 0
        manifest = tmp_path / "manifest.jsonl"
        assert read_index([manifest], day_start="").sources[manifest].text_records == 0
        source = PromptSource.from_records(items, defaults=cfg.defaults, registry=REG)
        result = await Pipeline(cfg, source, registry=REG).run()
        requests = emu.stats()["generation_requests"]
    assert result.exit_code == 0 and requests == 40
    ok = Counter(r["id"] for r in iter_records(manifest) if r["status"] == "ok")
    assert len(ok) == 40 and set(ok.values()) == {1}
    index = read_index([manifest], day_start="")
    assert index.sources[manifest].text_records == 0 and index.counts() == {"ok": 40}


async def test_billing_today_is_charged_to_the_key_and_model_that_made_it(tmp_path: Path) -> None:
    keys = ("sk-alpha-0001", "sk-bravo-0002")
    model = "Kwai-Kolors/Kolors"
    async with Emulator(host="127.0.0.1", port=0, api_keys=frozenset(keys)) as emu:
        cfg = config_for(emu, tmp_path, api_key=",".join(keys), ipd=3)
        # Earlier today key 1 made 3 images: key 1 is out of quota, key 0 is not.
        with ManifestWriter(tmp_path / "manifest.jsonl") as w:
            for i in range(3):
                w.append(
                    rec(f"old{i}", "ok", finished_at=now_iso(), billed_images=1, model=model)
                    | {"key_index": 1}
                )
        source = PromptSource.from_records(
            [f"a harbour at dawn, study {i}" for i in range(3)], defaults=cfg.defaults, registry=REG
        )
        result = await Pipeline(cfg, source, registry=REG).run()
        served = emu.stats()["generation_requests"]
    new = [r for r in iter_records(tmp_path / "manifest.jsonl") if not r["id"].startswith("old")]
    assert served == 3 and result.exit_code == 0, result.message
    assert [r["status"] for r in new] == ["ok"] * 3
    assert {r.get("key_index") for r in new} == {0}  # key 1's images were not key 0's
    used = {k["key_index"]: k for k in result.summary["keys"]}
    assert used[1]["set_aside"] == "daily_quota" and used[0]["set_aside"] is None


async def test_kill_9_mid_run_then_resume_keeps_side_file_and_manifest_in_step(
    tmp_path: Path,
) -> None:
    src = tmp_path / "p.txt"
    src.write_text("".join(f"a lighthouse, study {i}\n" for i in range(120)))
    out = tmp_path / "out"
    manifest = out / "manifest.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SILICONFLOW_")}
    env.update(SILICONFLOW_API_KEY="sk-emulator", PYTHONPATH=str(REPO))

    def lines() -> int:
        return manifest.read_bytes().count(b"\n") if manifest.exists() else 0

    async with Emulator(latency_s=0.1, latency_jitter_s=0.05) as emu:
        args = ["-m", "sfbatch", "run", str(src), "--out", str(out), "--base-url", emu.base_url]
        args += ["--concurrency", "6", "--no-progress"]
        for _ in range(2):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, *args, env=env, cwd=REPO, stdout=DEVNULL, stderr=DEVNULL
            )
            target = lines() + 15
            async with asyncio.timeout(60):
                while lines() < target:
                    assert proc.returncode is None, "the run ended before it could be killed"
                    await asyncio.sleep(0.02)
            proc.kill()
            await proc.wait()
            ids = [r["id"] for r in iter_records(manifest)]
            text, side = text_and_side(manifest, ids)
            assert side == text  # whatever the kill left, the side file never lies
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *args, env=env, cwd=REPO, stdout=DEVNULL, stderr=DEVNULL
        )
        assert await asyncio.wait_for(proc.wait(), 120) == 0
        requests = emu.stats()["generation_requests"]
    ok = Counter(r["id"] for r in iter_records(manifest) if r["status"] == "ok")
    assert len(ok) == 120 and set(ok.values()) == {1}  # nothing lost, nothing made twice
    assert requests - 120 <= 2 * (6 + 8 + 4)  # at most what was in flight at each kill
    index = read_index([manifest], day_start=TODAY)
    assert index.sources[manifest].text_records == 0 and index.counts() == {"ok": 120}


# -- the resume cursor: jumping past a file's done prefix ----------------------------


async def run_file(
    emu: Emulator, out: Path, src: Path, **overrides: Any
) -> tuple[Any, dict[str, Any]]:
    cfg = config_for(emu, out, **overrides)
    source = PromptSource(src, defaults=cfg.defaults, registry=REG, base_seed=cfg.build.base_seed)
    result = await Pipeline(cfg, source, registry=REG).run()
    assert result.exit_code == 0, result.message
    return result, result.summary


def outcome(out: Path) -> list[tuple[str, str, str, int]]:
    """Every record of the manifest past its first run: id, fingerprint, status, line."""
    return sorted(
        (r["id"], r["fingerprint"], r["status"], r["line"])
        for r in iter_records(out / "manifest.jsonl")
    )


@pytest.fixture
def small_cursor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sfbatch.resume._CURSOR_MIN_ROWS", 5)


@pytest.mark.usefixtures("small_cursor")
@pytest.mark.parametrize("edit", ["append", "change_prefix", "repair", "seed", "none"])
async def test_a_cursor_jump_makes_exactly_what_the_long_way_makes(
    tmp_path: Path, edit: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two output dirs resumed alike, one with its cursor, one without: same records."""
    jumps: list[tuple[str, int | None]] = []
    jump = Cursor.jump

    def spy(self: Cursor, path: str, identity: bytes) -> Any:
        found = jump(self, path, identity)
        jumps.append((Path(path).stem, found.rows if found else None))
        return found

    monkeypatch.setattr(Cursor, "jump", spy)
    lines = [f"a lighthouse, study {i % 9}\n" for i in range(30)]  # repeats across the cut
    first, second = lines[:20], lines[20:]
    results: dict[str, Any] = {}
    async with Emulator(host="127.0.0.1", port=0) as emu:
        for name in ("cursor", "long"):
            src = tmp_path / f"{name}.txt"
            out = tmp_path / name
            src.write_text("".join(first))
            await run_file(emu, out, src)  # all 20 made
            src.write_text("".join(first) + "a new row\n")
            await run_file(emu, out, src)  # 20 done, then a new row: the cursor is written
            has_cursor = (out / "manifest.cursor").exists()
            assert has_cursor
            if name == "long":
                (out / "manifest.cursor").unlink()
            overrides: dict[str, Any] = {}
            text = "".join(first) + "a new row\n"
            if edit == "append":
                text += "".join(second)
            elif edit == "change_prefix":
                text = text.replace("study 3\n", "study 3, at night\n", 1)
            elif edit == "repair":  # a done row of the prefix is marked damaged
                record = next(r for r in iter_records(out / "manifest.jsonl") if r["line"] == 4)
                damaged = {"status": None, "code": "damaged", "message": "x"}
                with ManifestWriter(out / "manifest.jsonl") as w:
                    w.append({**record, "status": "failed", "error": damaged})  # type: ignore[typeddict-item]
            elif edit == "seed":
                overrides["base_seed"] = 7
            src.write_text(text)
            before = emu.stats()["generation_requests"]
            result, summary = await run_file(emu, out, src, **overrides)
            results[name] = (
                emu.stats()["generation_requests"] - before,
                [(i, f, s, n) for i, f, s, n in outcome(out)],
                summary["manifest"],
                summary["history"],
                summary["found"]["new_or_changed"],
                summary["run"]["skipped_as"],
                result.summary["run"].get("rows_read"),
            )
    assert results["cursor"] == results["long"]
    # Run 2 wrote the cursor (20 done rows, then a new one); run 3 jumped where it holds.
    holds = edit in ("append", "none")
    assert jumps == [
        ("cursor", None),
        ("cursor", None),
        ("cursor", 20 if holds else None),
        ("long", None),
        ("long", None),
        ("long", None),
    ]
    made = results["cursor"][0]
    expected = {"append": 10, "change_prefix": 1, "repair": 1, "seed": 21, "none": 0}
    assert made == expected[edit]


def test_bench_resume_smoke_runs_and_reports_every_case(tmp_path: Path) -> None:
    proc = run_benchmark("bench_resume.py", "--smoke", "--dir", str(tmp_path), timeout_s=300)
    for row in ("resume with manifest.idx", "the cursor an earlier resume left", "naive"):
        assert row in proc.stdout
    assert not list(tmp_path.iterdir())  # its files are gone
