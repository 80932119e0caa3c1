"""``--images-to s3://...``: the real engine against the emulator, images into moto's real S3
server on 127.0.0.1 (the ``s3`` fixture), and ``verify``/``status``/``gallery`` on the result."""

from __future__ import annotations

import asyncio
import hashlib
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
import pytest
from conftest import sfbatch_env, start_sfbatch
from test_cli import lines_in, ok_counts, prompts, sfbatch, wait_for_lines
from test_end_to_end import config_for, final, run, write_prompts

from sfbatch.config import RunConfig
from sfbatch.emulator import Emulator
from sfbatch.errors import ConfigError
from sfbatch.gallery import build_gallery
from sfbatch.loader import PromptSource
from sfbatch.manifest import ManifestRecord
from sfbatch.models import ModelRegistry
from sfbatch.pipeline import Pipeline
from sfbatch.status import status_report, verify
from sfbatch.storage import parse_s3_url

if TYPE_CHECKING:
    from conftest import S3Server

pytest.importorskip("aiobotocore", reason="needs the s3 extra")


def objects(s3: S3Server, prefix: str = "") -> dict[str, bytes]:
    client = s3.client()
    listed = client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", [])
    return {
        o["Key"]: client.get_object(Bucket=s3.bucket, Key=o["Key"])["Body"].read() for o in listed
    }


def empty_and_delete(s3: S3Server) -> None:
    client = s3.client()
    for key in objects(s3):
        client.delete_object(Bucket=s3.bucket, Key=key)
    client.delete_bucket(Bucket=s3.bucket)


def cli_env(s3: S3Server, **extra: str) -> dict[str, str]:
    """The test's environment (the fixture's AWS variables), with the emulator's key."""
    return sfbatch_env(**extra)


async def test_images_go_to_the_bucket_and_the_manifest_stays_local(
    tmp_path: Path, s3: S3Server
) -> None:
    out = tmp_path / "out"
    async with Emulator(latency_s=0.0) as emu:
        result = await run(
            config_for(emu, out, images_to=f"s3://{s3.bucket}/run-1/"),
            write_prompts(tmp_path / "p.txt", 30),
        )
    assert result.exit_code == 0, result.message
    stored = objects(s3)
    records = final(out)
    assert len(records) == 30 and {r["status"] for r in records.values()} == {"ok"}
    for record in records.values():
        (image,) = record["images"]
        bucket, key = parse_s3_url(image["path"])
        assert bucket == s3.bucket
        assert key.startswith("run-1/images/") and key.endswith(".png")
        data = stored[key]
        assert hashlib.sha256(data).hexdigest() == image["sha256"]
        assert len(data) == image["bytes"]
    assert len(stored) == 30  # and no write-check probe left behind
    assert not (out / "images").exists()
    tmp = out / ".tmp"
    assert not tmp.exists() or not any(tmp.rglob("*"))
    assert (out / "manifest.jsonl").exists() and (out / "summary.json").exists()


async def test_a_changed_row_under_the_same_id_never_overwrites_the_old_object(
    tmp_path: Path, s3: S3Server
) -> None:
    out, src = tmp_path / "out", tmp_path / "p.jsonl"
    async with Emulator() as emu:
        config = config_for(emu, out, images_to=f"s3://{s3.bucket}")
        src.write_text('{"id": "x1", "prompt": "a red fox"}\n')
        await run(config, src)
        src.write_text('{"id": "x1", "prompt": "a blue fox"}\n')
        await run(config, src)
    first, second = (
        orjson.loads(line)["images"][0]["path"] for line in (out / "manifest.jsonl").open("rb")
    )
    assert first != second and "~" in second
    assert len(objects(s3)) == 2


async def test_a_refusing_store_stops_the_run_before_anything_is_paid(
    tmp_path: Path, s3: S3Server
) -> None:
    async with Emulator() as emu:
        config = config_for(emu, tmp_path / "out", images_to="s3://no-such-bucket-here/x")
        result = await run(config, write_prompts(tmp_path / "p.txt", 5))
        assert emu.stats()["generation_requests"] == 0
    assert result.exit_code == 3
    assert "no-such-bucket-here" in result.message
    assert "testing" not in result.message  # the fixture's secret key


async def test_the_cli_names_the_bucket_and_never_the_credentials(
    tmp_path: Path, s3: S3Server
) -> None:
    secret = "s3cr3t-Value-Never-Printed"
    async with Emulator() as emu:
        code, output = await sfbatch(
            "run",
            str(prompts(tmp_path / "p.txt", 3)),
            "--out",
            str(tmp_path / "out"),
            "--base-url",
            emu.base_url,
            "--images-to",
            "s3://absent-bucket-for-test/run",
            "--no-progress",
            env=cli_env(s3, AWS_SECRET_ACCESS_KEY=secret),
        )
        assert emu.stats()["generation_requests"] == 0
    assert code == 3, output
    assert "absent-bucket-for-test" in output
    assert secret not in output
    assert "testing" not in output


@pytest.mark.parametrize("where", ["/some/dir", "gs://bucket/x", "s3:///no-bucket"])
def test_images_to_must_be_an_s3_url_with_a_bucket(where: str) -> None:
    with pytest.raises(ConfigError, match="s3://"):
        RunConfig(out_dir="out", api_key="k", base_url="http://127.0.0.1:1/v1", images_to=where)


async def test_an_upload_that_fails_after_a_paid_generation_keeps_it_generated(
    tmp_path: Path, s3: S3Server
) -> None:
    out = tmp_path / "out"
    src = write_prompts(tmp_path / "p.txt", 12)
    seen: list[ManifestRecord] = []

    async def on_record(record: ManifestRecord) -> None:
        seen.append(record)
        if len(seen) == 3:
            empty_and_delete(s3)  # the bucket vanishes mid-run: uploads now fail

    async with Emulator(latency_s=0.02) as emu:
        config = config_for(
            emu, out, images_to=f"s3://{s3.bucket}/p", concurrency=1, download_concurrency=1
        )
        first = await Pipeline(config, _source(config, src), on_record=on_record).run()
        paid_first = emu.stats()["generation_requests"]
        assert first.exit_code == 5  # something outside the run must be fixed; resumable
        assert s3.bucket in first.message
        kept = [r for r in final(out).values() if r["status"] == "generated"]
        assert kept and all(r["urls"] for r in kept)

        s3.client().create_bucket(Bucket=s3.bucket)
        second = await run(config, src)
        assert second.exit_code == 0, second.message
        # Every item was paid for once: the kept ones were downloaded from their URLs.
        assert emu.stats()["generation_requests"] == 12
        assert paid_first >= 4
    records = final(out)
    assert {r["status"] for r in records.values()} == {"ok"}
    stored = objects(s3)
    deleted_by_the_test = {record["id"] for record in seen[:3]}
    for record in records.values():
        if record["id"] not in deleted_by_the_test:
            assert parse_s3_url(record["images"][0]["path"])[1] in stored


def _source(config: RunConfig, src: Path) -> PromptSource:
    return PromptSource(src, defaults=config.defaults, registry=ModelRegistry.builtin())


async def test_kill_9_then_resume_pays_nothing_twice_and_verify_checks_the_objects(
    tmp_path: Path, s3: S3Server
) -> None:
    src = prompts(tmp_path / "p.txt", 120)
    out = tmp_path / "out"
    env = cli_env(s3)
    async with Emulator(latency_s=0.15, latency_jitter_s=0.05) as emu:
        args = (
            "run",
            str(src),
            "--out",
            str(out),
            "--base-url",
            emu.base_url,
            "--images-to",
            f"s3://{s3.bucket}/build",
            "--concurrency",
            "6",
            "--download-concurrency",
            "4",
            "--no-progress",
        )
        proc = await start_sfbatch(*args, env=env)
        await wait_for_lines(proc, out / "manifest.jsonl", 15)
        proc.kill()
        await proc.wait()
        code, output = await sfbatch(*args, env=env)
        requests = emu.stats()["generation_requests"]
    assert code == 0, output
    counts = ok_counts(out)
    assert len(counts) == 120 and set(counts.values()) == {1}
    # Paid twice at most what was in flight at the kill: generation slots, the download
    # queue (2 x downloaders) and the downloaders.
    assert requests - 120 <= 6 + 8 + 4
    assert lines_in(out / "manifest.jsonl") >= 120

    code, output = await sfbatch("verify", str(out), env=env)
    assert code == 0, output
    assert "0 B hashed" in output and "checked by size only" in output  # HEADs, not hashes
    assert "Found credentials" not in output
    code, output = await sfbatch("verify", str(out), "--deep", "--json", env=env)
    assert code == 0, output
    report = orjson.loads(output.splitlines()[0])
    assert report["files"] == 120 and report["records"] == 120

    code, output = await sfbatch("status", str(out), "--json", env=env)
    assert code == 0, output
    status = orjson.loads(output.splitlines()[0])
    assert status["counts"]["ok"] == 120


async def test_verify_finds_missing_and_changed_objects(tmp_path: Path, s3: S3Server) -> None:
    out = tmp_path / "out"
    async with Emulator() as emu:
        await run(
            config_for(emu, out, images_to=f"s3://{s3.bucket}/v"),
            write_prompts(tmp_path / "p.txt", 6),
        )
    keys = sorted(objects(s3, "v/"))
    client = s3.client()
    client.delete_object(Bucket=s3.bucket, Key=keys[0])
    body = objects(s3)[keys[1]]
    client.put_object(Bucket=s3.bucket, Key=keys[1], Body=bytes(reversed(body)))  # same size
    # what a crash leaves between an upload and its record: an object no record names
    client.put_object(Bucket=s3.bucket, Key="v/images/999/left-behind_0.png", Body=b"x")
    client.put_object(Bucket=s3.bucket, Key="elsewhere/images/1.png", Body=b"x")  # not ours

    shallow = await asyncio.to_thread(verify, out)
    assert shallow.orphans == [f"s3://{s3.bucket}/v/images/999/left-behind_0.png"]
    assert [p.problem for p in shallow.missing] == ["missing"]
    assert shallow.missing[0].path == f"s3://{s3.bucket}/{keys[0]}"
    assert not shallow.mismatched and shallow.files == 5
    deep = await asyncio.to_thread(verify, out, deep=True)
    assert [p.problem for p in deep.mismatched] == ["sha256"]
    assert deep.mismatched[0].path == f"s3://{s3.bucket}/{keys[1]}"
    assert deep.exit_code == 1


async def test_status_and_gallery_work_with_object_paths(tmp_path: Path, s3: S3Server) -> None:
    out = tmp_path / "out"
    async with Emulator() as emu:
        await run(
            config_for(emu, out, images_to=f"s3://{s3.bucket}/g"),
            write_prompts(tmp_path / "p.txt", 4),
        )
    report = status_report(out)
    assert report["counts"]["ok"] == 4

    linked = await asyncio.to_thread(build_gallery, out)
    page = linked.index.read_text()
    assert f'href="s3://{s3.bucket}/g/images/' in page
    assert any("object storage" in note and "--presign" in note for note in linked.notes)
    assert not list((out / "gallery").rglob("*.jpg"))  # no thumbnails for objects

    shown = await asyncio.to_thread(build_gallery, out, presign=True)
    page = shown.index.read_text()
    assert page.count(f'src="{s3.endpoint_url}/{s3.bucket}/g/images/') == 4
    assert "Signature=" in page or "X-Amz-Signature=" in page


async def test_an_s3_build_exports_to_webdataset_with_every_image(
    tmp_path: Path, s3: S3Server
) -> None:
    out, shards = tmp_path / "out", tmp_path / "shards"
    async with Emulator() as emu:
        await run(
            config_for(emu, out, images_to=f"s3://{s3.bucket}/e"),
            write_prompts(tmp_path / "p.txt", 5),
        )
    code, output = await sfbatch(
        "export", str(out), "--format", "webdataset", "--to", str(shards), env=cli_env(s3)
    )
    assert code == 0, output
    with tarfile.open(shards / "000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]
    by_sha = {
        hashlib.sha256(data).hexdigest() for name, data in members.items() if name.endswith(".png")
    }
    assert by_sha == {r["images"][0]["sha256"] for r in final(out).values()}
    assert len(by_sha) == 5
