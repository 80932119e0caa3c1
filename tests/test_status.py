"""``sfbatch status`` and ``sfbatch verify`` on output directories built by hand."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson
import pytest

from sfbatch.cli import main
from sfbatch.loader import PromptSource
from sfbatch.manifest import ManifestWriter, day_start_iso
from sfbatch.status import (
    NoManifestError,
    format_status,
    format_verify,
    message_class,
    percentile,
    status_report,
    verify,
)

# 2026-11-24T04:00:00Z, i.e. noon in UTC+8; that account day starts 2026-11-23T16:00:00Z.
NOW = 1795492800.0
TODAY = "2026-11-24T03:00:00.000Z"
YESTERDAY = "2026-11-23T10:00:00.000Z"


def record(
    row_id: str,
    status: str,
    *,
    finished_at: str = TODAY,
    billed: int = 0,
    images: list[dict[str, Any]] | None = None,
    error: dict[str, Any] | None = None,
    latency_s: float = 1.0,
    inference: float | None = 0.5,
    batch_size: int = 1,
    **extra: Any,
) -> dict[str, Any]:
    """A manifest record as ARCHITECTURE.md has it, FRONT_FIELDS first."""
    line = int(row_id) if row_id.isdigit() else 1
    return {
        "id": row_id,
        "status": status,
        "finished_at": finished_at,
        "billed_images": billed,
        "line": line,
        "file": "prompts.txt",
        "variation": 0,
        "prompt": f"prompt {row_id}",
        "negative_prompt": None,
        "model": "Kwai-Kolors/Kolors",
        "image_size": "1024x1024",
        "batch_size": batch_size,
        "num_inference_steps": 20,
        "guidance_scale": 7.5,
        "prompt_enhancement": False,
        "requested_seed": line,
        "seed": line if status == "ok" else None,
        "timings": {"inference": inference} if status == "ok" else None,
        "images": images or [],
        "attempts": 1,
        "latency_s": latency_s,
        "trace_id": "trace",
        "error": error,
        **extra,
    }


def store(out: Path, row_id: str, data: bytes, index: int = 0) -> dict[str, Any]:
    """Write an image file and return its ``images`` entry."""
    rel = f"images/{(int(row_id) // 1000) % 1000:03d}/{row_id}_{index}.png"
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def write(path: Path, records: list[dict[str, Any]]) -> None:
    with ManifestWriter(path) as writer:
        for rec in records:
            writer.append(rec)


def err(status: int | None, code: int | str, message: str) -> dict[str, Any]:
    return {"status": status, "code": code, "message": message}


# -- status --------------------------------------------------------------------------


def test_counts_use_the_latest_record_and_group_failures_by_reason(tmp_path: Path) -> None:
    write(
        tmp_path / "manifest.jsonl",
        [
            record("000000001", "failed", error=err(503, 50300, "busy"), billed=0),
            record("000000002", "ok", images=[{"path": "a.png", "sha256": "0", "bytes": 10}]),
            record(
                "000000003",
                "invalid",
                error=err(None, "invalid", "p.txt:3: batch_size must be 1..4, got 9"),
            ),
            record(
                "000000004",
                "invalid",
                error=err(None, "invalid", "p.txt:4: batch_size must be 1..4, got 7"),
            ),
            record(
                "000000005", "failed", error=err(400, 20012, "prompt 'abc' too long: 5000 > 2000")
            ),
            record(
                "000000006", "failed", error=err(400, 20012, "prompt 'xyz' too long: 4100 > 2000")
            ),
            record("000000007", "generated", billed=1),
            record("000000008", "duplicate", duplicate_of="000000002"),
            # Supersedes the failure of 000000001.
            record("000000001", "ok", images=[{"path": "b.png", "sha256": "0", "bytes": 32}]),
        ],
    )
    report = status_report(tmp_path, now=NOW)
    assert report["counts"] == {"ok": 2, "failed": 2, "invalid": 2, "generated": 1, "duplicate": 1}
    assert report["lines"] == 9 and report["ids"] == 8
    assert report["images"] == 2 and report["bytes"] == 42
    assert report["reasons"]["failed"] == [
        {
            "reason": "400 20012: prompt '…' too long: N > N",
            "count": 2,
            "example": "prompt 'abc' too long: 5000 > 2000",
        }
    ]
    assert report["reasons"]["invalid"][0]["reason"] == "invalid: batch_size must be N..N, got N"
    assert report["reasons"]["invalid"][0]["count"] == 2
    assert report["pending"] is None and report["quota"]["nights_left"] is None


def test_shards_are_read_together(tmp_path: Path) -> None:
    write(
        tmp_path / "manifest-0-of-2.jsonl",
        [record("000000001", "ok"), record("000000003", "failed")],
    )
    write(
        tmp_path / "manifest-1-of-2.jsonl", [record("000000002", "ok"), record("000000003", "ok")]
    )
    report = status_report(tmp_path, now=NOW)
    assert report["manifests"] == ["manifest-0-of-2.jsonl", "manifest-1-of-2.jsonl"]
    assert report["counts"]["ok"] == 3 and report["counts"]["failed"] == 0


def test_torn_last_line_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    write(path, [record("000000001", "ok"), record("000000002", "failed", error=err(400, 1, "x"))])
    with open(path, "ab") as f:
        f.write(b'{"id":"000000002","status":"ok","fini')  # a crash mid-write
    report = status_report(tmp_path, now=NOW)
    assert report["counts"]["ok"] == 1 and report["counts"]["failed"] == 1
    assert report["lines"] == 2


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([], 0.5) is None
    assert percentile([7.0], 0.95) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0.5) == pytest.approx(50.5)
    assert percentile(values, 0.95) == pytest.approx(95.05)
    assert percentile(list(reversed(values)), 0.95) == pytest.approx(95.05)


def test_latency_and_inference_percentiles_come_from_ok_records(tmp_path: Path) -> None:
    records = [
        record(f"{i:09d}", "ok", latency_s=float(i), inference=i / 10) for i in range(1, 101)
    ]
    records.append(record("000000101", "failed", latency_s=1000.0, error=err(500, 1, "x")))
    write(tmp_path / "manifest.jsonl", records)
    report = status_report(tmp_path, now=NOW)
    assert report["latency_s"] == {"n": 100, "p50": 50.5, "p95": 95.05}
    assert report["inference_s"] == {"n": 100, "p50": 5.05, "p95": 9.505}


def test_throughput_over_the_span_and_the_active_time(tmp_path: Path) -> None:
    write(
        tmp_path / "manifest.jsonl",
        [
            # Night one: 3 ok in 10 minutes (gaps of 5 min count as active).
            record("000000001", "ok", finished_at="2026-11-22T20:00:00.000Z"),
            record("000000002", "ok", finished_at="2026-11-22T20:05:00.000Z"),
            record("000000003", "ok", finished_at="2026-11-22T20:10:00.000Z"),
            # Night two, 24 h later: 1 ok, 1 failed.
            record("000000004", "ok", finished_at="2026-11-23T20:10:00.000Z"),
            record(
                "000000005",
                "failed",
                finished_at="2026-11-23T20:15:00.000Z",
                error=err(400, 1, "x"),
            ),
        ],
    )
    tp = status_report(tmp_path, now=NOW)["throughput"]
    assert tp["span_h"] == pytest.approx(24.25, abs=1e-3)
    assert tp["ok_per_hour"] == pytest.approx(round(4 / 24.25, 1))
    assert tp["active_h"] == pytest.approx(0.25, abs=1e-3)  # three 5-minute gaps
    assert tp["ok_per_active_hour"] == pytest.approx(16.0)


def test_billed_today_and_total_sum_every_line(tmp_path: Path) -> None:
    assert day_start_iso(8, now=NOW) == "2026-11-23T16:00:00.000Z"
    write(
        tmp_path / "manifest.jsonl",
        [
            record("000000001", "failed", finished_at=YESTERDAY, billed=2, error=err(500, 1, "x")),
            # The retry today is charged again; the earlier charge still happened.
            record("000000001", "ok", finished_at=TODAY, billed=2),
            record("000000002", "ok", finished_at=TODAY, billed=4),
            record("000000003", "invalid", finished_at=TODAY, error=err(None, "invalid", "x")),
        ],
    )
    billed = status_report(tmp_path, now=NOW)["billed"]
    assert billed["today"] == 6 and billed["total"] == 8
    assert billed["day_start"] == "2026-11-23T16:00:00.000Z"
    # In UTC the day started at 2026-11-24T00:00Z, after YESTERDAY and before TODAY.
    assert status_report(tmp_path, now=NOW, tz_offset_h=0)["billed"]["today"] == 6
    # In UTC+14 it started at 2026-11-23T10:00Z: YESTERDAY's charge counts too.
    assert status_report(tmp_path, now=NOW, tz_offset_h=14)["billed"]["today"] == 8


def test_pending_and_nights_left_from_the_input(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(1, 11)))  # 10 rows
    out = tmp_path / "out"
    rows = list(PromptSource(prompts))
    write(
        out / "manifest.jsonl",
        [
            record(rows[0].id, "ok", billed=1, fingerprint=rows[0].fingerprint),
            record(rows[1].id, "ok", billed=1, fingerprint=rows[1].fingerprint),
            record(rows[2].id, "failed", error=err(400, 1, "x"), fingerprint=rows[2].fingerprint),
            record(rows[3].id, "invalid", error=err(None, "invalid", "x")),
            # not done: still to download
            record(rows[4].id, "generated", billed=1, fingerprint=rows[4].fingerprint),
            # history: a row edited (same id, another fingerprint) and a row removed
            record(rows[5].id, "ok", fingerprint="0123456789abcdef"),
            record("000000042", "ok"),
        ],
    )
    report = status_report(out, input_path=prompts, ipd=4, now=NOW)
    assert report["input_rows"] == 10
    assert report["pending"] == 6  # 10 rows - 4 done
    assert report["history"] == 2
    assert "history" in format_status(report)
    assert report["pending_images"] == 6
    assert report["quota"] == {"ipd": 4, "ipd_from": "--ipd", "left_today": 1, "nights_left": 2}

    # Without --ipd the quota recorded by the last run is used.
    (out / "summary.json").write_bytes(orjson.dumps({"quota": {"ipd": 5, "billed_today": 3}}))
    report = status_report(out, input_path=prompts, now=NOW)
    assert report["quota"]["ipd"] == 5 and report["quota"]["ipd_from"] == "summary.json"
    assert report["quota"]["nights_left"] == 2  # ceil(6 / 5)
    assert status_report(out, input_path=prompts, ipd=6, now=NOW)["quota"]["nights_left"] == 1


def test_pending_images_follow_the_batch_size(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\nc\nd\ne\n")
    out = tmp_path / "out"
    first = next(iter(PromptSource(prompts)))
    write(out / "manifest.jsonl", [record(first.id, "ok", batch_size=4, billed=4)])
    report = status_report(out, input_path=prompts, ipd=3, now=NOW)
    assert report["pending"] == 4 and report["pending_images"] == 16
    assert report["quota"]["nights_left"] == 6  # ceil(16 / 3)


def test_pending_by_id_when_rows_cannot_be_counted_cheaply(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("id,prompt,batch_size\nalpha,a cat,2\nbeta,a dog,3\ngamma,a cow,1\n")
    out = tmp_path / "out"
    write(
        out / "manifest.jsonl",
        [record("alpha", "ok"), record("nonsense", "ok"), record("gamma", "generated")],
    )
    report = status_report(out, input_path=prompts, ipd=2, now=NOW)
    assert report["pending_method"] == "scan"
    assert report["input_rows"] == 3 and report["pending"] == 2  # beta, gamma
    assert report["history"] == 1  # nonsense
    assert report["pending_images"] == 4  # 3 + 1
    assert report["pending_paid"] == 1  # gamma: paid for, only to download
    assert "1 of them paid, only to download" in format_status(report)
    assert report["quota"]["nights_left"] == 2


def test_message_class_blanks_particulars() -> None:
    assert message_class("prompts.jsonl:12: batch_size must be 1..4, got 9") == (
        "batch_size must be N..N, got N"
    )
    assert message_class("trace 0123456789abcdef0123 failed") == "trace … failed"
    assert len(message_class("x" * 500)) == 72


def test_human_table(tmp_path: Path) -> None:
    write(
        tmp_path / "manifest.jsonl",
        [
            record("000000001", "ok", billed=1),
            record("000000002", "failed", error=err(400, 7, "no")),
        ],
    )
    text = format_status(status_report(tmp_path, ipd=10, now=NOW))
    lines = text.splitlines()
    assert lines[0].endswith("2 items from 1 manifest (2 records)")
    assert any(line.split()[:2] == ["ok", "1"] for line in lines)
    assert any("400 7: no" in line for line in lines)
    assert any(line.split()[:2] == ["pending", "?"] for line in lines)


def test_status_cli_json_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "manifest.jsonl", [record("000000001", "ok"), record("000000002", "invalid")])
    assert main(["status", str(tmp_path), "--json", "--ipd", "10"]) == 0
    report = orjson.loads(capsys.readouterr().out)
    assert report["counts"]["ok"] == 1 and report["counts"]["invalid"] == 1
    assert report["quota"]["ipd"] == 10

    assert main(["status", str(tmp_path)]) == 0
    assert "items from 1 manifest" in capsys.readouterr().out

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["status", str(empty)]) == 2
    assert "no manifest" in capsys.readouterr().err
    assert main(["status", str(tmp_path / "nowhere")]) == 2
    assert main(["status", str(tmp_path), "--input", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    with pytest.raises(NoManifestError):
        status_report(empty)


# -- verify --------------------------------------------------------------------------


def good_dir(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path / "out"
    images = [store(out, f"{i:09d}", f"image {i}".encode() * 100) for i in range(1, 4)]
    extra = store(out, "000000003", b"second image of the batch", index=1)
    write(
        out / "manifest.jsonl",
        [
            record("000000001", "ok", images=[images[0]]),
            record("000000002", "ok", images=[images[1]]),
            record("000000003", "ok", images=[images[2], extra], batch_size=2),
            record("000000004", "failed", error=err(400, 1, "x")),
        ],
    )
    return out, [*images, extra]


def test_verify_all_good(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, images = good_dir(tmp_path)
    report = verify(out)
    assert report.ok and report.exit_code == 0
    assert report.records == 3 and report.files == 4
    assert report.bytes == sum(image["bytes"] for image in images)
    assert report.orphans == [] and report.leftover_parts == []
    assert main(["verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out


def test_verify_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, images = good_dir(tmp_path)
    (out / images[1]["path"]).unlink()
    report = verify(out)
    assert not report.ok and report.exit_code == 1
    assert [(p.id, p.path, p.problem) for p in report.missing] == [
        ("000000002", images[1]["path"], "missing")
    ]
    assert main(["verify", str(out)]) == 1
    text = capsys.readouterr().out
    assert "MISSING" in text and images[1]["path"] in text and "000000002" in text


def test_verify_corrupted_byte_and_truncation(tmp_path: Path) -> None:
    out, images = good_dir(tmp_path)
    path = out / images[0]["path"]
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF  # same size, different content: only the hash can tell
    path.write_bytes(bytes(data))
    truncated = out / images[3]["path"]
    truncated.write_bytes(truncated.read_bytes()[:-1])
    report = verify(out)
    problems = {(p.id, p.path): p.problem for p in report.mismatched}
    assert problems == {
        ("000000001", images[0]["path"]): "sha256",
        ("000000003", images[3]["path"]): "size",
    }
    assert report.files == 2 and report.exit_code == 1


def test_verify_orphans_and_part_files_warn_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = good_dir(tmp_path)
    (out / "images" / "000" / "stray.png").write_bytes(b"orphan")
    (out / "images" / "999").mkdir()
    (out / "images" / "999" / "old.webp").write_bytes(b"orphan too")
    (out / ".tmp").mkdir()
    (out / ".tmp" / "000000009_0.part").write_bytes(b"half")
    (out / ".tmp" / "notes.txt").write_bytes(b"not a part file")
    report = verify(out)
    assert report.ok and report.exit_code == 0
    assert report.orphans == ["images/000/stray.png", "images/999/old.webp"]
    assert report.leftover_parts == [".tmp/000000009_0.part"]
    assert main(["verify", str(out), "--json"]) == 0
    data = orjson.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["orphans"] == report.orphans
    assert data["leftover_parts"] == [".tmp/000000009_0.part"]


def test_verify_checks_only_the_latest_ok_records(tmp_path: Path) -> None:
    out, images = good_dir(tmp_path)
    gone = {"path": "images/000/000000004_0.png", "sha256": "0" * 64, "bytes": 5}
    with ManifestWriter(out / "manifest.jsonl") as writer:
        # An ok superseded by a failure is not checked; a stale image it left is an orphan.
        writer.append(record("000000005", "ok", images=[gone]))
        writer.append(record("000000005", "failed", error=err(400, 1, "x")))
        writer.append(record("000000006", "ok", images=[{**images[0], "path": "../escape.png"}]))
    report = verify(out)
    assert report.missing == []
    assert [(p.id, p.problem) for p in report.mismatched] == [("000000006", "bad path")]


def test_verify_without_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(tmp_path)]) == 2
    assert "no manifest" in capsys.readouterr().err
    with pytest.raises(NoManifestError):
        verify(tmp_path)


# -- summary.json and status agree ---------------------------------------------------


async def test_summary_json_and_status_agree_on_every_figure_they_share(tmp_path: Path) -> None:
    import sfbatch
    from sfbatch.emulator import Emulator, FaultConfig

    out = tmp_path / "out"
    rows: list[Any] = [{"prompt": f"a lighthouse {i}", "batch_size": 1 + i % 3} for i in range(60)]
    rows += [{"prompt": "too many", "batch_size": 9}] * 3  # invalid
    results: list[sfbatch.RunResult] = []
    async with Emulator(faults=FaultConfig(seed=3, p_500=0.2), latency_s=0.001) as emu:
        config = sfbatch.RunConfig(
            out_dir=out,
            api_key=emu.api_key,
            base_url=emu.base_url,
            ipd=10_000,
            max_retries=0,  # a 500 fails its item at once
        )
        async for _ in sfbatch.generate(rows, config, on_result=results.append):
            pass
    (result,) = results
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary == result.summary
    report = status_report(out, tz_offset_h=config.day_utc_offset_h)
    # the run made failures, invalid rows and several sizes of batch: nothing is trivial
    assert summary["manifest"]["ok"] > 20 and summary["manifest"]["failed"] > 3
    assert summary["manifest"]["invalid"] == 3

    assert {k: v for k, v in report["counts"].items() if v} == summary["manifest"]
    for status in ("ok", "failed", "invalid"):
        assert report["counts"][status] == summary["run"][status]
    assert report["errors"] == summary["errors"]
    assert set(summary["errors"]) == {"failed: 500 50000", "invalid: invalid"}
    assert report["images"] == summary["run"]["images"]
    assert report["bytes"] == summary["run"]["bytes"]
    assert report["billed"]["total"] == summary["run"]["billed_images"]
    assert report["billed"]["today"] == summary["quota"]["billed_today"]
    assert report["quota"]["ipd"] == summary["quota"]["ipd"]
    for key in ("latency_s", "inference_s"):
        assert report[key]["n"] == summary["manifest"]["ok"]
        for q in ("p50", "p95"):
            assert report[key][q] == summary[key][q], (key, q)
    assert [(t.reason.key, t.count) for t in result.errors] == list(summary["errors"].items())
    assert all(t.example for t in result.errors)


async def test_pending_reads_the_input_as_the_run_did(tmp_path: Path) -> None:
    """A run with its own model, seed base and variations: ``status --input`` reads the
    rows with them (from summary.json), so nothing done shows as pending, and an edited
    row does."""
    from tests.conftest import run_sfbatch, sfbatch_env

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a harbour at dusk {i}\n" for i in range(6)))
    out = tmp_path / "out"
    run_flags = ("--model", "Qwen/Qwen-Image", "--base-seed", "7", "--variations", "2")
    code, _, err = await run_sfbatch(
        "run",
        str(prompts),
        "--out",
        str(out),
        "--emulator",
        "--no-progress",
        *run_flags,
        env=sfbatch_env(None),
    )
    assert code == 0, err
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["reading"] == {
        "defaults": {"model": "Qwen/Qwen-Image"},
        "base_seed": 7,
        "variations": 2,
    }
    report = status_report(out, input_path=prompts)
    assert (report["input_rows"], report["pending"]) == (12, 0)

    prompts.write_text(prompts.read_text().replace("dusk 3", "dawn 3"))
    report = status_report(out, input_path=prompts)
    assert report["pending"] == 2  # the edited row's two variations
    assert report["history"] == 2  # the records of what it asked before

    # without the summary (an older run's directory) the defaults apply: all pending
    (out / "summary.json").unlink()
    assert status_report(out, input_path=prompts)["pending"] == 12


def test_manifest_lines_that_are_not_records_are_counted_and_named(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write(out / "manifest.jsonl", [record("a", "ok"), record("b", "ok")])
    with open(out / "manifest.jsonl", "ab") as f:
        f.write(b"\x00\x01 not json\n[1, 2]\n")  # damage, then a torn last line (a run's)
        f.write(b'{"id": "c", "status"')
    report = status_report(out, now=NOW)
    assert report["counts"]["ok"] == 2
    assert report["damaged_lines"] == 2
    assert report["damaged_examples"] == ["manifest.jsonl:3", "manifest.jsonl:4"]
    assert "damaged" in format_status(report) and "manifest.jsonl:3" in format_status(report)


def test_verify_warns_of_manifest_lines_that_are_not_records(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write(out / "manifest.jsonl", [record("a", "failed")])
    with open(out / "manifest.jsonl", "ab") as f:
        f.write(b"garbage\n")
    report = verify(out)
    assert report.damaged_lines == ["manifest.jsonl:2"] and report.ok  # a warning
    assert report.as_dict()["damaged_lines"] == ["manifest.jsonl:2"]
    assert "manifest.jsonl:2" in format_verify(report)
