"""The manifest: append-only writes, torn-line tolerance, the front fields resume reads."""

from __future__ import annotations

import errno
from pathlib import Path

import orjson
import pytest
from conftest import manifest_record as rec

from sfbatch.manifest import (
    FRONT_FIELDS,
    FRONT_RE,
    ManifestWriter,
    iter_records,
    latest_records,
)


def test_append_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    with ManifestWriter(path) as w:
        w.append(rec("a1", "ok", billed=2))
        w.append(rec("custom-id", "invalid"))
    assert [r["id"] for r in iter_records(path)] == ["a1", "custom-id"]


def test_front_fields_are_what_the_resume_regex_reads(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    with ManifestWriter(path) as w:
        w.append(rec('id with "quote"', "ok", billed=3, fingerprint="0123456789abcdef", x=1))
    line = path.read_bytes()
    assert list(orjson.loads(line))[: len(FRONT_FIELDS)] == list(FRONT_FIELDS)
    assert FRONT_RE.match(line) is None  # an escaped quote in the id: read by the full parser
    with ManifestWriter(path) as w:
        w.append(rec("plain", "ok", billed=3, fingerprint="0123456789abcdef", x=1))
    m = FRONT_RE.match(path.read_bytes().splitlines(keepends=True)[1])
    assert m is not None
    assert m.groups() == (b"plain", b"ok", b"2026-11-24T10:00:00.000Z", b"3", b"0123456789abcdef")


def test_torn_last_line_is_ignored_then_cut_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    with ManifestWriter(path) as w:
        w.append(rec("000000001", "ok"))
    with open(path, "ab") as f:
        f.write(b'{"id":"000000002","status":"ok","fini')  # a crash mid-write
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


def test_latest_records_across_shards(tmp_path: Path) -> None:
    a, b = tmp_path / "manifest-0-of-2.jsonl", tmp_path / "manifest-1-of-2.jsonl"
    with ManifestWriter(a) as w:
        w.append(rec("x", "failed"))
        w.append(rec("x", "ok"))
    with ManifestWriter(b) as w:
        w.append(rec("y", "ok"))
    assert {k: v["status"] for k, v in latest_records([a, b]).items()} == {"x": "ok", "y": "ok"}


def test_close_on_a_full_disk_still_closes_the_files(tmp_path: Path) -> None:
    # append flushes each line: a buffered line is only left when the disk fills between
    # two records; here the manifest is /dev/full, whose every write is ENOSPC
    (tmp_path / "manifest.jsonl").symlink_to("/dev/full")
    writer = ManifestWriter(tmp_path / "manifest.jsonl")
    writer._file.write(b'{"id": "a"}\n')  # a line still in the buffer
    with pytest.raises(OSError) as info:
        writer.close()
    assert info.value.errno == errno.ENOSPC
    assert writer._file.closed  # not left for the collector to flush after a later run's lines
