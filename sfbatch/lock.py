"""The output directory before a run: writable (:func:`check_out_dir`), and one run's alone.

``run`` calls both before its first request; ``status``, ``verify`` and ``gallery`` call
neither, so they read a directory in use without disturbing it::

    check_out_dir(out)             # ConfigError with the reason: exit 2, nothing sent
    with RunLock(out):             # OutDirInUseError naming the holder: exit 2
        ...                        # the run

The lock is an exclusive ``fcntl.flock`` on ``DIR/.sfbatch.lock``. The kernel releases it
when its holder's file is closed, which includes the holder dying (``kill -9``, a crash),
so there is never a stale lock to clean up. The file holds the holder's pid, host and
start time, read only to name the holder to a second run; it is never trusted on its own.
flock works across processes of one host (and over NFS as emulated POSIX locks).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

import orjson

from sfbatch.errors import ConfigError, OutDirInUseError

__all__ = ["LOCK_NAME", "MIN_FREE_BYTES", "LockHolder", "RunLock", "check_out_dir", "lock_name"]

LOCK_NAME = ".sfbatch.lock"


def lock_name(shard: tuple[int, int] | None) -> str:
    """The lock file of a run: one per DIR, or one per shard (``.sfbatch-0-of-4.lock``),
    since the shards of a job may run in parallel in one DIR, each with its own manifest.

    >>> lock_name(None), lock_name((0, 4))
    ('.sfbatch.lock', '.sfbatch-0-of-4.lock')
    """
    if shard is None:
        return LOCK_NAME
    index, count = shard
    return f".sfbatch-{index}-of-{count}.lock"


# A few dozen images of headroom: less than this and the run would stop at once (exit 5).
MIN_FREE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class LockHolder:
    """Who holds an output directory: ``started_at`` is ISO-8601 UTC."""

    pid: int
    host: str
    started_at: str

    @classmethod
    def this_process(cls) -> LockHolder:
        started = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        return cls(pid=os.getpid(), host=socket.gethostname(), started_at=started)

    @classmethod
    def parse(cls, data: bytes) -> LockHolder | None:
        try:
            doc = orjson.loads(data)
            return cls(
                pid=int(doc["pid"]), host=str(doc["host"]), started_at=str(doc["started_at"])
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    def to_json(self) -> bytes:
        return orjson.dumps({"pid": self.pid, "host": self.host, "started_at": self.started_at})

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started_at}"


class RunLock:
    """The exclusive lock of one run on ``out_dir`` (which must exist).

    >>> with RunLock(out_dir) as lock:  # doctest: +SKIP
    ...     lock.holder.pid == os.getpid()
    True
    """

    def __init__(self, out_dir: Path, *, name: str = LOCK_NAME) -> None:
        self.path = Path(out_dir) / name
        self.holder: LockHolder | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> LockHolder:
        """Take the lock or raise :class:`OutDirInUseError` naming the run that has it."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        # No O_TRUNC: the file names the current holder until we have the lock.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = LockHolder.parse(os.pread(fd, 4096, 0))
            os.close(fd)
            who = holder.describe() if holder else "it has not written its pid yet"
            raise OutDirInUseError(
                f"{self.path.parent} is in use by another sfbatch run ({who}): one run per "
                "output directory; wait for it to finish, or stop it and run again to resume"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        holder = LockHolder.this_process()
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.to_json() + b"\n", 0)
        self._fd, self.holder = fd, holder
        return holder

    def release(self) -> None:
        """Give the lock back (closing the file is what releases it)."""
        if self._fd is None:
            return
        fd, self._fd, self.holder = self._fd, None, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # a full or read-only disk: the lock is released all the same
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def check_out_dir(path: Path, *, min_free_bytes: int = MIN_FREE_BYTES) -> None:
    """Create ``path`` if needed and prove it writable, with some free space.

    Raises :class:`ConfigError` with the reason (a file in the way, a read-only file
    system, no permission, no free space), so the run exits 2 before any request.
    """
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out {path} is a file, not a directory")
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"--out {path} cannot be created: {existing} is a file")
    except OSError as exc:  # a parent we may not even look into
        raise ConfigError(f"--out {path} cannot be created: {_reason(exc)}") from exc
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {path} cannot be created: {_reason(exc)}") from exc
    try:
        fd, probe = tempfile.mkstemp(prefix=".sfbatch-write-check-", dir=path)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            Path(probe).unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {path} is not writable: {_reason(exc)}") from exc
    for name, what in (("images", "its images"), (".tmp", "its downloads in progress")):
        if (path / name).exists() and not (path / name).is_dir():
            raise ConfigError(
                f"--out {path}: {path / name} is a file, where sfbatch keeps {what}: move it away"
            )
    free = shutil.disk_usage(path).free
    if free < min_free_bytes:
        raise ConfigError(
            f"--out {path} has {free / 2**20:.0f} MiB free, under the "
            f"{min_free_bytes / 2**20:.0f} MiB a run needs to start: free some space first"
        )


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return "it is on a read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"no permission ({exc.strerror})"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    if exc.errno == errno.ENOTDIR:
        return "a part of the path is a file"
    return exc.strerror or str(exc)
