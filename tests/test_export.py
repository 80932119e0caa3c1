"""``sfbatch export``, read back by the real consumers: webdataset, pyarrow, datasets.

Builds are made by the real engine (``sfbatch run --emulator``, a subprocess) or, where a
test needs shapes the emulator does not make (superseded lines, failures, s3:// paths),
by writing a manifest and images directly.
"""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pytest
from conftest import run_benchmark, run_sfbatch, sfbatch_env

from sfbatch.errors import ConfigError
from sfbatch.export import ExportConfig, export, latest_index, parse_size, sample_key
from sfbatch.manifest import latest_records, manifest_paths
from sfbatch.storage import MissingExtraError, open_store

if TYPE_CHECKING:
    from conftest import S3Server

pytest.importorskip("pyarrow", reason="needs the parquet extra")
wds = pytest.importorskip("webdataset", reason="needs webdataset (the test extra)")

REPO = Path(__file__).resolve().parent.parent


def png(seed: str) -> bytes:
    """A small real PNG whose pixels depend on ``seed``."""
    from PIL import Image

    noise = hashlib.sha256(seed.encode()).digest() * 24  # 16x16 RGB = 768 bytes
    buffer = io.BytesIO()
    Image.frombytes("RGB", (16, 16), noise).save(buffer, format="PNG")
    return buffer.getvalue()


async def sfbatch(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    code, out, err = await run_sfbatch(*args, env=sfbatch_env(None, **(env or {})))
    return code, out + err


async def build(out: Path, prompts: int, *, batch_size: int = 2) -> dict[str, dict[str, Any]]:
    """Run the real engine against its embedded emulator; the latest record per id."""
    src = out.parent / "prompts.txt"
    src.write_text("".join(f"a lighthouse, study {i}\n" for i in range(prompts)))
    code, text = await sfbatch(
        "run",
        str(src),
        "--out",
        str(out),
        "--emulator",
        "--batch-size",
        str(batch_size),
        "--limit",
        str(prompts),
        "--no-progress",
        "-q",
    )
    assert code == 0, text
    return latest_records(manifest_paths(out))


def ok_images(latest: dict[str, dict[str, Any]]) -> dict[str, str]:
    """sample key → sha256 of every ok image."""
    return {
        sample_key(r["id"], i): image["sha256"]
        for r in latest.values()
        if r["status"] == "ok"
        for i, image in enumerate(r["images"])
    }


def files_of(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".sfbatch-export" not in p.parts
    }


def read_webdataset(dest: Path) -> dict[str, tuple[bytes, dict[str, Any]]]:
    shards = sorted(str(p) for p in dest.glob("*.tar"))
    dataset = wds.WebDataset(shards, shardshuffle=False, empty_check=False)
    samples: dict[str, tuple[bytes, dict[str, Any]]] = {}
    for sample in dataset:
        assert sample["__key__"] not in samples
        samples[sample["__key__"]] = (sample["png"], orjson.loads(sample["json"]))
    return samples


def write_build(out: Path, records: list[dict[str, Any]], name: str = "manifest.jsonl") -> None:
    """A manifest written directly; each ok record's images are made up and stored."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / name, "ab") as f:
        for record in records:
            f.write(orjson.dumps(record) + b"\n")


def ok_record(row_id: str, prompt: str, out: Path, images: int = 1) -> dict[str, Any]:
    metas = []
    for i in range(images):
        data = png(f"{row_id}/{i}/{prompt}")
        path = f"images/{row_id[:3]}/{row_id}_{i}.png"
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(data)
        metas.append({"path": path, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
    return {
        "id": row_id,
        "status": "ok",
        "finished_at": "2026-12-01T00:00:00.000Z",
        "billed_images": images,
        "prompt": prompt,
        "seed": 7,
        "guidance_scale": 7.5,
        "timings": {"inference": 1.5},
        "images": metas,
        "error": None,
    }


def failed_record(row_id: str, prompt: str) -> dict[str, Any]:
    return {
        "id": row_id,
        "status": "failed",
        "finished_at": "2026-12-01T00:00:00.000Z",
        "billed_images": 0,
        "prompt": prompt,
        "images": [],
        "error": {"status": 400, "code": 20012, "message": "bad request"},
    }


def test_parse_size() -> None:
    assert parse_size("1GB") == 10**9
    assert parse_size("64MiB") == 64 << 20
    assert parse_size("2g") == 2 * 10**9
    assert parse_size("1500") == 1500
    with pytest.raises(ValueError):
        parse_size("lots")


def test_latest_index_spills_merges_and_keeps_the_last_line(tmp_path: Path) -> None:
    a, b = tmp_path / "manifest-0-of-2.jsonl", tmp_path / "manifest-1-of-2.jsonl"
    lines_a = [{"id": f"id{i % 23:03d}", "status": "failed", "n": i} for i in range(60)]
    lines_a.append({"id": "id005", "status": "ok", "n": 99})
    a.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines_a) + b'{"id": "torn')
    b.write_bytes(orjson.dumps({"id": "id100", "status": "ok"}) + b"\nnot json\n")
    work = tmp_path / "work"
    work.mkdir()
    entries = list(latest_index([a, b], work, chunk_entries=7))
    assert [e.id for e in entries] == sorted({f"id{i:03d}" for i in range(23)} | {"id100"})
    by_id = {e.id: e for e in entries}
    assert by_id["id005"].status == "ok"
    assert by_id["id100"].file == 1
    with open(a, "rb") as f:
        f.seek(by_id["id022"].offset)
        assert orjson.loads(f.readline())["n"] == 45  # the last of 22, 45
    assert list(work.iterdir()) == []  # spilled runs are removed


async def test_webdataset_from_the_engine_deterministic_and_incremental(tmp_path: Path) -> None:
    out = tmp_path / "out"
    latest = await build(out, 12)
    dest = tmp_path / "wds"
    config = ExportConfig(
        source_dir=out, dest=str(dest), format="webdataset", shard_size_bytes=60_000
    )
    first = await export(config)
    assert first.records == 12 and first.images == 24 and len(first.files) >= 3

    samples = read_webdataset(dest)
    expected = ok_images(latest)
    assert set(samples) == set(expected)
    for key, (png, meta) in samples.items():
        assert hashlib.sha256(png).hexdigest() == expected[key]
        assert meta["prompt"] == latest[meta["id"]]["prompt"]
        assert meta["images"][meta["image_index"]]["sha256"] == expected[key]

    # Same manifest, another destination: the same bytes.
    again = tmp_path / "wds-again"
    await export(
        ExportConfig(source_dir=out, dest=str(again), format="webdataset", shard_size_bytes=60_000)
    )
    assert files_of(again) == files_of(dest)

    # The build grows: a rerun writes new shards only, and the old ones are untouched.
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in dest.glob("*.tar")}
    latest = await build(out, 20)
    second = await export(config)
    assert second.already_exported == 12 and second.records == 8
    assert set(second.files).isdisjoint(before)
    for name, (mtime_ns, data) in before.items():
        assert (dest / name).stat().st_mtime_ns == mtime_ns and (dest / name).read_bytes() == data
    assert set(read_webdataset(dest)) == set(ok_images(latest))
    third = await export(config)
    assert third.files == [] and third.already_exported == 20


async def test_parquet_typed_columns_bytes_failures_and_no_bytes(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    records = [ok_record(f"r{i:04d}", f"prompt {i}", out, images=1 + i % 3) for i in range(40)]
    records[3] = failed_record("r0003", "prompt 3")
    records.append(failed_record("r0010", "superseded by a later ok line"))
    records.append(ok_record("r0010", "prompt 10, again", out))
    write_build(out, records)
    latest = latest_records(manifest_paths(out))
    dest = tmp_path / "pq"
    config = ExportConfig(
        source_dir=out,
        dest=str(dest),
        format="parquet",
        shard_size_bytes=20_000,
        include_failed=True,
    )
    result = await export(config)
    assert result.failures == 1
    shards = sorted(dest.glob("*.parquet"))
    assert len(shards) >= 2
    table = pq.ParquetDataset([str(s) for s in shards]).read()
    expected = ok_images(latest)
    assert table.num_rows == len(expected)
    assert str(table.schema.field("seed").type) == "int64"
    assert str(table.schema.field("guidance_scale").type) == "double"
    assert str(table.schema.field("image").type) == "binary"
    for row in table.to_pylist():
        assert hashlib.sha256(row["image"]).hexdigest() == row["image_sha256"]
        assert row["image_sha256"] == expected[sample_key(row["id"], row["image_index"])]
        assert row["prompt"] == latest[row["id"]]["prompt"]
        assert row["inference_s"] == 1.5
    failures = pq.read_table(dest / "failures" / "000000.parquet").to_pylist()
    assert [(f["id"], f["error_code"], f["error_status"]) for f in failures] == [
        ("r0003", "20012", 400)
    ]

    lean = tmp_path / "lean"
    await export(
        ExportConfig(source_dir=out, dest=str(lean), format="parquet", include_bytes=False)
    )
    table = pq.read_table(lean / "000000.parquet")
    assert "image" not in table.column_names and table.num_rows == len(expected)
    assert all((out / p).is_file() for p in table.column("image_path").to_pylist())


async def test_imagefolder_loads_in_datasets_with_prompts(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="needs datasets (the test extra)")
    out = tmp_path / "out"
    records = [ok_record(f"{i:09d}", f"a cat, take {i}", out, images=2) for i in range(15)]
    records.append(failed_record("x-1", "never made"))
    write_build(out, records)
    dest = tmp_path / "folder"
    config = ExportConfig(
        source_dir=out,
        dest=str(dest),
        format="imagefolder",
        shard_size_bytes=5_000,
        include_failed=True,
    )
    await export(config)
    assert len([p for p in dest.iterdir() if p.name.isdigit()]) >= 2
    loaded = datasets.load_dataset(
        "imagefolder", data_dir=str(dest), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert loaded.num_rows == 30
    latest = latest_records(manifest_paths(out))
    for row in loaded.select_columns(["id", "prompt", "seed", "image_sha256", "image_index"]):
        assert row["prompt"] == latest[row["id"]]["prompt"] and row["seed"] == 7
        assert row["image_sha256"] == latest[row["id"]]["images"][row["image_index"]]["sha256"]
    assert loaded[0]["image"].format == "PNG"  # decodable


async def test_export_to_s3_from_s3_images(s3: S3Server, tmp_path: Path) -> None:
    out = tmp_path / "out"
    records = [ok_record(f"{i:09d}", f"a boat {i}", out) for i in range(9)]
    # The run put its images in the bucket: the records' paths are object URLs.
    async with open_store(f"s3://{s3.bucket}/run") as store:
        for record in records:
            image = record["images"][0]
            image["path"] = await store.put_file(
                out / image["path"], image["path"], remove_source=True
            )
    write_build(out, records)
    dest = f"s3://{s3.bucket}/datasets/wds"
    result = await export(
        ExportConfig(source_dir=out, dest=dest, format="webdataset", shard_size_bytes=3_000)
    )
    assert result.records == 9 and len(result.files) >= 2
    local = tmp_path / "downloaded"
    local.mkdir()
    client = s3.client()
    for name in result.files:
        client.download_file(s3.bucket, f"datasets/wds/{name}", str(local / name))
    samples = read_webdataset(local)
    assert {k: hashlib.sha256(png).hexdigest() for k, (png, _) in samples.items()} == ok_images(
        latest_records(manifest_paths(out))
    )
    again = await export(ExportConfig(source_dir=out, dest=dest, format="webdataset"))
    assert again.files == [] and again.already_exported == 9


async def test_cli_export_and_its_errors(s3: S3Server, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_build(out, [ok_record("a", "one", out), ok_record("b", "two", out)])
    code, text = await sfbatch(
        "export", str(out), "--format", "webdataset", "--to", str(tmp_path / "w")
    )
    assert code == 0 and "exported 2 records" in text, text
    assert (tmp_path / "w" / "000000.tar").is_file()
    code, text = await sfbatch(
        "export", str(out), "--format", "parquet", "--to", str(tmp_path / "w")
    )
    assert code == 2 and "webdataset export" in text, text
    code, text = await sfbatch(
        "export", str(out), "--format", "webdataset", "--no-bytes", "--to", str(tmp_path / "x")
    )
    assert code == 2 and "--no-bytes" in text
    code, text = await sfbatch(
        "export", str(out), "--format", "parquet", "--to", f"s3://{s3.bucket}-missing/x"
    )
    assert code == 3 and "NoSuchBucket" in text, text
    assert "Found credentials" not in text  # botocore's news is not the user's
    code, text = await sfbatch(
        "export", str(tmp_path / "nowhere"), "--format", "parquet", "--to", "d"
    )
    assert code == 2
    write_build(out, [ok_record("c", "three", out)])
    (out / "images/c/c_0.png").unlink()
    code, text = await sfbatch(
        "export", str(out), "--format", "webdataset", "--to", str(tmp_path / "v")
    )
    assert code == 1 and "c_0.png" in text, text


async def test_missing_extra_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    out = tmp_path / "out"
    write_build(out, [ok_record("a", "one", out)])
    with pytest.raises(MissingExtraError, match=r"sfbatch\[parquet\]"):
        await export(ExportConfig(source_dir=out, dest=str(tmp_path / "d"), format="parquet"))
    with pytest.raises(ConfigError):
        ExportConfig(source_dir=out, dest="d", format="csv")  # type: ignore[arg-type]


@pytest.mark.timeout(180)
def test_bench_export_smoke_runs() -> None:
    """benchmarks/bench_export.py --smoke still runs end to end (no timing is asserted)."""
    proc = run_benchmark("bench_export.py", "--smoke", timeout_s=170)
    assert "export 20,000-record manifest (parquet --no-bytes)" in proc.stdout
    assert "| export webdataset → moto S3" in proc.stdout


async def test_an_image_not_what_its_record_says_is_left_out_until_made_again(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    write_build(out, [ok_record("a", "one", out), ok_record("b", "two", out)])
    good = (out / "images/b/b_0.png").read_bytes()
    (out / "images/b/b_0.png").write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # same size
    dest = str(tmp_path / "w")
    for fmt in ("webdataset", "parquet", "imagefolder"):
        code, text = await sfbatch("export", str(out), "--format", fmt, "--to", f"{dest}-{fmt}")
        assert code == 1 and "1 records left out" in text and "b (images/b/b_0.png" in text, text
        assert "exported 1 records" in text
    assert set(read_webdataset(tmp_path / "w-webdataset")) == {sample_key("a", 0)}
    # made again (here: put back), the next export adds it, and only it
    (out / "images/b/b_0.png").write_bytes(good)
    code, text = await sfbatch(
        "export", str(out), "--format", "webdataset", "--to", f"{dest}-webdataset"
    )
    assert code == 0 and "exported 1 records" in text and "1 already exported" in text, text
    assert set(read_webdataset(tmp_path / "w-webdataset")) == {
        sample_key("a", 0),
        sample_key("b", 0),
    }


async def test_a_destination_holding_foreign_files_an_export_would_overwrite_is_refused(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    write_build(out, [ok_record("a", "one", out)])
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "000000.tar").write_bytes(b"the user's own file")
    (dest / "notes.txt").write_text("kept")
    code, text = await sfbatch("export", str(out), "--format", "webdataset", "--to", str(dest))
    assert code == 2 and "000000.tar" in text and "not from an sfbatch export" in text, text
    assert (dest / "000000.tar").read_bytes() == b"the user's own file"
    # files beside that an export does not write are no reason to refuse
    (dest / "000000.tar").unlink()
    code, text = await sfbatch("export", str(out), "--format", "webdataset", "--to", str(dest))
    assert code == 0 and (dest / "notes.txt").read_text() == "kept", text


async def test_webdataset_shards_of_small_images_keep_to_the_shard_size(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_build(out, [ok_record(f"r{i:03d}", f"prompt {i}", out) for i in range(150)])
    dest = tmp_path / "w"
    result = await export(
        ExportConfig(source_dir=out, dest=str(dest), format="webdataset", shard_size_bytes=100_000)
    )
    assert result.records == 150 and len(result.files) >= 3
    # the tar as written counts (headers, padding): a shard passes the size by at most
    # one sample (about 3 KB here) and tar's closing blocks (10 KB), not by 15 %
    for tar in dest.glob("*.tar"):
        assert tar.stat().st_size <= 100_000 + 3_500 + 10_240, (tar.name, tar.stat().st_size)


async def test_the_failures_table_lists_what_fails_now(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_build(out, [ok_record("a", "one", out), failed_record("b", "two")])
    dest = tmp_path / "w"
    config = ExportConfig(source_dir=out, dest=str(dest), format="webdataset", include_failed=True)

    def listed() -> list[str]:
        return [orjson.loads(line)["id"] for line in (dest / "failures/000000.jsonl").open()]

    assert (await export(config)).failures == 1 and listed() == ["b"]
    assert (await export(config)).files == []  # nothing changed: nothing written again
    # b made ok (with --retry-failed), c fails now: the table says so, not b any more
    write_build(out, [ok_record("b", "two", out), failed_record("c", "three")])
    again = await export(config)
    assert again.failures == 1 and listed() == ["c"] and again.records == 1
    write_build(out, [ok_record("c", "three", out)])
    assert (await export(config)).failures == 0
    assert not (dest / "failures").exists() or not any((dest / "failures").iterdir())
    state = orjson.loads((dest / ".sfbatch-export/state.json").read_bytes())
    assert state["failures"] == []
