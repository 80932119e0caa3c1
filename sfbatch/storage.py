"""Where images and exports go: a local directory or an S3(-compatible) bucket.

:func:`open_store` takes a local path or ``s3://bucket/prefix`` and returns an
:class:`ImageStore`, an async context manager with one small API for both::

    >>> async with open_store("s3://my-bucket/run1") as store:      # doctest: +SKIP
    ...     await store.check_writable()        # StoreAccessError on 403 / no such bucket
    ...     url = await store.put_file(Path("tmp/0001.png"), "images/000/0001.png")
    ...     size = await store.head("images/000/0001.png")   # bytes, or None if absent
    ...     async for chunk in store.open("images/000/0001.png"): ...

S3 goes through aiobotocore (the ``s3`` extra), so credentials, region and endpoint come
the standard AWS way: environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``
for S3-compatible stores, ...), ``~/.aws/config`` and ``credentials``, instance roles.
sfbatch never writes them anywhere. Requests are bounded by ``StoreConfig.concurrency``
and retried by botocore's ``standard`` retry mode (throttling, 5xx, resets) up to
``max_attempts``; files above ``multipart_threshold_bytes`` are uploaded in parts.

Errors: every failure of a store surfaces as :class:`StorageError`;
:class:`StoreAccessError` when the store refuses us (403, no such bucket, bad keys,
unreachable endpoint), so a run can stop before it pays for anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from sfbatch.aio import AsyncResource
from sfbatch.errors import ConfigError, SfbatchError

__all__ = [
    "ImageStore",
    "LocalStore",
    "MissingExtraError",
    "S3Store",
    "StorageError",
    "StoreAccessError",
    "StoreConfig",
    "is_s3_url",
    "open_store",
    "parse_s3_url",
]

_CHUNK_BYTES = 1 << 20
_MIN_PART_BYTES = 5 << 20  # S3's floor for every part but the last
_REFUSED_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "NoSuchBucket",
        "SignatureDoesNotMatch",
        "InvalidBucketName",
        "403",
        "404",
    }
)


class MissingExtraError(ConfigError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, extra: str, module: str) -> None:
        super().__init__(
            f"this needs the optional {module!r} package: pip install 'sfbatch[{extra}]'"
        )
        self.extra = extra


class StorageError(SfbatchError):
    """Reading or writing a store failed (after the retries)."""


class StoreAccessError(StorageError):
    """The store refuses us: no such bucket, 403, bad credentials, unreachable endpoint."""


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    """How a store talks to its backend. Only S3 uses the part and retry settings."""

    concurrency: int = 16
    max_attempts: int = 5
    multipart_threshold_bytes: int = 64 << 20
    part_size_bytes: int = 16 << 20
    parts_in_flight: int = 4
    presign_expires_s: int = 3600
    # A store that takes the connection and never answers fails each attempt after these,
    # not botocore's 60 s read timeout (times the attempts, for every object in flight).
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        if not (self.connect_timeout_s > 0 and self.read_timeout_s > 0):
            raise ConfigError("store connect_timeout_s and read_timeout_s must be > 0")
        if self.concurrency < 1 or self.parts_in_flight < 1 or self.max_attempts < 1:
            raise ConfigError("store concurrency, parts_in_flight and max_attempts must be >= 1")
        if self.part_size_bytes < _MIN_PART_BYTES:
            raise ConfigError(f"part_size_bytes must be >= {_MIN_PART_BYTES} (S3's minimum)")
        if self.multipart_threshold_bytes < self.part_size_bytes:
            raise ConfigError("multipart_threshold_bytes must be >= part_size_bytes")


def is_s3_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith("s3://")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` → ``("bucket", "some/key")``."""
    if not is_s3_url(url):
        raise ConfigError(f"not an s3:// URL: {url!r}")
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket:
        raise ConfigError(f"no bucket in {url!r}: expected s3://bucket/prefix")
    return bucket, key


def _check_key(key: str) -> str:
    parts = PurePosixPath(key).parts
    if not key or key.startswith("/") or ".." in parts:
        raise StorageError(f"bad object key {key!r}: must be relative, without '..'")
    return key


class ImageStore(AsyncResource):
    """Async store of named objects (keys are relative ``/``-separated paths)."""

    url: str  # where the store lives: a local directory or s3://bucket/prefix

    def url_for(self, key: str) -> str:
        """The location recorded for ``key`` (a local path, or ``s3://bucket/prefix/key``)."""
        raise NotImplementedError

    async def put_file(self, local_path: Path, key: str, *, remove_source: bool = False) -> str:
        """Store ``local_path`` under ``key``; return :meth:`url_for` ``key``.

        ``remove_source`` deletes the local file once it is stored (a move when possible).
        """
        raise NotImplementedError

    async def put_bytes(self, data: bytes, key: str) -> str:
        """Store a small object from memory (state files, metadata)."""
        raise NotImplementedError

    async def head(self, key: str) -> int | None:
        """Size in bytes of ``key``, or None if there is no such object."""
        raise NotImplementedError

    def open(self, key: str) -> AsyncIterator[bytes]:
        """Stream ``key``'s bytes in chunks of about 1 MiB; StorageError if it is missing."""
        raise NotImplementedError

    def keys(self, prefix: str) -> AsyncIterator[str]:
        """Every key under ``prefix`` (``images/``), in no promised order."""
        raise NotImplementedError

    async def delete(self, key: str) -> None:
        """Remove ``key``; nothing to do if it is not there."""
        raise NotImplementedError

    async def read(self, key: str) -> bytes:
        """The whole object (for small objects; use :meth:`open` for images)."""
        return b"".join([chunk async for chunk in self.open(key)])

    async def download(self, key: str, local_path: Path) -> None:
        """Copy ``key`` to ``local_path``, streamed."""
        tmp = local_path.with_name(local_path.name + ".part")
        f = await asyncio.to_thread(open, tmp, "wb")
        with f:
            async for chunk in self.open(key):
                await asyncio.to_thread(f.write, chunk)
        os.replace(tmp, local_path)

    async def presign(self, key: str, *, expires_s: int | None = None) -> str:
        """A URL anyone can GET for a while (S3), or a ``file://`` URL (local)."""
        raise NotImplementedError

    async def check_writable(self) -> None:
        """Write and delete a probe object; StoreAccessError if the store refuses."""
        raise NotImplementedError


class LocalStore(ImageStore):
    """A directory. Writes land via a temporary file and a rename, never half-written."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def url_for(self, key: str) -> str:
        return str(self._path(key))

    async def put_file(self, local_path: Path, key: str, *, remove_source: bool = False) -> str:
        target = self._path(key)
        await asyncio.to_thread(_place_file, Path(local_path), target, remove_source)
        return str(target)

    async def put_bytes(self, data: bytes, key: str) -> str:
        target = self._path(key)
        await asyncio.to_thread(_write_atomic, target, data)
        return str(target)

    async def head(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    async def open(self, key: str) -> AsyncIterator[bytes]:
        try:
            f = await asyncio.to_thread(open, self._path(key), "rb")
        except OSError as exc:
            raise StorageError(f"cannot read {self._path(key)}: {exc.strerror}") from exc
        with f:
            while chunk := await asyncio.to_thread(f.read, _CHUNK_BYTES):
                yield chunk

    async def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    async def keys(self, prefix: str) -> AsyncIterator[str]:
        top = self._path(prefix)
        found = await asyncio.to_thread(lambda: [p for p in top.rglob("*") if p.is_file()])
        for path in found:
            yield path.relative_to(self.root).as_posix()

    async def presign(self, key: str, *, expires_s: int | None = None) -> str:
        return self._path(key).resolve().as_uri()

    async def check_writable(self) -> None:
        probe = f".sfbatch-write-check-{uuid.uuid4().hex}"
        try:
            await self.put_bytes(b"", probe)
            self._path(probe).unlink()
        except OSError as exc:
            raise StoreAccessError(f"cannot write to {self.root}: {exc.strerror}") from exc


def _write_atomic(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half file behind
        raise


def _place_file(source: Path, target: Path, remove_source: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if remove_source:
        try:
            os.replace(source, target)
            return
        except OSError:  # another file system: copy, then remove
            pass
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if remove_source:
        source.unlink()


class S3Store(ImageStore):
    """An S3 bucket (or S3-compatible store) under a key prefix, through aiobotocore."""

    def __init__(self, bucket: str, prefix: str = "", config: StoreConfig | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.config = config or StoreConfig()
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._slots = asyncio.Semaphore(self.config.concurrency)
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def _open(self) -> None:
        try:
            from aiobotocore.config import AioConfig
            from aiobotocore.session import get_session
        except ImportError as exc:
            raise MissingExtraError("s3", "aiobotocore") from exc
        # "Found credentials in environment variables." on every command: not the user's news
        for name in ("botocore.credentials", "aiobotocore.credentials"):
            logging.getLogger(name).setLevel(logging.WARNING)
        session = get_session()
        config = AioConfig(
            retries={"max_attempts": self.config.max_attempts, "mode": "standard"},
            max_pool_connections=self.config.concurrency + self.config.parts_in_flight,
            connect_timeout=self.config.connect_timeout_s,
            read_timeout=self.config.read_timeout_s,
        )
        self._client = await self._stack.enter_async_context(
            session.create_client("s3", config=config)
        )
        # "Expect: 100-continue" on uploads: aiohttp waits for the 100 with no read timeout,
        # so a store that takes the connection and never answers would hold the run for ever.
        # Without it the body goes at once and the read timeout bounds the wait for the answer.
        from botocore.handlers import add_expect_header

        self._client.meta.events.unregister("before-call.s3", add_expect_header)

    async def aclose(self) -> None:
        await self._stack.aclose()
        self._client = None

    @property
    def client(self) -> Any:
        if self._client is None:
            raise StorageError("S3Store used outside 'async with'")
        return self._client

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def url_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    async def put_file(self, local_path: Path, key: str, *, remove_source: bool = False) -> str:
        size = (await asyncio.to_thread(os.stat, local_path)).st_size
        with _mapped(self.url_for(key)):
            if size > self.config.multipart_threshold_bytes:
                await self._put_multipart(Path(local_path), self._key(key), size)
            else:
                data = await asyncio.to_thread(Path(local_path).read_bytes)
                async with self._slots:
                    await self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        if remove_source:
            await asyncio.to_thread(os.unlink, local_path)
        return self.url_for(key)

    async def put_bytes(self, data: bytes, key: str) -> str:
        with _mapped(self.url_for(key)):
            async with self._slots:
                await self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        return self.url_for(key)

    async def _put_multipart(self, path: Path, full_key: str, size: int) -> None:
        part_size = self.config.part_size_bytes
        upload = await self.client.create_multipart_upload(Bucket=self.bucket, Key=full_key)
        upload_id = upload["UploadId"]
        parts_in_flight = asyncio.Semaphore(self.config.parts_in_flight)
        etags: dict[int, str] = {}

        async def send(number: int, offset: int) -> None:
            try:
                data = await asyncio.to_thread(_read_range, path, offset, part_size)
                async with self._slots:
                    answer = await self.client.upload_part(
                        Bucket=self.bucket,
                        Key=full_key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=data,
                    )
                etags[number] = answer["ETag"]
            finally:
                parts_in_flight.release()

        try:
            async with asyncio.TaskGroup() as group:
                for number, offset in enumerate(range(0, size, part_size), start=1):
                    # Taken here, released by the part: at most parts_in_flight parts in memory.
                    await parts_in_flight.acquire()
                    group.create_task(send(number, offset))
            parts = [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
            await self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=full_key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=full_key, UploadId=upload_id
                )
            raise

    async def head(self, key: str) -> int | None:
        try:
            with _mapped(self.url_for(key), missing_ok=True):
                async with self._slots:
                    answer = await self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except _Missing:
            return None
        size: int = answer["ContentLength"]
        return size

    async def open(self, key: str) -> AsyncIterator[bytes]:
        with _mapped(self.url_for(key)):
            async with self._slots:
                answer = await self.client.get_object(Bucket=self.bucket, Key=self._key(key))
                async with answer["Body"] as body:
                    while chunk := await body.read(_CHUNK_BYTES):
                        yield chunk

    async def delete(self, key: str) -> None:
        with _mapped(self.url_for(key)):
            async with self._slots:
                await self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    async def keys(self, prefix: str) -> AsyncIterator[str]:
        start = len(self.prefix) + 1 if self.prefix else 0
        with _mapped(self.url_for(prefix)):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix)
            )
            async for page in pages:
                for entry in page.get("Contents", ()):
                    yield entry["Key"][start:]

    async def presign(self, key: str, *, expires_s: int | None = None) -> str:
        url: str = await self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=expires_s or self.config.presign_expires_s,
        )
        return url

    async def check_writable(self) -> None:
        key = self._key(f".sfbatch-write-check-{uuid.uuid4().hex}")
        try:
            with _mapped(self.url, refused_always=True):
                await self.client.put_object(Bucket=self.bucket, Key=key, Body=b"")
                await self.client.delete_object(Bucket=self.bucket, Key=key)
        except StoreAccessError:
            raise
        except StorageError as exc:
            raise StoreAccessError(str(exc)) from exc


def _read_range(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


class _Missing(Exception):
    pass


@contextlib.contextmanager
def _mapped(where: str, *, missing_ok: bool = False, refused_always: bool = False) -> Any:
    """The one boundary where botocore/aiohttp errors become StorageError."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if missing_ok and (code in ("404", "NoSuchKey", "NotFound") or status == 404):
            raise _Missing from None
        message = f"{where}: {code or status} {error.get('Message', '')}".rstrip()
        if code in _REFUSED_CODES or status == 403 or refused_always:
            raise StoreAccessError(message) from exc
        raise StorageError(message) from exc
    except BotoCoreError as exc:  # no credentials, endpoint unreachable, ...
        raise StoreAccessError(f"{where}: {exc}") from exc
    except OSError as exc:
        raise StorageError(f"{where}: {exc}") from exc


def open_store(location: str | Path, config: StoreConfig | None = None) -> ImageStore:
    """A store for a local directory or ``s3://bucket/prefix``; use it with ``async with``."""
    if is_s3_url(location):
        bucket, prefix = parse_s3_url(str(location))
        return S3Store(bucket, prefix, config)
    if isinstance(location, str) and "://" in location:
        raise ConfigError(f"unsupported store {location!r}: use a local path or s3://bucket/prefix")
    return LocalStore(Path(location))
