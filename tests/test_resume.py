"""The resume index: (id, fingerprint) keys, damage, today's billing, legacy manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from conftest import manifest_record

from sfbatch.config import RunConfig
from sfbatch.emulator import Emulator
from sfbatch.loader import PromptSource, Row, derive_seed
from sfbatch.manifest import ManifestWriter, day_start_iso, latest_records
from sfbatch.models import ModelRegistry, effective_params
from sfbatch.pipeline import Pipeline
from sfbatch.resume import ResumeIndex, read_index

REG = ModelRegistry.builtin()
FP = "0123456789abcdef"


def rec(row_id: str, status: str, *, fp: str = FP, **fields: Any) -> dict[str, Any]:
    return manifest_record(row_id, status, fingerprint=fp, **fields)


def test_latest_record_of_an_id_and_fingerprint_wins(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    other = "fedcba9876543210"
    with ManifestWriter(path) as w:
        w.append(rec("a", "ok", billed=2))
        w.append(rec("b", "failed", billed=1))
        w.append(rec("c", "invalid"))
        w.append(rec("b", "ok", billed=1))  # supersedes the failure
        w.append(rec("a", "failed", fp=other))  # another request under the same id
    index = read_index([path], day_start="2026-11-24T00:00:00.000Z")
    assert index.status("a", FP) == "ok"
    assert index.status("a", other) == "failed"
    assert index.status("b", FP) == "ok"
    assert index.status("c", FP) == "invalid"
    assert index.status("c", other) is None  # same id, other request: not done
    assert index.status("d", FP) is None
    assert index.counts() == {"ok": 2, "invalid": 1, "failed": 1}
    index.set_status("b", FP, "failed")  # a later record moves an item between the tables
    index.set_status("a", other, "ok")
    assert (index.status("b", FP), index.status("a", other)) == ("failed", "ok")
    assert index.counts() == {"ok": 2, "invalid": 1, "failed": 1}
    assert index.billed_today == 4
    assert index.records == 5 and index.damaged == []


def test_billed_today_counts_only_the_accounts_day(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    with ManifestWriter(path) as w:
        w.append(rec("a", "ok", finished_at="2026-11-23T15:59:59.999Z", billed=4))
        w.append(rec("b", "ok", finished_at="2026-11-23T16:00:00.000Z", billed=1))
    # 2026-11-24 00:00 in UTC+8 is 2026-11-23 16:00 UTC.
    noon_utc8 = 1795492800.0  # 2026-11-24T04:00:00Z
    assert day_start_iso(8, now=noon_utc8) == "2026-11-23T16:00:00.000Z"
    assert read_index([path], day_start=day_start_iso(8, now=noon_utc8)).billed_today == 1
    assert read_index([path], day_start=day_start_iso(0, now=noon_utc8)).billed_today == 0


def test_records_in_another_key_order_and_unreadable_lines(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(
        b'{"status":"failed","id":"with \\"quote\\"","billed_images":1,"finished_at":"z",'
        b'"fingerprint":"0123456789abcdef"}\n'
        b"not json at all\n"
        b'{"id":"x7","status":"weird","finished_at":"","billed_images":0,"fingerprint":"00"}\n'
    )
    index = read_index([path], day_start="a")
    assert index.status('with "quote"', FP) == "failed"
    assert index.billed_today == 1
    assert [(d.line, d.reason) for d in index.damaged] == [
        (2, "not a complete JSON record"),
        (3, "not a manifest record"),
    ]
    assert index.damaged_lines == [2, 3]


def test_a_torn_line_in_the_middle_is_not_trusted_and_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    whole = [orjson.dumps(rec(f"r{i}", "ok", prompt="x" * 50)) for i in range(4)]
    torn = whole[1][:120]  # the front fields survive the cut
    assert torn.count(b",") >= 5
    zeroed = whole[3][:100] + b"\0" * 40  # a crash that left zeros, then a newline
    path.write_bytes(whole[0] + b"\n" + torn + whole[2] + b"\n" + zeroed + b"\n" + whole[0] + b"\n")
    index = read_index([path], day_start="")
    assert index.status("r0", FP) == "ok"
    assert index.status("r1", FP) is None  # torn: made again
    assert index.status("r2", FP) == "ok"  # the complete record glued behind it is kept
    assert index.status("r3", FP) is None
    assert index.damaged_lines == [2, 3]
    assert all(d.path == path for d in index.damaged)


def test_chunks_of_any_size_read_the_same(tmp_path: Path, monkeypatch: Any) -> None:
    path = tmp_path / "manifest.jsonl"
    with ManifestWriter(path) as w:
        for i in range(300):
            status = ("ok", "failed", "generated", "ok", "invalid")[i % 5]
            w.append(rec(f"r{i % 120}", status, billed=1, urls=["u"], prompt="p" * (i % 50)))
    with open(path, "ab") as f:
        f.write(b"torn\n" + orjson.dumps(rec("late", "ok")) + b"\n")

    def summary(index: ResumeIndex) -> Any:
        statuses = [index.status(f"r{i}", FP) for i in range(120)]
        kept = sorted(r["id"] for r in index.generated.values())
        return statuses, kept, index.counts(), index.billed_today, index.damaged_lines

    whole = read_index([path], day_start="")
    assert whole.status("late", FP) == "ok" and whole.damaged_lines == [301]
    for size in (64, 1000, 4096):
        monkeypatch.setattr("sfbatch.resume._CHUNK_BYTES", size)
        assert summary(read_index([path], day_start="")) == summary(whole)


def test_generated_records_are_kept_until_superseded(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    with ManifestWriter(path) as w:
        w.append(rec("g1", "generated", urls=["http://x/1.png"], generated_at=1.0))
        w.append(rec("g2", "generated", urls=["http://x/2.png"], generated_at=1.0))
        w.append(rec("g2", "ok"))
    index = read_index([path], day_start="")
    record = index.generated_record("g1", FP)
    assert record is not None and record["urls"] == ["http://x/1.png"]
    assert index.generated_record("g2", FP) is None
    assert index.status("g1", FP) == "generated" and index.status("g2", FP) == "ok"


def test_the_index_is_a_few_bytes_a_record(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    with ManifestWriter(path) as w:
        for i in range(50_000):
            w.append(rec(f"{i:012x}", "ok", fp=f"{i * 7919:016x}"))
    index = read_index([path], day_start="")
    assert index.counts() == {"ok": 50_000}
    assert index.done.size == 50_000 and index.other.size == 0
    assert index.done.nbytes() == 5 * 50_000  # 40 bits of key; "ok" is the table it is in
    assert all(index.status(f"{i:012x}", f"{i * 7919:016x}") == "ok" for i in range(0, 50_000, 7))
    assert index.status(f"{3:012x}", f"{4 * 7919:016x}") is None


# -- manifests written before fingerprints ----------------------------------------


def legacy_records(source: PromptSource, lines: list[str]) -> list[dict[str, Any]]:
    """What sfbatch before fingerprints wrote for ``lines``: line ids, no fingerprint."""
    out = []
    for line, prompt in enumerate(lines, start=1):
        row_id = f"{line:09d}"
        request = {"model": source._base.get("model"), "prompt": prompt}
        params = effective_params({k: v for k, v in request.items() if v}, REG)
        out.append(
            {
                "id": row_id,
                "status": "ok",
                "finished_at": "2026-11-24T10:00:00.000Z",
                "billed_images": 1,
                "line": line,
                "file": "p.txt",
                "variation": 0,
                "prompt": prompt,
                "negative_prompt": None,
                **{k: v for k, v in params.items() if k != "prompt"},
                "requested_seed": derive_seed(0, row_id, 0),
                "seed": derive_seed(0, row_id, 0),
                "images": [],
                "error": None,
            }
        )
    return out


def resumed(path: Path, index: ResumeIndex) -> list[tuple[Row, str | None]]:
    source = PromptSource(path, registry=REG)
    source.legacy = index
    return [(row, index.status(row.id, row.fingerprint)) for row in source]


def test_a_legacy_manifest_is_honoured_even_after_edits(tmp_path: Path) -> None:
    lines = [f"a lighthouse number {i}" for i in range(1, 11)] + ["a lighthouse number 1"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(lines) + "\n")
    manifest = tmp_path / "manifest.jsonl"
    with ManifestWriter(manifest) as w:
        for record in legacy_records(PromptSource(prompts, registry=REG), lines[:6]):
            w.append(record)
    index = read_index([manifest], day_start="")
    assert index.legacy_records == 6

    got = resumed(prompts, index)
    assert [row.id for row, _ in got[:6]] == [f"{n:09d}" for n in range(1, 7)]
    assert [status for _, status in got] == ["ok"] * 6 + [None] * 5
    assert [row.request["seed"] for row, _ in got[:6]] == [  # type: ignore[index]
        derive_seed(0, f"{n:09d}", 0) for n in range(1, 7)
    ]
    repeat = got[10][0]  # the same content as line 1, whose legacy id is taken
    assert repeat.id not in {row.id for row, _ in got[:10]} and not repeat.id.isdigit()

    # Insert a line at the top and change line 3: only those two and the unmade rows are due.
    edited = ["a new first line", *lines]
    edited[3] = "a changed prompt"
    prompts.write_text("\n".join(edited) + "\n")
    got = resumed(prompts, read_index([manifest], day_start=""))
    due = [row.prompt for row, status in got if status != "ok"]
    assert due == ["a new first line", "a changed prompt", *lines[6:]]


# -- the pipeline over an edited file ---------------------------------------------


async def run_file(emu: Emulator, prompts: Path, out: Path, **kwargs: Any) -> None:
    config = RunConfig(
        out_dir=out, api_key=emu.api_key, base_url=emu.base_url, concurrency=8, **kwargs
    )
    source = PromptSource(prompts, registry=REG, limit=config.limit)
    await Pipeline(config, source, registry=REG).run()


async def test_an_edited_file_makes_exactly_the_new_and_changed_rows(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    lines = [f"a fox number {i}" for i in range(60)]
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    async with Emulator() as emu:
        await run_file(emu, prompts, out, limit=30)
        assert emu.stats()["generation_requests"] == 30
        edited = ["inserted at the top", *lines]
        edited[5] = "a fox, changed"  # was made in the first run
        prompts.write_text("\n".join(edited) + "\n")
        await run_file(emu, prompts, out)
        assert emu.stats()["generation_requests"] == 30 + 2 + 30
        await run_file(emu, prompts, out)  # nothing left to do
        assert emu.stats()["generation_requests"] == 62
    latest = latest_records([out / "manifest.jsonl"])
    made = {r["prompt"] for r in latest.values() if r["status"] == "ok"}
    assert set(edited) <= made
    assert len(made) == 62  # the prompt changed away from stays as history
    paths = [i["path"] for r in latest.values() for i in r["images"]]
    assert len(paths) == len(set(paths)) == 62


async def test_an_id_made_again_for_another_request_never_overwrites_its_files(
    tmp_path: Path,
) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "fox", "prompt": "a red fox"}\n')
    out = tmp_path / "out"
    async with Emulator() as emu:
        await run_file(emu, prompts, out)
        first = latest_records([out / "manifest.jsonl"])["fox"]
        before = (out / first["images"][0]["path"]).read_bytes()
        prompts.write_text('{"id": "fox", "prompt": "a blue fox"}\n')  # same id, new request
        await run_file(emu, prompts, out)
        await run_file(emu, prompts, out)
        assert emu.stats()["generation_requests"] == 2
    second = latest_records([out / "manifest.jsonl"])["fox"]
    assert second["fingerprint"] != first["fingerprint"]
    assert second["images"][0]["path"] == first["images"][0]["path"].replace(
        "fox_0.", f"fox_0~{second['fingerprint'][:8]}."
    )
    assert (out / first["images"][0]["path"]).read_bytes() == before
    assert (out / second["images"][0]["path"]).read_bytes() != before


def test_matched_items_are_counted_apart_from_history(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    other = "fedcba9876543210"
    with ManifestWriter(path) as w:
        for i in range(3000):  # enough to put several entries in one bucket
            w.append(rec(f"r{i}", "ok" if i % 3 else "failed"))
        w.append(rec("r1", "failed", fp=other))
    index = read_index([path], day_start="")
    assert index.counts(matched=True) == {}
    assert index.counts(matched=False) == {"ok": 2000, "failed": 1001}
    for i in range(0, 3000, 2):
        assert index.match(f"r{i}", FP) == ("ok" if i % 3 else "failed")
        assert index.match(f"r{i}", FP) == ("ok" if i % 3 else "failed")  # once is enough
    assert index.match("r1", "1111111111111111") is None
    assert index.counts(matched=True) == {"ok": 1000, "failed": 500}
    assert index.counts(matched=False) == {"ok": 1000, "failed": 501}
    assert index.counts() == {"ok": 2000, "failed": 1001}
    # Records written by the run are of the input's rows; a failed item moved to ok stays matched.
    index.set_status("r0", FP, "ok")
    index.set_status("new", FP, "invalid")
    assert index.counts(matched=True) == {"ok": 1001, "failed": 499, "invalid": 1}
    assert index.status("r2", FP) == "ok" and index.status("r3", FP) == "failed"


def test_a_repair_record_makes_an_item_due_and_counts_as_failed(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    damaged = {"status": None, "code": "damaged", "message": "x"}
    with ManifestWriter(path) as w:
        w.append(rec("a", "ok"))
        w.append(rec("b", "ok"))
        w.append(rec("b", "failed", error=damaged))
        w.append(rec("c", "failed", error={"status": 500, "code": 1, "message": "no"}))
    for reader in (read_index, _read_by_lines):
        index = reader([path], day_start="")
        assert [index.status(x, FP) for x in "abc"] == ["ok", "damaged", "failed"]
        assert index.counts() == {"ok": 1, "failed": 2}


def _read_by_lines(paths: list[Path], *, day_start: str) -> ResumeIndex:
    """The index read line by line (the path taken when a chunk holds an odd line)."""
    odd = tmp = paths[0].with_suffix(".odd.jsonl")
    tmp.write_bytes(b"not json\n" + paths[0].read_bytes())
    index = read_index([odd], day_start=day_start)
    assert index.damaged_lines == [1]
    return index


def test_a_prompt_repeated_past_the_counters_byte_keeps_numbering(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("same\n" * 300 + "other\n")
    ids = [row.id for row in PromptSource(prompts, registry=REG)]
    base = ids[0]
    assert ids[:300] == [base] + [f"{base}-{n}" for n in range(2, 301)]
    assert len(set(ids)) == 301


def test_unbump_takes_back_the_last_content_id_at_any_count() -> None:
    from sfbatch.loader import IdSpace

    digest = bytes(range(16))
    for times in (1, 2, 3, 254, 255, 256, 300):
        space = IdSpace()
        ids = [space.content_id(digest) for _ in range(times)]
        space.unbump(digest)
        again = space.content_id(digest)
        assert again == ids[-1], times
        assert space.content_id(digest) != again
    fresh = IdSpace()
    fresh.content_id(digest)
    fresh.unbump(digest)
    assert fresh.fresh
