"""storage.py against a real directory and a real S3 server (moto on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest

from sfbatch.errors import ConfigError
from sfbatch.storage import (
    LocalStore,
    S3Store,
    StorageError,
    StoreAccessError,
    StoreConfig,
    open_store,
    parse_s3_url,
)

if TYPE_CHECKING:
    from conftest import S3Server

pytest.importorskip("aiobotocore", reason="needs the s3 extra")


def _file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://bucket/a/b.png") == ("bucket", "a/b.png")
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    with pytest.raises(ConfigError):
        parse_s3_url("s3:///key")
    with pytest.raises(ConfigError):
        open_store("gs://bucket/x")


def test_config_refuses_parts_below_the_s3_minimum() -> None:
    with pytest.raises(ConfigError, match="part_size_bytes"):
        StoreConfig(part_size_bytes=1024)


async def test_local_store_round_trip(tmp_path: Path) -> None:
    src = _file(tmp_path / "src.bin", 3 << 20)
    async with open_store(tmp_path / "dest") as store:
        assert isinstance(store, LocalStore)
        await store.check_writable()
        url = await store.put_file(src, "images/000/a.bin")
        assert Path(url) == tmp_path / "dest/images/000/a.bin"
        assert src.exists()
        assert await store.head("images/000/a.bin") == 3 << 20
        assert await store.head("images/000/missing.bin") is None
        assert await store.read("images/000/a.bin") == src.read_bytes()
        assert [key async for key in store.keys("images/")] == ["images/000/a.bin"]
        await store.delete("images/000/a.bin")
        await store.delete("images/000/a.bin")
        assert await store.head("images/000/a.bin") is None
        await store.put_file(src, "images/000/a.bin")
        await store.put_file(src, "b.bin", remove_source=True)
        assert not src.exists()
        with pytest.raises(StorageError):
            await store.put_bytes(b"x", "../escape")
        with pytest.raises(StorageError):
            await store.read("missing.bin")
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["b.bin", "images"]


async def test_local_store_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreAccessError):
        await LocalStore(blocker / "sub").check_writable()


async def test_s3_round_trip_small_and_multipart(s3: S3Server, tmp_path: Path) -> None:
    config = StoreConfig(multipart_threshold_bytes=6 << 20, part_size_bytes=5 << 20)
    small = _file(tmp_path / "small.png", 200_000)
    big = _file(tmp_path / "big.tar", (12 << 20) + 123)  # 3 parts, the last one short
    async with open_store(f"s3://{s3.bucket}/run1", config) as store:
        assert isinstance(store, S3Store)
        await store.check_writable()
        assert await store.put_file(small, "images/000/x.png") == (
            f"s3://{s3.bucket}/run1/images/000/x.png"
        )
        await store.put_file(big, "shards/000000.tar", remove_source=True)
        assert not big.exists()
        assert await store.head("images/000/x.png") == 200_000
        assert await store.head("shards/000000.tar") == (12 << 20) + 123
        assert [key async for key in store.keys("images/")] == ["images/000/x.png"]
        assert await store.head("nothing-here") is None
        assert await store.read("images/000/x.png") == small.read_bytes()
        digest = hashlib.sha256()
        async for chunk in store.open("shards/000000.tar"):
            digest.update(chunk)
        down = tmp_path / "down.tar"
        await store.download("shards/000000.tar", down)
        assert hashlib.sha256(down.read_bytes()).hexdigest() == digest.hexdigest()
        url = await store.presign("images/000/x.png", expires_s=60)
        with pytest.raises(StorageError):
            await store.read("nothing-here")
        await store.put_bytes(b"x", "gone.bin")
        await store.delete("gone.bin")
        await store.delete("gone.bin")  # gone already: nothing to do
        assert await store.head("gone.bin") is None
    async with aiohttp.ClientSession() as http, http.get(url) as fetched:
        assert fetched.status == 200
        assert await fetched.read() == small.read_bytes()
    head = s3.client().head_object(Bucket=s3.bucket, Key="run1/shards/000000.tar")
    assert "-" in head["ETag"]  # a multipart upload's ETag is "<md5>-<parts>"
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket)["Contents"]]
    assert sorted(keys) == ["run1/images/000/x.png", "run1/shards/000000.tar"]  # probe removed


async def test_s3_missing_bucket_is_refused_up_front(s3: S3Server) -> None:
    async with open_store(f"s3://{s3.bucket}-nope/x") as store:
        with pytest.raises(StoreAccessError, match="NoSuchBucket"):
            await store.check_writable()


async def test_s3_forbidden_bucket_is_refused(s3: S3Server) -> None:
    # A bucket policy that denies every write: moto enforces it on its server.
    import json

    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:PutObject",
                "Resource": f"arn:aws:s3:::{s3.bucket}/*",
            }
        ],
    }
    s3.client().put_bucket_policy(Bucket=s3.bucket, Policy=json.dumps(policy))
    async with open_store(f"s3://{s3.bucket}") as store:
        with pytest.raises(StoreAccessError):
            await store.check_writable()


async def test_s3_unreachable_endpoint_is_refused(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    async with open_store(f"s3://{s3.bucket}", StoreConfig(max_attempts=1)) as store:
        with pytest.raises(StoreAccessError):
            await store.check_writable()


async def test_s3_a_store_that_never_answers_fails_on_its_read_timeout(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Takes the connection, reads the request, never answers (a hung or stopped store).
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 20)
        await asyncio.sleep(60)

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    config = StoreConfig(max_attempts=2, read_timeout_s=0.3)
    started = asyncio.get_running_loop().time()
    async with server, open_store(f"s3://{s3.bucket}", config) as store:
        with pytest.raises(StorageError):
            await store.put_bytes(b"x", "a.bin")
    assert asyncio.get_running_loop().time() - started < 30  # not botocore's 60 s, twice
