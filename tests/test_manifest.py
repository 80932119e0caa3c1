"""The manifest: append-only writes, torn-line tolerance, compact resume state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from sfbatch.manifest import (
    ManifestWriter,
    day_start_iso,
    iter_records,
    latest_records,
    read_state,
)


def rec(
    row_id: str,
    status: str,
    *,
    finished_at: str = "2026-11-24T10:00:00.000Z",
    billed: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "id": row_id,
        "status": status,
        "finished_at": finished_at,
        "billed_images": billed,
        **extra,
    }


def test_append_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    with ManifestWriter(path) as w:
        w.append(rec("000000001", "ok", billed=2))
        w.append(rec("000000002", "failed", billed=1))
        w.append(rec("custom-id", "invalid"))
        w.append(rec("000000002", "ok", billed=1))  # supersedes the failure
    state = read_state([path], day_start="2026-11-24T00:00:00.000Z")
    assert state.status("000000001") == "ok"
    assert state.status("000000002") == "ok"
    assert state.status("custom-id") == "invalid"
    assert state.status("000000003") is None
    assert state.status("3") is None
    assert state.counts() == {"ok": 2, "invalid": 1}
    assert state.billed_today == 4
    assert [r["id"] for r in iter_records(path)] == [
        "000000001",
        "000000002",
        "custom-id",
        "000000002",
    ]


def test_billed_today_counts_only_the_accounts_day(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    with ManifestWriter(path) as w:
        w.append(rec("a", "ok", finished_at="2026-11-23T15:59:59.999Z", billed=4))
        w.append(rec("b", "ok", finished_at="2026-11-23T16:00:00.000Z", billed=1))
    # 2026-11-24 00:00 in UTC+8 is 2026-11-23 16:00 UTC.
    noon_utc8 = 1795492800.0  # 2026-11-24T04:00:00Z
    assert day_start_iso(8, now=noon_utc8) == "2026-11-23T16:00:00.000Z"
    assert read_state([path], day_start=day_start_iso(8, now=noon_utc8)).billed_today == 1
    assert read_state([path], day_start=day_start_iso(0, now=noon_utc8)).billed_today == 0


def test_torn_last_line_is_ignored_then_cut_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    with ManifestWriter(path) as w:
        w.append(rec("000000001", "ok"))
    with open(path, "ab") as f:
        f.write(b'{"id":"000000002","status":"ok","fini')  # a crash mid-write
    assert read_state([path], day_start="").status("000000002") is None
    assert [r["id"] for r in iter_records(path)] == ["000000001"]
    with ManifestWriter(path) as w:
        w.append(rec("000000003", "ok"))
    lines = path.read_bytes().splitlines()
    assert [orjson.loads(line)["id"] for line in lines] == ["000000001", "000000003"]


def test_a_file_that_is_all_torn_is_emptied(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(b'{"id":"x"')
    ManifestWriter(path).close()
    assert path.read_bytes() == b""


def test_records_in_another_key_order_and_corrupt_lines(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(
        b'{"status":"failed","id":"with \\"quote\\"","billed_images":1,"finished_at":"z"}\n'
        b"not json at all\n"
        b'{"id":"000000007","status":"weird","finished_at":"","billed_images":0}\n'
    )
    state = read_state([path], day_start="a")
    assert state.status('with "quote"') == "failed"
    assert state.billed_today == 1
    assert state.corrupt_lines == 2
    assert state.status("000000007") is None


def test_generated_records_are_kept_until_superseded(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    with ManifestWriter(path) as w:
        w.append(rec("000000001", "generated", urls=["http://x/1.png"], generated_at=1.0))
        w.append(rec("000000002", "generated", urls=["http://x/2.png"], generated_at=1.0))
        w.append(rec("000000002", "ok"))
    state = read_state([path], day_start="")
    assert set(state.generated) == {"000000001"}
    assert state.generated["000000001"]["urls"] == ["http://x/1.png"]


def test_line_ids_are_stored_compactly(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    with ManifestWriter(path) as w:
        for line in range(1, 50_001):
            w.append(rec(f"{line:09d}", "ok"))
    state = read_state([path], day_start="")
    assert state.counts() == {"ok": 50_000}
    assert not state._by_name  # all in the bytearray, one byte each
    assert len(state._by_line) < 60_000


def test_latest_records_across_shards(tmp_path: Path) -> None:
    a, b = tmp_path / "manifest-0-of-2.jsonl", tmp_path / "manifest-1-of-2.jsonl"
    with ManifestWriter(a) as w:
        w.append(rec("x", "failed"))
        w.append(rec("x", "ok"))
    with ManifestWriter(b) as w:
        w.append(rec("y", "ok"))
    assert {k: v["status"] for k, v in latest_records([a, b]).items()} == {"x": "ok", "y": "ok"}
