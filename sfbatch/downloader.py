"""Streams a temporary image URL to disk: the only boundary for download errors.

Each download is hashed as it streams, checks the first bytes are an image (and takes
the extension from them, not from the URL; the first bytes are gathered across network
chunks, however small the first one is), enforces a size cap, one overall deadline
and an idle bound (both on :class:`~sfbatch.deadlines.Deadlines`' one timer), then is
written to ``DIR/.tmp/``, fsynced and only then renamed
into ``DIR/images/SHARD/``. So a file under ``images/`` is always complete, and a crash
leaves at most a ``.part`` file that the next run removes.

File work is a group commit (:class:`_GroupCommit`): an image's bytes are held in memory
(up to 1 MiB; a larger one spills to its ``.part`` file) until the download ends, then
the images that finished meanwhile are written, fsynced, renamed and their directories
fsynced together, in one trip to a worker thread (or at once on the loop, while that
file work is cheaper than the trip). :meth:`Downloader.fetch` returns only
once its image is in place and durable, so the manifest line written after it never
points at a missing file; durability is paid per batch, not per image::

    downloader = Downloader(out_dir=Path("out"), session=session)
    stored = await downloader.fetch(url, "images/000/000000042_0")
    stored.path, stored.sha256, stored.bytes

A full disk (ENOSPC, EDQUOT) while writing raises :class:`~sfbatch.errors.DiskFullError`
(a directory that refuses the write, e.g. its permissions: its parent
:class:`~sfbatch.errors.OutputWriteError`), never retried: the image is paid for,
so the caller keeps the item as ``generated`` with its URL and stops the run (exit 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import itertools
import os
import random
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aiofiles.os
import aiohttp

from sfbatch.deadlines import Deadlines
from sfbatch.errors import (
    DISK_FULL_ERRNOS,
    OUTPUT_ERRNOS,
    DiskFullError,
    DownloadError,
    ExpiredUrlError,
    ImageTooLargeError,
    NotAnImageError,
    OutputWriteError,
)
from sfbatch.retry import RetryPolicy

__all__ = [
    "TMP_DIR",
    "Downloader",
    "StoredImage",
    "clean_tmp",
    "disk_full",
    "sniff_image_type",
    "tmp_dir_name",
    "write_failed",
]

TMP_DIR = ".tmp"
_SHARD_TMP = re.compile(r"\d+-of-\d+")
_CHUNK = 64 * 1024
# Enough bytes for every signature sniff_image_type knows (WEBP's ends at byte 12).
_SNIFF_BYTES = 12
_SPOOL_BYTES = 1024 * 1024
_EXPIRED = (403, 404, 410)
# Bounds one group commit's trip to the worker thread (and the memory it writes out).
_MAX_BATCH = 128
_IDLE_S = 30.0  # the longest wait for the answer's headers, or for more of its body
# File work at most this long per image (page cache, tmpfs, no fsync) is done on the loop
# at once: a trip to a worker thread and back costs more than the work itself.
_INLINE_MAX_S = 200e-6
# Room kept free on the output's file system once images have filled the rest, for the
# records of paid items (each about 1 KB); how many image bytes between two looks at it.
_RESERVE_BYTES = 16 << 20
_ROOM_CHECK_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class StoredImage:
    """An image in place: ``path`` relative to the output directory."""

    path: str
    sha256: str
    bytes: int

    def as_record(self) -> dict[str, str | int]:
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes}


def sniff_image_type(head: bytes) -> str | None:
    """The file extension for an image's first bytes, or None if they are not an image.

    >>> sniff_image_type(b"\\x89PNG\\r\\n\\x1a\\n....")
    'png'
    """
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    return None


def tmp_dir_name(shard: tuple[int, int] | None) -> str:
    """Where a run keeps its temporary files, relative to DIR: ``.tmp``, or ``.tmp/I-of-N``
    for a shard (the shards of a job run in parallel in one DIR, each under its own lock,
    so each cleans only its own).

    >>> tmp_dir_name(None), tmp_dir_name((1, 4))
    ('.tmp', '.tmp/1-of-4')
    """
    return TMP_DIR if shard is None else f"{TMP_DIR}/{shard[0]}-of-{shard[1]}"


def clean_tmp(out_dir: Path, shard: tuple[int, int] | None = None) -> int:
    """Remove the leftover temporary files of an earlier run of this shard (or of the
    whole DIR, shards' own directories apart); returns how many entries there were."""
    tmp = out_dir / tmp_dir_name(shard)
    if not tmp.is_dir() or tmp.is_symlink():
        return 0  # a link is the user's (or a test's): what it points at is not ours
    count = 0
    for entry in tmp.iterdir():
        if shard is None and _SHARD_TMP.fullmatch(entry.name) and entry.is_dir():
            continue  # a shard's, maybe running now: only that shard cleans it
        count += 1
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
    for empty in (tmp, out_dir / TMP_DIR):  # gone when nothing is left in it
        with contextlib.suppress(OSError):
            empty.rmdir()
    return count


class Downloader:
    """Downloads image URLs into the output tree, retrying transient failures.

    ``timeout_s`` (the run's ``download_timeout_s``) is the deadline of one attempt as a
    whole, from connecting to the last byte; a body that stalls for
    ``min(30, timeout_s)`` seconds without a byte fails sooner. Each failed attempt is
    retried with ``retry``, so an image can take ``(max_retries + 1) × timeout_s`` plus
    the backoff. Writing to disk is not part of the deadline.
    """

    def __init__(
        self,
        *,
        out_dir: Path,
        session: aiohttp.ClientSession,
        timeout_s: float = 120.0,
        max_bytes: int = 64 * 1024 * 1024,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
        fsync: bool = True,
        tmp_dir: str = TMP_DIR,
        deadlines: Deadlines | None = None,
    ) -> None:
        self.out_dir = out_dir
        self._session = session
        # Deadlines are kept by ``deadlines`` (no timer per request or per read); aiohttp
        # keeps only the connect timeout.
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(30.0, timeout_s))
        self._timeout_s = timeout_s
        self._idle_s = min(_IDLE_S, timeout_s)
        self._deadlines = deadlines or Deadlines()
        self._max_bytes = max_bytes
        self._retry = retry or RetryPolicy(max_retries=3, base_s=0.5, cap_s=10.0)
        self._rng = rng or random.Random()
        self._commit = _GroupCommit(fsync=fsync, root=os.fspath(out_dir))
        self._made_dirs: set[str] = set()
        # Paths are str on the hot path (a Path join per image costs more than the join);
        # temporary names are this downloader's prefix and a counter: unique, no uuid each.
        self._root = os.fspath(out_dir)
        self._tmp_dir = os.path.join(self._root, tmp_dir)
        self._part_prefix = os.path.join(self._tmp_dir, uuid.uuid4().hex[:16])
        self._parts = itertools.count()
        self.retries = 0
        self.bytes_written = 0

    async def fetch(self, url: str, stem: str) -> StoredImage:
        """Download ``url`` to ``out_dir/stem.EXT``, retrying transient failures.

        Raises :class:`ExpiredUrlError` (generate again), :class:`ImageTooLargeError`, or
        the last :class:`DownloadError` once the retries are used up.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._fetch_once(url, stem)
            except DownloadError as exc:
                if not exc.retryable or self._retry.gives_up(attempt):
                    raise
                self.retries += 1
                await asyncio.sleep(self._retry.delay_s(attempt, self._rng))

    async def _fetch_once(self, url: str, stem: str) -> StoredImage:
        spool = _Spool(f"{self._part_prefix}-{next(self._parts)}.part")
        try:
            await self._ensure_dir(self._tmp_dir)
            digest, size, ext = await self._stream_to(url, spool)
            final_rel = f"{stem}.{ext}"
            await self._commit.put(spool, os.path.join(self._root, final_rel))
        except BaseException as exc:
            spool.discard()  # sync on purpose: must run even when cancelled
            if isinstance(exc, OSError) and exc.errno in OUTPUT_ERRNOS:
                raise write_failed(exc, self.out_dir) from exc
            raise
        self.bytes_written += size
        return StoredImage(path=final_rel, sha256=digest, bytes=size)

    async def _stream_to(self, url: str, spool: _Spool) -> tuple[str, int, str]:
        hasher = hashlib.sha256()
        size = 0
        ext: str | None = None
        try:
            with self._deadlines.within(self._timeout_s, idle_s=self._idle_s) as deadline:
                async with self._session.get(url, timeout=self._timeout) as resp:
                    deadline.watch(resp.content)
                    if resp.status in _EXPIRED:
                        raise ExpiredUrlError(f"image URL answered {resp.status}: expired or gone")
                    if resp.status != 200:
                        raise DownloadError(f"image URL answered {resp.status}")
                    declared = resp.content_length
                    if declared is not None and declared > self._max_bytes:
                        raise ImageTooLargeError(
                            f"image of {declared} bytes is over the cap of {self._max_bytes}"
                        )
                    if declared is not None and declared <= _SPOOL_BYTES:
                        # a small image in one read, held whole (the loop below costs more)
                        body = await resp.read()
                        if len(body) != declared:
                            raise DownloadError(
                                f"image body cut short: {len(body)} of {declared} bytes"
                            )
                        hasher.update(body)
                        spool.hold(body)
                        return (
                            hasher.hexdigest(),
                            declared,
                            _image_type(body[:_SNIFF_BYTES], resp.content_type),
                        )
                    head = b""
                    async for chunk in resp.content.iter_chunked(_CHUNK):
                        if ext is None and len(head) < _SNIFF_BYTES:
                            head += chunk[: _SNIFF_BYTES - len(head)]
                            if len(head) == _SNIFF_BYTES:
                                ext = _image_type(head, resp.content_type)
                        size += len(chunk)
                        if size > self._max_bytes:
                            raise ImageTooLargeError(
                                f"image is over the cap of {self._max_bytes} bytes"
                            )
                        hasher.update(chunk)
                        await spool.write(chunk)
                    if declared is not None and size != declared:
                        raise DownloadError(f"image body cut short: {size} of {declared} bytes")
                    if ext is None:  # a body shorter than the longest signature
                        ext = _image_type(head, resp.content_type)
        except TimeoutError as exc:
            raise DownloadError("image download passed its deadline") from exc
        except aiohttp.ClientError as exc:
            raise DownloadError(f"image download failed: {type(exc).__name__}: {exc}") from exc
        return hasher.hexdigest(), size, ext

    async def _ensure_dir(self, path: str) -> None:
        if path not in self._made_dirs:
            await aiofiles.os.makedirs(path, exist_ok=True)
            self._made_dirs.add(path)


def write_failed(exc: OSError, out_dir: Path) -> OutputWriteError:
    """The error for a write under ``out_dir`` that failed with ``exc`` (an errno of
    :data:`~sfbatch.errors.OUTPUT_ERRNOS`): :func:`disk_full`, or the directory's refusal."""
    if exc.errno in DISK_FULL_ERRNOS:
        return disk_full(exc, out_dir)
    path = exc.filename if isinstance(exc.filename, str) else None
    return OutputWriteError(
        f"cannot write into {out_dir}: {exc.strerror or exc}"
        + (f" ({path})" if path else "")
        + ": fix its permissions (or the disk), then run the same command again to resume; "
        "paid images not yet written are kept by their URL",
        errno_=exc.errno or errno.EIO,
        path=path,
    )


def disk_full(exc: OSError, out_dir: Path) -> DiskFullError:
    """The :class:`DiskFullError` for an ENOSPC/EDQUOT ``exc`` raised writing under ``out_dir``."""
    what = "disk quota exceeded" if exc.errno == errno.EDQUOT else "no space left on the device"
    return DiskFullError(
        f"{what} writing into {out_dir}: free some space (or raise the quota), then run the "
        "same command again to resume; paid images not yet written are kept by their URL",
        errno_=exc.errno or errno.ENOSPC,
        path=exc.filename if isinstance(exc.filename, str) else None,
    )


def _image_type(head: bytes, content_type: str | None) -> str:
    ext = sniff_image_type(head)
    if ext is None:
        if not head:
            raise NotAnImageError("URL served an empty body")
        raise NotAnImageError(f"URL served {content_type or 'unknown type'} that is not an image")
    return ext


class _Spool:
    """An image's bytes on their way to its temporary file, written in batches.

    Chunks are held until ``_SPOOL_BYTES`` have come, then written in one trip to a
    worker thread; the group commit writes the rest. So an image under 1 MiB costs no
    thread trip of its own, and memory stays at about 1 MiB a download.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._chunks: list[bytes] = []
        self._held = 0
        self._file: IO[bytes] | None = None
        # True while a group commit works on it in a worker thread, which then owns it.
        self.busy = False

    @property
    def held(self) -> int:
        """Bytes in memory, not yet in the file."""
        return self._held

    def hold(self, chunk: bytes) -> None:
        """Keep ``chunk`` in memory (a whole small image: the caller bounds its size)."""
        self._chunks.append(chunk)
        self._held += len(chunk)

    async def write(self, chunk: bytes) -> None:
        self.hold(chunk)
        if self._held >= _SPOOL_BYTES:
            await asyncio.to_thread(self._write_held)

    def _write_held(self) -> None:
        if self._file is None:
            self._file = open(self.path, "wb")  # noqa: SIM115  (closed in the group commit or discard)
        self._file.writelines(self._chunks)
        self._chunks.clear()
        self._held = 0

    def write_out(self) -> IO[bytes]:
        """Write what is held and flush it; the open file, for fsync (in a worker thread)."""
        self._write_held()
        assert self._file is not None
        self._file.flush()
        return self._file

    def discard(self) -> None:
        if self.busy:
            return  # the group commit discards it once its thread is done
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        with contextlib.suppress(OSError):  # gone already, or a directory refusing writes
            os.unlink(self.path)


@dataclass(slots=True)
class _Landing:
    """One image for the group commit: its spool, where it goes, what went wrong."""

    spool: _Spool
    final: str
    error: BaseException | None = None


class _GroupCommit:
    """Lands images in batches: write, fsync files, rename, fsync directories.

    Images handed over while a batch is in the worker thread form the next batch, so
    the batch grows with the load by itself and nothing waits on a timer. An error
    (a full disk) fails only the images it hit; a failed directory fsync fails the batch.

    The file work is timed. While it costs at most ``_INLINE_MAX_S`` an image (tmpfs,
    the page cache without fsync), each image lands on the loop at once, as a plain
    ``write_bytes`` would: the trip to a worker thread and back would cost more. The
    first batch, and every batch while it costs more (fsyncs on a disk, a stalled
    write), goes to the worker thread.
    """

    def __init__(self, *, fsync: bool, root: str | None = None) -> None:
        self._fsync = fsync
        self._root = root  # the output directory: its file system keeps room for the manifest
        self._unchecked_bytes = _ROOM_CHECK_BYTES  # the first batch checks
        self._waiting: list[tuple[_Landing, asyncio.Future[None]]] = []
        self._runner: asyncio.Task[None] | None = None
        self._made_dirs: set[str] = set()
        self._per_image_s: float | None = None  # moving average of the file work per image

    async def put(self, spool: _Spool, final: str) -> None:
        """Return once ``spool``'s bytes are at ``final`` (and durable, with fsync)."""
        landing = _Landing(spool, final)
        if self._per_image_s is not None and self._per_image_s <= _INLINE_MAX_S:
            self._observe(self._land([landing]), 1)
            if landing.error is not None:
                raise landing.error
            return
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((landing, done))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        await done

    def _observe(self, seconds: float, images: int) -> None:
        per_image_s, average = seconds / images, self._per_image_s
        self._per_image_s = per_image_s if average is None else (3 * average + per_image_s) / 4

    async def _run(self) -> None:
        while self._waiting:
            batch = [(x, done) for x, done in self._waiting[:_MAX_BATCH] if not done.done()]
            del self._waiting[:_MAX_BATCH]
            if not batch:
                continue
            landings = [landing for landing, _ in batch]
            for landing in landings:
                landing.spool.busy = True
            try:
                self._observe(await asyncio.to_thread(self._land, landings), len(landings))
            except BaseException:  # cancelled at shutdown: nothing in it counts as landed
                for landing, done in batch:
                    landing.spool.busy = False
                    done.cancel()
                raise
            self._settle(batch)

    @staticmethod
    def _settle(batch: list[tuple[_Landing, asyncio.Future[None]]]) -> None:
        for landing, done in batch:
            landing.spool.busy = False
            if done.done():  # its waiter was cancelled: clean up for it
                landing.spool.discard()
            elif landing.error is None:
                done.set_result(None)
            else:
                done.set_exception(landing.error)

    def _land(self, batch: list[_Landing]) -> float:
        """The batch's file work (errors are kept per image); the seconds it took."""
        started = time.perf_counter()
        if self._root is not None and not self._room_for(batch):
            for landing in batch:
                landing.error = OSError(
                    errno.ENOSPC, "the last free space is kept for the manifest", self._root
                )
            return time.perf_counter() - started
        written: list[tuple[_Landing, IO[bytes]]] = []
        for landing in batch:
            try:
                written.append((landing, landing.spool.write_out()))
            except (OSError, ValueError) as exc:
                landing.error = exc
        placed: list[_Landing] = []
        for landing, file in written:
            try:
                with file:
                    if self._fsync:
                        os.fsync(file.fileno())
                parent = os.path.dirname(landing.final)
                if parent not in self._made_dirs:
                    os.makedirs(parent, exist_ok=True)
                    self._made_dirs.add(parent)
                os.replace(landing.spool.path, landing.final)
                placed.append(landing)
            except (OSError, ValueError) as exc:
                landing.error = exc
        if self._fsync:
            try:
                for parent in {os.path.dirname(landing.final) for landing in placed}:
                    _fsync_dir(parent)
            except OSError as exc:
                for landing in placed:
                    landing.error = exc
        return time.perf_counter() - started

    def _room_for(self, batch: list[_Landing]) -> bool:
        """Whether the output's file system keeps ``_RESERVE_BYTES`` free after ``batch``
        (looked at once every ``_ROOM_CHECK_BYTES`` of images): the records of what is
        paid and not yet written must still fit when the images have filled the disk."""
        size = sum(landing.spool.held for landing in batch)
        self._unchecked_bytes += size
        if self._unchecked_bytes < _ROOM_CHECK_BYTES:
            return True
        assert self._root is not None
        try:
            stat = os.statvfs(self._root)
        except OSError:
            return True  # cannot say: the writes will
        if stat.f_bavail * stat.f_frsize - size < _RESERVE_BYTES:
            return False  # and the next batch looks again
        self._unchecked_bytes = 0
        return True


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
