"""The manifest: an append-only JSONL file that is the truth about a run.

One record per finished item, written only after the item's files are in place; later
lines for the same ``id`` supersede earlier ones. On start the engine reads it back
(:func:`sfbatch.resume.read_index`) to skip what is done; a torn last line from a crash
is ignored and cut off before appending (:class:`ManifestWriter`).

Reading back for resume is :mod:`sfbatch.resume`: it takes the :data:`FRONT_FIELDS` from
the front of each line with :data:`FRONT_RE` instead of parsing the whole record (the writer
puts them first)::

    >>> writer = ManifestWriter(Path("out/manifest.jsonl"))   # doctest: +SKIP
    >>> writer.append({"id": "3f9a2c71b04e", "status": "ok", ...})  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any

import orjson

__all__ = [
    "FRONT_FIELDS",
    "FRONT_RE",
    "STATUSES",
    "ManifestWriter",
    "day_start_iso",
    "iter_records",
    "latest_records",
    "manifest_paths",
    "now_iso",
]

STATUSES = ("ok", "failed", "invalid", "generated", "duplicate")
# Written first in every record, in this order, so resume can take them without a full parse.
FRONT_FIELDS = ("id", "status", "finished_at", "billed_images", "fingerprint")
FRONT_RE = re.compile(
    rb'\{"id":"([^"\\]*)","status":"([a-z]+)","finished_at":"([^"]*)","billed_images":(\d+),'
    rb'"fingerprint":"([0-9a-f]{16})"[,}]'
)
_FSYNC_EVERY_S = 1.0


def now_iso() -> str:
    """Current UTC time as ``2026-11-24T13:00:00.123Z`` (sorts as it compares)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def day_start_iso(utc_offset_h: float, now: float | None = None) -> str:
    """Start of the account's current day, as a UTC timestamp in :func:`now_iso` format."""
    tz = timezone(timedelta(hours=utc_offset_h))
    local = datetime.fromtimestamp(time.time() if now is None else now, tz)
    start = local.replace(hour=0, minute=0, second=0, microsecond=0).astimezone(UTC)
    return start.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def manifest_paths(out_dir: Path) -> list[Path]:
    """``out_dir``'s ``manifest.jsonl`` and the shards' ``manifest-I-of-N.jsonl``."""
    return sorted(p for p in out_dir.glob("manifest*.jsonl") if p.is_file())


class ManifestWriter:
    """Appends records to a manifest, one flushed line each.

    Opening cuts off a torn last line left by a crash, so the next record starts on a
    line of its own. Lines are flushed to the OS at once (they survive ``kill -9``) and
    fsynced at most once a second and on :meth:`close` (they survive power loss then).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records_written = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        _cut_torn_tail(path)
        self._file: IO[bytes] = open(path, "ab")  # noqa: SIM115  (closed in close())
        self._last_fsync = time.monotonic()

    def append(self, record: dict[str, Any]) -> None:
        """Write one record; its first keys must be :data:`FRONT_FIELDS`, in that order."""
        self._file.write(orjson.dumps(record) + b"\n")
        self._file.flush()
        self.records_written += 1
        now = time.monotonic()
        if now - self._last_fsync >= _FSYNC_EVERY_S:
            os.fsync(self._file.fileno())
            self._last_fsync = now

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cut_torn_tail(path: Path) -> None:
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            # Walk back to the last newline; everything after it is a half-written record.
            pos = size
            while pos > 0:
                step = min(65536, pos)
                f.seek(pos - step)
                chunk = f.read(step)
                nl = chunk.rfind(b"\n")
                if nl >= 0:
                    f.truncate(pos - step + nl + 1)
                    return
                pos -= step
            f.truncate(0)
    except FileNotFoundError:
        return


def _complete_lines(path: Path) -> Iterator[bytes]:
    """The newline-terminated lines of ``path`` (none if it is missing); a torn last line is not."""
    try:
        f = open(path, "rb")  # noqa: SIM115  (closed by the with below)
    except FileNotFoundError:
        return
    with f:
        for raw in f:
            if not raw.endswith(b"\n"):
                return
            yield raw


def iter_records(path: Path) -> Iterator[dict[str, Any]]:
    """Every complete record of one manifest, in file order; torn or corrupt lines are skipped."""
    for raw in _complete_lines(path):
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("id"), str):
            yield record


def latest_records(paths: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """The final record of every id across ``paths`` (later lines win).

    Holds every record in memory: meant for reports on manifests of up to a few
    million lines, not for the engine's resume (that is :func:`sfbatch.resume.read_index`).
    """
    latest: dict[str, dict[str, Any]] = {}
    for path in paths:
        for record in iter_records(path):
            latest[record["id"]] = record
    return latest
