"""The manifest: an append-only JSONL file that is the truth about a run.

One record per finished item, written only after the item's files are in place; later
lines for the same ``id`` supersede earlier ones. On start the engine reads it back
(:func:`read_state`) to skip what is done; a torn last line from a crash is ignored and
cut off before appending (:class:`ManifestWriter`).

Reading back must stay fast and flat on manifests of millions of lines, so
:func:`read_state` keeps one byte per line-derived id (``000000042``) in a bytearray and
only other ids in a dict, and it reads the four fields it needs from the front of each
line without parsing the whole record (the writer puts them first)::

    >>> writer = ManifestWriter(Path("out/manifest.jsonl"))   # doctest: +SKIP
    >>> writer.append({"id": "000000001", "status": "ok", ...})  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any

import orjson

__all__ = [
    "FRONT_FIELDS",
    "STATUSES",
    "ManifestState",
    "ManifestWriter",
    "day_start_iso",
    "iter_records",
    "latest_records",
    "manifest_paths",
    "now_iso",
    "read_state",
]

STATUSES = ("ok", "failed", "invalid", "generated", "duplicate")
_CODE = {name: code for code, name in enumerate(STATUSES, start=1)}
# Written first in every record so read_state can take them without a full parse.
FRONT_FIELDS = ("id", "status", "finished_at", "billed_images")
_FRONT = re.compile(
    rb'\{"id":"([^"\\]*)","status":"([a-z]+)","finished_at":"([^"]*)","billed_images":(\d+)[,}]'
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
    million lines, not for the engine's resume (that is :func:`read_state`).
    """
    latest: dict[str, dict[str, Any]] = {}
    for path in paths:
        for record in iter_records(path):
            latest[record["id"]] = record
    return latest


def _is_line_id(row_id: str) -> bool:
    return row_id.isdigit() and len(row_id) >= 9 and (len(row_id) == 9 or row_id[0] != "0")


class ManifestState:
    """What earlier runs recorded: each id's latest status, and today's billed images."""

    def __init__(self) -> None:
        self._by_line = bytearray()
        self._by_name: dict[str, int] = {}
        self.generated: dict[str, dict[str, Any]] = {}
        self.billed_today = 0
        self.records = 0
        self.corrupt_lines = 0

    def status(self, row_id: str) -> str | None:
        """The latest status recorded for ``row_id``, or None if it was never recorded."""
        if _is_line_id(row_id):
            index = int(row_id)
            code = self._by_line[index] if index < len(self._by_line) else 0
        else:
            code = self._by_name.get(row_id, 0)
        return STATUSES[code - 1] if code else None

    def set_status(self, row_id: str, status: str) -> None:
        code = _CODE[status]
        if _is_line_id(row_id):
            index = int(row_id)
            if index >= len(self._by_line):
                self._by_line.extend(bytes(max(index + 1 - len(self._by_line), 4096)))
            self._by_line[index] = code
        else:
            self._by_name[row_id] = code

    def counts(self) -> Counter[str]:
        """How many ids are in each latest status."""
        counts: Counter[str] = Counter()
        for name, code in _CODE.items():
            n = self._by_line.count(code) + sum(1 for c in self._by_name.values() if c == code)
            if n:
                counts[name] = n
        return counts

    def _add(self, row_id: str, status: str, finished_at: str, billed: int, day_start: str) -> None:
        self.records += 1
        if status not in _CODE:
            self.corrupt_lines += 1
            return
        self.set_status(row_id, status)
        if billed and finished_at >= day_start:
            self.billed_today += billed


def read_state(paths: Iterable[Path], *, day_start: str) -> ManifestState:
    """Read manifests back for resume.

    ``day_start`` (from :func:`day_start_iso`) bounds "today" for the daily quota:
    records finished since then add their ``billed_images`` to ``billed_today``.
    """
    state = ManifestState()
    for path in paths:
        for raw in _complete_lines(path):
            match = _FRONT.match(raw)
            if match is not None:
                row_id = match.group(1).decode("utf-8", "replace")
                status = match.group(2).decode()
                finished = match.group(3).decode()
                billed = int(match.group(4))
            else:
                try:
                    record = orjson.loads(raw)
                    row_id = str(record["id"])
                    status = str(record["status"])
                    finished = str(record.get("finished_at") or "")
                    billed = int(record.get("billed_images") or 0)
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    state.corrupt_lines += 1
                    continue
            state._add(row_id, status, finished, billed, day_start)
            if status == "generated":
                state.generated[row_id] = orjson.loads(raw)
            else:
                state.generated.pop(row_id, None)
    return state
