"""The manifest: an append-only JSONL file that is the truth about a run.

One record per finished item, written only after the item's files are in place; later
lines for the same ``id`` supersede earlier ones. On start the engine reads it back
(:func:`sfbatch.resume.read_index`) to skip what is done; a torn last line from a crash
is ignored and cut off before appending (:class:`ManifestWriter`).

Reading back for resume is :mod:`sfbatch.resume`: it takes the :data:`FRONT_FIELDS` from
the front of each line with :data:`FRONT_RE` instead of parsing the whole record (the writer
puts them first)::

    >>> writer = ManifestWriter(Path("out/manifest.jsonl"))   # doctest: +SKIP
    >>> record = build_record(row, "ok", registry=registry, item=item)  # doctest: +SKIP
    >>> writer.append(record)                                             # doctest: +SKIP

The record is :class:`ManifestRecord`, a TypedDict: a record *is* the JSON object of its
line (``record["id"]``, ``json.dumps(record)`` and ``==`` with a parsed line all work,
as library users expect), and mypy still checks every key. :func:`build_record` is the
only place one is made; :class:`ManifestWriter` owns the order of the fields on disk
(:data:`FIELD_ORDER`, the TypedDict's order). Adding an optional field is one line in
:class:`ManifestRecord` (``NotRequired[...]``, placed where it should sit in the line)
and its value in :func:`build_record`.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, Literal, NotRequired, TypedDict, get_args

import orjson

from sfbatch.errors import SfbatchError
from sfbatch.identity import item_key
from sfbatch.inputs import InputRecord, input_records
from sfbatch.models import ModelRegistry, effective_params
from sfbatch.sideindex import SideWriter

if TYPE_CHECKING:
    from sfbatch.downloader import StoredImage
    from sfbatch.generator import WorkItem
    from sfbatch.loader import Row

__all__ = [
    "FIELD_ORDER",
    "FRONT_FIELDS",
    "FRONT_RE",
    "REPAIRED_CODE",
    "STATUSES",
    "STATUS_CODES",
    "ImageEntry",
    "ManifestRecord",
    "ManifestWriter",
    "RecordError",
    "Status",
    "Timings",
    "billed_on_day",
    "build_record",
    "day_start_iso",
    "invalid_error",
    "iter_records",
    "latest_records",
    "manifest_paths",
    "now_iso",
    "safe_relpath",
    "status_code",
]

Status = Literal["ok", "failed", "invalid", "generated", "duplicate"]
STATUSES: tuple[Status, ...] = get_args(Status)
#: Each status's byte in the resume index and in ``manifest.idx`` (1, 2, ...) ...
STATUS_CODES: dict[str, int] = {name: code for code, name in enumerate(STATUSES, start=1)}
#: ... and the byte of a ``failed`` record of ``sfbatch verify --repair`` (error code
#: ``damaged``): made again even without ``--retry-failed``.
REPAIRED_CODE = len(STATUSES) + 1


class ImageEntry(TypedDict):
    """One image of a record: ``path`` relative to the output directory."""

    path: str
    sha256: str
    bytes: int


class RecordError(TypedDict):
    """Why an item failed: the API's HTTP status and code, or the error class's name."""

    status: int | None
    code: int | str | None
    message: str


class Timings(TypedDict):
    inference: float | None


class ManifestRecord(TypedDict):
    """One line of ``manifest.jsonl``; ARCHITECTURE.md describes every field.

    Keys are written in this order. The first five are :data:`FRONT_FIELDS`.
    """

    id: str
    status: Status
    finished_at: str
    billed_images: int
    fingerprint: str
    line: int
    file: str
    variation: int
    prompt: str | None
    negative_prompt: str | None
    model: str | None
    image_size: str | None
    batch_size: int | None
    num_inference_steps: int | None
    guidance_scale: float | None
    prompt_enhancement: bool | None
    inputs: NotRequired[list[InputRecord]]  # only for rows with input images
    requested_seed: int | None
    seed: int | None
    timings: Timings | None
    images: list[ImageEntry]
    attempts: int
    latency_s: float
    trace_id: str | None
    key_index: NotRequired[int]  # the key (its position in the key list) of the last request
    error: RecordError | None
    duplicate_of: str | None
    urls: NotRequired[list[str]]  # only in "generated" records
    generated_at: NotRequired[float]  # only in "generated" records


FIELD_ORDER: tuple[str, ...] = tuple(ManifestRecord.__annotations__)
# Written first in every record so resume.read_index can take them without a full parse.
FRONT_FIELDS = FIELD_ORDER[:5]
assert FRONT_FIELDS == ("id", "status", "finished_at", "billed_images", "fingerprint")
FRONT_RE = re.compile(
    rb'\{"id":"([^"\\]*)","status":"([a-z]+)","finished_at":"([^"]*)","billed_images":(\d+),'
    rb'"fingerprint":"([0-9a-f]{16})"[,}]'
)
_FSYNC_EVERY_S = 1.0


# (epoch second, its "2026-11-24T13:00:00" text): every record of the same second shares it
_iso_second: tuple[int, str] = (-1, "")


def now_iso() -> str:
    """Current UTC time as ``2026-11-24T13:00:00.123Z`` (sorts as it compares).

    Called for every record: the formatted second is cached, only the milliseconds change.
    """
    global _iso_second
    second, ms = divmod(int(time.time() * 1000), 1000)
    if _iso_second[0] != second:
        _iso_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{_iso_second[1]}.{ms:03d}Z"


def status_code(record: Mapping[str, Any]) -> int:
    """The record's status byte (:data:`STATUS_CODES`, or :data:`REPAIRED_CODE`); 0 if none."""
    status = record.get("status")
    code = STATUS_CODES.get(status, 0) if isinstance(status, str) else 0
    if status == "failed":
        error = record.get("error")
        if isinstance(error, dict) and error.get("code") == "damaged":
            return REPAIRED_CODE
    return code


def day_start_iso(utc_offset_h: float, now: float | None = None) -> str:
    """Start of the account's current day, as a UTC timestamp in :func:`now_iso` format."""
    tz = timezone(timedelta(hours=utc_offset_h))
    local = datetime.fromtimestamp(time.time() if now is None else now, tz)
    start = local.replace(hour=0, minute=0, second=0, microsecond=0).astimezone(UTC)
    return start.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def build_record(
    row: Row,
    status: Status,
    *,
    registry: ModelRegistry,
    item: WorkItem | None = None,
    images: Sequence[StoredImage] = (),
    error: SfbatchError | RecordError | None = None,
    generated_at: float | None = None,
) -> ManifestRecord:
    """The manifest record of ``row``, finished now with ``status``.

    ``item`` carries what the generation did (seed, timings, attempts, billing); the
    request fields are what the server used (the model's defaults filled in).
    ``generated_at`` (epoch s) makes a ``generated`` record, keeping the item's URLs.
    """
    request = row.request or {}
    params = effective_params(request, registry) if row.request else {}
    generation = item.generation if item else None
    trace_id = generation.trace_id if generation else getattr(error, "trace_id", None)
    record: ManifestRecord = {
        "id": row.id,
        "status": status,
        "finished_at": now_iso(),
        "billed_images": item.billed_images if item else 0,
        "fingerprint": row.fingerprint,
        "line": row.line,
        "file": row.file,
        "variation": row.variation,
        "prompt": request.get("prompt", row.prompt),
        "negative_prompt": request.get("negative_prompt"),
        "model": params.get("model"),
        "image_size": params.get("image_size"),
        "batch_size": params.get("batch_size"),
        "num_inference_steps": params.get("num_inference_steps"),
        "guidance_scale": params.get("guidance_scale"),
        "prompt_enhancement": params.get("prompt_enhancement"),
        "requested_seed": request.get("seed"),
        "seed": generation.seed if generation else None,
        "timings": {"inference": generation.inference_s} if generation else None,
        "images": [
            {"path": image.path, "sha256": image.sha256, "bytes": image.bytes} for image in images
        ],
        "attempts": item.attempts if item else 0,
        "latency_s": round(time.monotonic() - item.started, 3) if item else 0.0,
        "trace_id": trace_id,
        "error": _record_error(error.to_record()) if isinstance(error, SfbatchError) else error,
        "duplicate_of": row.duplicate_of,
    }
    if row.inputs:
        record["inputs"] = input_records(row.inputs)
    if item is not None and item.key_index is not None:
        record["key_index"] = item.key_index  # the writer puts it after trace_id
    if generated_at is not None and generation is not None:
        record["urls"] = list(generation.urls)
        record["generated_at"] = generated_at
    return record


def invalid_error(message: str) -> RecordError:
    """The ``error`` of an ``invalid`` record (``message`` starts with ``file:line:``)."""
    return {"status": None, "code": "invalid", "message": message}


def _record_error(raw: Mapping[str, Any]) -> RecordError:
    return {"status": raw.get("status"), "code": raw.get("code"), "message": str(raw["message"])}


def safe_relpath(path: object) -> PurePosixPath | None:
    """A record's image ``path`` if it is relative and stays inside the output directory."""
    if not isinstance(path, str) or not path or "\\" in path or "\x00" in path:
        return None
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts:
        return None
    return pure


def billed_on_day(billed: object, finished_at: object, day_start: str) -> int:
    """Images a record's line was billed for on the day starting at ``day_start``, else 0.

    Every line counts, not only an id's latest: each line is one run's charge.
    """
    if isinstance(billed, int) and billed > 0 and isinstance(finished_at, str):
        return billed if finished_at >= day_start else 0
    return 0


def manifest_paths(out_dir: Path) -> list[Path]:
    """``out_dir``'s ``manifest.jsonl`` and the shards' ``manifest-I-of-N.jsonl``."""
    return sorted(p for p in out_dir.glob("manifest*.jsonl") if p.is_file())


class ManifestWriter:
    """Appends records to a manifest, one flushed line each.

    Opening cuts off a torn last line left by a crash, so the next record starts on a
    line of its own. Lines are flushed to the OS at once (they survive ``kill -9``) and
    fsynced at most once a second and on :meth:`close` (they survive power loss then).
    At each fsync tick and on close, the records since the last are described in the
    side file ``manifest.idx`` (:class:`~sfbatch.sideindex.SideWriter`), after their lines.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records_written = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        _cut_torn_tail(path)
        self._file: IO[bytes] = open(path, "ab")  # noqa: SIM115  (closed in close())
        self._side = SideWriter(path, self._file.seek(0, os.SEEK_END))
        self._last_fsync = time.monotonic()

    def append(self, record: ManifestRecord) -> None:
        """Write one record, its fields in :data:`FIELD_ORDER` (keys it lacks are left out)."""
        ordered = {key: record[key] for key in FIELD_ORDER if key in record}  # type: ignore[literal-required]
        if len(ordered) < len(record):  # keys the type does not know keep their place after
            ordered.update(record)
        line = orjson.dumps(ordered) + b"\n"
        self._file.write(line)
        self._file.flush()
        self.records_written += 1
        if self._side.enabled:
            self._describe(ordered, len(line))
        now = time.monotonic()
        if now - self._last_fsync >= _FSYNC_EVERY_S:
            os.fsync(self._file.fileno())
            self._last_fsync = now
            self._side.flush()

    def _describe(self, record: dict[str, Any], line_bytes: int) -> None:
        """Tell the side file about a record just written."""
        row_id, fp, billed = (
            record.get("id"),
            record.get("fingerprint"),
            record.get("billed_images"),
        )
        code = status_code(record)
        if not isinstance(row_id, str) or not isinstance(fp, str) or not code:
            # Not a record resume keys by (id, fingerprint): the side file stops before it.
            self._side.flush()
            self._side.close()
            return
        is_billed = isinstance(billed, int) and billed > 0
        self._side.add(item_key(row_id, fp), code, line_bytes, record, is_billed)

    def close(self) -> None:
        """Flush, fsync and close; on a full disk the files are closed all the same (a
        buffer left to the collector would land its bytes after a later run's lines)."""
        if self._file.closed:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                self._file.close()  # closed even when this last flush fails too
            self._side.close()
            raise
        self._file.close()
        self._side.flush()
        self._side.close()

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


def iter_records(path: Path, damaged: list[str] | None = None) -> Iterator[ManifestRecord]:
    """Every complete record of one manifest, in file order; torn or corrupt lines are
    skipped (a torn last line may be a running run's), corrupt ones named in ``damaged``
    as ``NAME:LINE`` when it is given."""
    for number, raw in enumerate(_complete_lines(path), start=1):
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            record = None
        # Typed by trust: a hand-edited line may lack fields, so readers use .get().
        if isinstance(record, dict) and isinstance(record.get("id"), str):
            yield record  # type: ignore[misc]
        elif damaged is not None:
            damaged.append(f"{path.name}:{number}")


def latest_records(paths: Iterable[Path]) -> dict[str, ManifestRecord]:
    """The final record of every id across ``paths`` (later lines win).

    Holds every record in memory: meant for reports on manifests of up to a few
    million lines, not for the engine's resume (that is :func:`sfbatch.resume.read_index`).
    """
    latest: dict[str, ManifestRecord] = {}
    for path in paths:
        for record in iter_records(path):
            latest[record["id"]] = record
    return latest
