"""``sfbatch status`` and ``sfbatch verify``: what an output directory holds, from its manifests.

Both read every ``DIR/manifest*.jsonl`` (a sharded run writes one per shard) and take the
latest record of each id across all of them, so they work on a finished run, on one that
was interrupted, and while one is still writing (a torn last line is skipped).

``status`` counts items by status (failures grouped by reason, and counted by the same
:class:`~sfbatch.reasons.Reason` key as ``summary.json``'s ``errors``), sums images and bytes,
reports throughput, latency percentiles, billed images, and with the input file how many
rows are pending and how many nights the daily quota needs for them::

    >>> report = status_report(Path("out"), input_path=Path("in.txt"), ipd=400)  # doctest: +SKIP
    >>> report["counts"]["ok"], report["quota"]["nights_left"]                   # doctest: +SKIP
    (10000, 13)

``verify`` checks that every image of the latest ``ok`` records is on disk with the
recorded size and sha256, and lists orphan files under ``DIR/images/`` and leftover
``DIR/.tmp/**/*.part`` files. Missing or mismatched images make it exit 1; orphans and
leftovers alone are warnings (exit 0): they waste space but lose nothing, and a resumed
run clears ``.tmp/`` itself. Images stored as objects (``s3://`` paths, a run with
``--images-to``) are checked with a HEAD (exists, size); ``deep=True`` (``--deep``)
downloads them and checks the sha256 too; objects under a run's ``.../images/`` that
no record names (a crash between an upload and its record) are listed as orphans.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hashlib
import itertools
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import orjson

from sfbatch.commands import Command, flag
from sfbatch.config import RequestDefaults
from sfbatch.errors import ConfigError
from sfbatch.figures import duration, human_bytes, percentile, percentiles, plural
from sfbatch.manifest import (
    STATUSES,
    ImageEntry,
    ManifestRecord,
    billed_on_day,
    day_start_iso,
    iter_records,
    manifest_paths,
    safe_relpath,
)
from sfbatch.reasons import Reason, message_class
from sfbatch.storage import ImageStore, StorageError, is_s3_url, open_store, parse_s3_url

__all__ = [
    "COMMANDS",
    "DONE_STATUSES",
    "FileProblem",
    "NoManifestError",
    "VerifyReport",
    "human_bytes",
    "message_class",
    "percentile",
    "repair",
    "required_manifests",
    "status_report",
    "verify",
]

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2

#: Statuses that need no more work: an input row in none of them is pending.
#: ``duplicate`` is done (with dedupe on it is never requested); ``generated`` is not
#: (its images still have to be downloaded, or made again once the URLs expire).
DONE_STATUSES = frozenset({"ok", "failed", "invalid", "duplicate"})
_REASON_STATUSES = ("failed", "invalid")
# Gaps between finished records longer than this are idle time (e.g. between nightly runs).
_IDLE_GAP_S = 600.0
# Records spanning less than this give no hourly throughput (it would be noise).
_MIN_RATE_SPAN_S = 60.0
_HASH_CHUNK = 1 << 20
_HASH_BATCH = 1024
_LIST_LIMIT = 50
_DAMAGED_SHOWN = 5  # manifest lines that are not records, named in the report
_DEFAULT_TZ_OFFSET_H = 8.0


class NoManifestError(FileNotFoundError):
    """The directory holds no ``manifest*.jsonl``."""


# -- reading -------------------------------------------------------------------------


@dataclass
class _Scan:
    """One pass over every manifest line: the latest record per id, plus per-line sums."""

    paths: list[Path]
    latest: dict[str, ManifestRecord] = field(default_factory=dict)
    lines: int = 0
    damaged: list[str] = field(default_factory=list)  # NAME:LINE of lines not records
    billed_total: int = 0
    billed_today: int = 0


def required_manifests(out_dir: Path) -> list[Path]:
    """``out_dir``'s manifests; :class:`NoManifestError` saying why there are none."""
    if not out_dir.exists():
        raise NoManifestError(f"{out_dir}: no manifest: no such directory")
    if not out_dir.is_dir():
        raise NoManifestError(f"{out_dir}: no manifest: not a directory (give a run's --out)")
    paths = manifest_paths(out_dir)
    if not paths:
        raise NoManifestError(f"{out_dir}: no manifest (manifest.jsonl or manifest-I-of-N.jsonl)")
    return paths


def _scan(out_dir: Path, day_start: str = "") -> _Scan:
    scan = _Scan(paths=required_manifests(out_dir))
    latest = scan.latest
    for path in scan.paths:
        for record in iter_records(path, scan.damaged):
            scan.lines += 1
            latest[record["id"]] = record
            # billed_images counts what one run was charged for this record, so a
            # superseded line's charge still happened: sum every line, not the latest.
            billed = record.get("billed_images")
            if isinstance(billed, int) and billed > 0:
                scan.billed_total += billed
                scan.billed_today += billed_on_day(billed, record.get("finished_at"), day_start)
    return scan


def _images(record: ManifestRecord) -> list[ImageEntry]:
    images = record.get("images")
    if not isinstance(images, list):
        return []
    return [image for image in images if isinstance(image, dict)]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


# -- status --------------------------------------------------------------------------


def _parse_time(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _throughput(ok: int, finished: list[str]) -> dict[str, Any]:
    times = sorted(t for t in map(_parse_time, finished) if t is not None)
    if len(times) < 2:
        return {"ok_per_hour": None, "span_h": 0.0, "ok_per_active_hour": None, "active_h": 0.0}
    span_s = times[-1] - times[0]
    gaps = (b - a for a, b in itertools.pairwise(times))
    active_s = sum(gap for gap in gaps if gap <= _IDLE_GAP_S)
    return {
        "ok_per_hour": round(ok * 3600 / span_s, 1) if span_s > 0 else None,
        "span_h": round(span_s / 3600, 3),
        "ok_per_active_hour": round(ok * 3600 / active_s, 1) if active_s > 0 else None,
        "active_h": round(active_s / 3600, 3),
    }


def _run_summaries(out_dir: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``summary.json`` (then each shard's ``summary-I-of-N.json``) that parse, by name."""
    for path in [out_dir / "summary.json", *sorted(out_dir.glob("summary-*.json"))]:
        try:
            summary = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        if isinstance(summary, dict):
            yield path.name, summary


def _summary_ipd(out_dir: Path) -> tuple[int | None, str | None]:
    """``quota.ipd`` from ``summary.json`` (or a shard's ``summary-I-of-N.json``)."""
    for name, summary in _run_summaries(out_dir):
        quota = summary.get("quota")
        ipd = quota.get("ipd") if isinstance(quota, dict) else None
        if isinstance(ipd, int) and not isinstance(ipd, bool) and ipd > 0:
            return ipd, name
    return None, None


@dataclass(frozen=True)
class _Reading:
    """How the last run read its rows (``summary.json``'s ``reading``): rows read alike
    get the same ids and fingerprints, so they match their records."""

    defaults: RequestDefaults = field(default_factory=RequestDefaults)
    base_seed: int = 0
    variations: int | None = None  # None: as many as the records show


def _summary_reading(out_dir: Path) -> _Reading:
    for _, summary in _run_summaries(out_dir):
        reading = summary.get("reading")
        if not isinstance(reading, dict):
            continue
        try:
            defaults = RequestDefaults(**reading.get("defaults", {}))
            base_seed = reading.get("base_seed", 0)
            variations = reading.get("variations")
            if not isinstance(base_seed, int) or not isinstance(variations, int | None):
                raise ConfigError("not a run's reading")
            return _Reading(defaults, base_seed, variations)
        except (ConfigError, TypeError):
            continue  # written by another version, or edited: read with the defaults
    return _Reading()


def _variations(latest: dict[str, ManifestRecord]) -> int:
    most = 0
    for record in latest.values():
        variation = record.get("variation")
        if isinstance(variation, int) and variation > most:
            most = variation
    return most + 1


def _pending(
    input_path: Path, latest: dict[str, ManifestRecord], reading: _Reading
) -> dict[str, Any]:
    """Input rows not yet done, the images they still need, and the history.

    Every row is read and matched to the latest record of its id *and* fingerprint (an
    edited row is pending: its record is of what the row asked for before). Records no
    row matches are *history*: rows edited away or removed from the input. The rows are
    read as the last run read them (its request defaults, base seed and variations, from
    its summary), else with the default settings.
    """
    from sfbatch.loader import PromptSource
    from sfbatch.resume import DAMAGED_CODE

    # A row without a batch size of its own takes the run's default, which only the
    # records know: estimate it by the mean batch size recorded.
    sizes = [b for r in latest.values() if isinstance(b := r.get("batch_size"), int) and b > 0]
    per_row = sum(sizes) / len(sizes) if sizes else 1.0
    source = PromptSource(
        input_path,
        defaults=reading.defaults,
        base_seed=reading.base_seed,
        variations=reading.variations or _variations(latest),
    )
    rows = pending = images = estimated = paid = 0
    matched: set[str] = set()
    for row in source:
        rows += 1
        record = latest.get(row.id)
        if record is not None and record.get("fingerprint") not in (None, row.fingerprint):
            record = None  # a record of what this id asked for before the edit
        if record is not None:
            matched.add(row.id)
        error = record.get("error") if record is not None else None
        repaired = isinstance(error, dict) and error.get("code") == DAMAGED_CODE
        if record is None or record.get("status") not in DONE_STATUSES or repaired:
            pending += 1
            if record is not None and record.get("status") == "generated" and not repaired:
                paid += 1  # paid for: only to download (still counted in pending_images)
            if row.request is not None:
                batch = row.request.get("batch_size")
                if isinstance(batch, int) and batch > 1:
                    images += batch
                else:
                    estimated += 1
    images += math.ceil(estimated * per_row)
    found = _pending_dict(rows, pending, images, "scan")
    found["pending_paid"] = paid
    found["history_ids"] = {row_id for row_id in latest if row_id not in matched}
    found["history"] = len(found["history_ids"])
    return found


def _pending_dict(rows: int, pending: int, images: int, method: str) -> dict[str, Any]:
    return {"input_rows": rows, "pending": pending, "pending_images": images, "method": method}


def status_report(
    out_dir: Path,
    *,
    input_path: Path | None = None,
    ipd: int | None = None,
    tz_offset_h: float = _DEFAULT_TZ_OFFSET_H,
    now: float | None = None,
) -> dict[str, Any]:
    """Everything ``sfbatch status`` shows, as one JSON-ready dict.

    ``input_path`` enables ``pending`` and the nights-left estimate; ``ipd`` overrides the
    ``quota.ipd`` recorded in ``summary.json``; ``tz_offset_h`` is the UTC offset of the
    account's day (for "billed today"). Raises :class:`NoManifestError` when ``out_dir``
    has no manifest, and :class:`~sfbatch.errors.InputFileError` for an unreadable input.
    """
    day_start = day_start_iso(tz_offset_h, now)
    scan = _scan(out_dir, day_start)
    counts: Counter[str] = Counter({status: 0 for status in STATUSES})
    reasons: dict[str, Counter[str]] = {status: Counter() for status in _REASON_STATUSES}
    examples: dict[str, str] = {}
    errors: Counter[str] = Counter()
    images = size = 0
    latency: list[float] = []
    inference: list[float] = []
    finished: list[str] = []
    pending = None
    history: set[str] = set()
    if input_path is not None:  # the counts are the input's rows; history apart
        pending = _pending(input_path, scan.latest, _summary_reading(out_dir))
        history = pending.pop("history_ids")
    for row_id, record in scan.latest.items():
        if row_id in history:
            continue
        status = str(record.get("status"))
        counts[status] += 1
        if isinstance(stamp := record.get("finished_at"), str):
            finished.append(stamp)
        if status == "ok":
            for image in _images(record):
                images += 1
                size += image["bytes"] if isinstance(image.get("bytes"), int) else 0
            if (value := _number(record.get("latency_s"))) is not None:
                latency.append(value)
            timings = record.get("timings")
            if (
                isinstance(timings, dict)
                and (value := _number(timings.get("inference"))) is not None
            ):
                inference.append(value)
        elif status in reasons:
            error = record.get("error")
            message = str(error.get("message") or "") if isinstance(error, dict) else ""
            reason = Reason.of(status, error)
            errors[reason.key] += 1
            group = reason.group(message)
            reasons[status][group] += 1
            examples.setdefault(group, message)

    ipd_source: str | None = "--ipd" if ipd is not None else None
    if ipd is None:
        ipd, ipd_source = _summary_ipd(out_dir)
    nights_left = None
    if pending is not None and ipd:
        nights_left = math.ceil(pending["pending_images"] / ipd)
    return {
        "out_dir": str(out_dir),
        "manifests": [path.name for path in scan.paths],
        "lines": scan.lines,
        "damaged_lines": len(scan.damaged),
        "damaged_examples": scan.damaged[:_DAMAGED_SHOWN],
        "ids": len(scan.latest),
        "counts": dict(counts),
        "reasons": {
            status: [
                {"reason": reason, "count": n, "example": examples.get(reason, "")}
                for reason, n in found.most_common()
            ]
            for status, found in reasons.items()
        },
        "errors": dict(errors.most_common()),
        "input_rows": pending["input_rows"] if pending else None,
        "pending": pending["pending"] if pending else None,
        "history": pending["history"] if pending else None,
        "pending_images": pending["pending_images"] if pending else None,
        # of the pending rows, those paid for and not downloaded yet
        "pending_paid": pending["pending_paid"] if pending else None,
        "pending_method": pending["method"] if pending else None,
        "images": images,
        "bytes": size,
        "first_finished_at": min(finished) if finished else None,
        "last_finished_at": max(finished) if finished else None,
        "throughput": _throughput(counts["ok"], finished),
        "latency_s": _percentiles(latency),
        "inference_s": _percentiles(inference),
        "billed": {
            "today": scan.billed_today,
            "total": scan.billed_total,
            "day_start": day_start,
            "tz_offset_h": tz_offset_h,
        },
        "quota": {
            "ipd": ipd,
            "ipd_from": ipd_source,
            "left_today": max(0, ipd - scan.billed_today) if ipd else None,
            "nights_left": nights_left,
        },
    }


def _percentiles(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), **percentiles(values, 0.5, 0.95)}


# -- verify --------------------------------------------------------------------------


@dataclass(frozen=True)
class FileProblem:
    """One image of an ``ok`` record that is not as recorded."""

    id: str
    path: str
    problem: str  # "missing", "size", "sha256", "unreadable" or "bad path"
    detail: str = ""


@dataclass
class VerifyReport:
    """What :func:`verify` found; ``ok`` is False when an image is missing or mismatched."""

    out_dir: Path
    manifests: list[str] = field(default_factory=list)
    records: int = 0
    files: int = 0
    bytes: int = 0
    missing: list[FileProblem] = field(default_factory=list)
    mismatched: list[FileProblem] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    leftover_parts: list[str] = field(default_factory=list)
    #: manifest lines that are not records (``NAME:LINE``): the next run remakes their items
    damaged_lines: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    #: of ``bytes``, those of objects in a store checked by HEAD and size only (no --deep)
    sized_only_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.mismatched

    @property
    def exit_code(self) -> int:
        """0 when every image checks out (orphans and leftovers only warn), else 1."""
        return EXIT_OK if self.ok else EXIT_PROBLEMS

    def as_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "ok": self.ok,
            "manifests": self.manifests,
            "records": self.records,
            "files": self.files,
            "bytes": self.bytes,
            "sized_only_bytes": self.sized_only_bytes,
            "missing": [vars(p) for p in self.missing],
            "mismatched": [vars(p) for p in self.mismatched],
            "orphans": self.orphans,
            "leftover_parts": self.leftover_parts,
            "damaged_lines": self.damaged_lines,
            "elapsed_s": round(self.elapsed_s, 3),
        }


def _size_mismatch(
    row_id: str, where: str, image: ImageEntry, size: int, place: str
) -> FileProblem | None:
    """A "size" problem when ``size`` (the image as found ``place``) is not the recorded one."""
    expected = image.get("bytes")
    if isinstance(expected, int) and size != expected:
        return FileProblem(row_id, where, "size", f"{size} bytes {place}, {expected} recorded")
    return None


def _sha256_mismatch(
    row_id: str, where: str, image: ImageEntry, digest: str, place: str
) -> FileProblem | None:
    """A "sha256" problem when ``digest`` (the image as found ``place``) is not the recorded one."""
    expected = image.get("sha256")
    if digest != expected:
        return FileProblem(row_id, where, "sha256", f"{digest} {place}, {expected} recorded")
    return None


def _check(out_dir: Path, row_id: str, image: ImageEntry) -> FileProblem | int:
    """The file's problem, or its size when it matches the record."""
    path = image.get("path")
    safe = safe_relpath(path)
    if safe is None:
        return FileProblem(row_id, str(path), "bad path", "not a relative path inside DIR")
    rel = safe.as_posix()
    full = out_dir / rel
    try:
        with open(full, "rb") as f:
            actual_size = os.fstat(f.fileno()).st_size
            if problem := _size_mismatch(row_id, rel, image, actual_size, "on disk"):
                return problem
            digest = hashlib.sha256()
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    except FileNotFoundError:
        return FileProblem(row_id, rel, "missing")
    except OSError as exc:
        return FileProblem(row_id, rel, "unreadable", exc.strerror or str(exc))
    return _sha256_mismatch(row_id, rel, image, digest.hexdigest(), "on disk") or actual_size


async def _check_object(
    store: ImageStore, key: str, row_id: str, image: ImageEntry, *, deep: bool
) -> FileProblem | int:
    """An object's problem, or its size when it matches the record."""
    where = store.url_for(key)
    try:
        size = await store.head(key)
        if size is None:
            return FileProblem(row_id, where, "missing")
        if problem := _size_mismatch(row_id, where, image, size, "stored"):
            return problem
        if not deep:
            return size
        digest = hashlib.sha256()
        async for chunk in store.open(key):
            digest.update(chunk)
    except StorageError as exc:
        return FileProblem(row_id, where, "unreadable", str(exc))
    return _sha256_mismatch(row_id, where, image, digest.hexdigest(), "stored") or size


async def _check_objects(
    objects: list[tuple[str, ImageEntry]], *, deep: bool
) -> list[FileProblem | int]:
    """:func:`_check_object` for every ``s3://`` image, one store per bucket; the stores
    bound the requests in flight, the batches the tasks."""
    results: list[FileProblem | int] = []
    stores: dict[str, ImageStore] = {}
    try:
        for batch in _batches(objects):
            checks = []
            for row_id, image in batch:
                bucket, key = parse_s3_url(str(image.get("path")))
                if bucket not in stores:
                    stores[bucket] = await open_store(f"s3://{bucket}").__aenter__()
                checks.append(_check_object(stores[bucket], key, row_id, image, deep=deep))
            results += await asyncio.gather(*checks)
    finally:
        for store in stores.values():
            await store.aclose()
    return results


async def _orphan_objects(referenced: set[str]) -> list[str]:
    """Objects under a run's ``s3://.../images/`` that no latest record refers to (what a
    crash left between an upload and its record)."""
    roots = {url.rpartition("/images/")[0] for url in referenced if "/images/" in url}
    orphans: list[str] = []
    for root in sorted(r for r in roots if is_s3_url(r)):
        async with open_store(root) as store:
            orphans += [
                url
                async for key in store.keys("images/")
                if (url := store.url_for(key)) not in referenced
            ]
    return orphans


def _batches(
    items: Iterable[tuple[str, ImageEntry]],
) -> Iterator[list[tuple[str, ImageEntry]]]:
    batch: list[tuple[str, ImageEntry]] = []
    for item in items:
        batch.append(item)
        if len(batch) >= _HASH_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _walk_files(root: Path) -> Iterator[Path]:
    for dirpath, _dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in filenames:
            yield base / name


def verify(out_dir: Path, *, workers: int | None = None, deep: bool = False) -> VerifyReport:
    """Check every image of the latest ``ok`` records against its size and sha256.

    Files are hashed in 1 MiB chunks on a thread pool (hashlib releases the GIL on
    large buffers, so hashing runs in parallel with the disk reads). Also lists files
    under ``images/`` no latest record refers to, and ``.tmp/*.part`` leftovers.
    ``s3://`` images: HEAD and size, and with ``deep`` their sha256 (downloaded).
    Raises :class:`NoManifestError` when ``out_dir`` has no manifest,
    :class:`~sfbatch.storage.MissingExtraError` when objects need the ``s3`` extra.
    """
    started = time.monotonic()
    scan = _scan(out_dir)
    report = VerifyReport(out_dir=out_dir, manifests=[p.name for p in scan.paths])
    report.damaged_lines = scan.damaged
    referenced: set[str] = set()  # local paths and s3:// URLs of every latest record
    to_check: list[tuple[str, ImageEntry]] = []
    objects: list[tuple[str, ImageEntry]] = []
    for row_id, record in scan.latest.items():
        images = _images(record)
        for image in images:
            path = image.get("path", "")
            rel = None if is_s3_url(path) else safe_relpath(path)
            if rel is not None:
                referenced.add(rel.as_posix())
            elif is_s3_url(path):
                referenced.add(path)
        if record.get("status") == "ok":
            report.records += 1
            for image in images:
                stored = is_s3_url(image.get("path", ""))
                (objects if stored else to_check).append((row_id, image))

    def tally(result: FileProblem | int) -> None:
        if isinstance(result, FileProblem):
            bucket = report.missing if result.problem == "missing" else report.mismatched
            bucket.append(result)
        else:
            report.files += 1
            report.bytes += result

    pool_size = workers or min(8, (os.cpu_count() or 1) * 2)
    with concurrent.futures.ThreadPoolExecutor(max_workers=pool_size) as pool:
        for batch in _batches(to_check):
            for result in pool.map(lambda item: _check(out_dir, *item), batch):
                tally(result)
    if objects:
        before = report.bytes
        for result in asyncio.run(_check_objects(objects, deep=deep)):
            tally(result)
        if not deep:
            report.sized_only_bytes = report.bytes - before
        report.orphans += asyncio.run(_orphan_objects(referenced))

    images_dir = out_dir / "images"
    report.orphans = sorted(
        report.orphans
        + [
            rel
            for rel in (path.relative_to(out_dir).as_posix() for path in _walk_files(images_dir))
            if rel not in referenced
        ]
    )
    tmp_dir = out_dir / ".tmp"
    if tmp_dir.is_dir():
        report.leftover_parts = sorted(
            path.relative_to(out_dir).as_posix() for path in tmp_dir.rglob("*.part")
        )
    report.elapsed_s = time.monotonic() - started
    return report


def repair(out_dir: Path, report: VerifyReport) -> list[str]:
    """Make the items of ``report``'s missing or mismatched images due again; their ids.

    For each such item a ``failed`` record with error code ``damaged`` is appended to the
    manifest its latest record is in (the manifest stays append-only): the next run makes
    it again, even without ``--retry-failed``, and says how many it remakes. Holds the
    directory's run lock while it writes, so it never interleaves with a run.
    """
    from sfbatch.lock import RunLock
    from sfbatch.manifest import ManifestWriter, now_iso
    from sfbatch.resume import DAMAGED_CODE

    problems: dict[str, FileProblem] = {}
    for problem in (*report.missing, *report.mismatched):
        problems.setdefault(problem.id, problem)
    if not problems:
        return []
    home: dict[str, tuple[Path, ManifestRecord]] = {}
    for path in manifest_paths(out_dir):
        for record in iter_records(path):
            if record.get("id") in problems:
                home[record["id"]] = (path, record)
    repaired: list[str] = []
    with RunLock(out_dir):
        writers: dict[Path, ManifestWriter] = {}
        try:
            for row_id, (path, record) in home.items():
                if record.get("status") != "ok" or not isinstance(record.get("fingerprint"), str):
                    continue  # changed since verify read it, or too old to match a row
                problem = problems[row_id]
                detail = f"{problem.path}: {problem.problem} {problem.detail}".rstrip()
                writer = writers.get(path) or writers.setdefault(path, ManifestWriter(path))
                writer.append(
                    {
                        **record,
                        "status": "failed",
                        "finished_at": now_iso(),
                        "billed_images": 0,
                        "images": [],
                        "attempts": 0,
                        "error": {
                            "status": None,
                            "code": DAMAGED_CODE,
                            "message": f"verify --repair: {detail}; made again by the next run",
                        },
                    }
                )
                repaired.append(row_id)
        finally:
            for writer in writers.values():
                writer.close()
    return repaired


# -- output --------------------------------------------------------------------------


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.2f}{unit}"


def format_status(report: dict[str, Any], *, reasons_shown: int = 10) -> str:
    """The human table of :func:`status_report`'s result."""
    counts = report["counts"]
    rows: list[tuple[str, str, str]] = []

    def row(label: str, value: str, note: str = "") -> None:
        rows.append((label, value, note))

    row(
        "ok",
        f"{counts.get('ok', 0):,}",
        f"{plural(report['images'], 'image')}, {human_bytes(report['bytes'])}",
    )
    for status in ("failed", "invalid"):
        row(status, f"{counts.get(status, 0):,}")
        found = report["reasons"].get(status, [])
        for entry in found[:reasons_shown]:
            row("", f"{entry['count']:,}", entry["reason"])
        if len(found) > reasons_shown:
            row("", "", f"... {len(found) - reasons_shown} more reasons (--json lists all)")
    row(
        "generated",
        f"{counts.get('generated', 0):,}",
        "paid for, not downloaded (resume fetches them)",
    )
    row("duplicate", f"{counts.get('duplicate', 0):,}")
    if report["damaged_lines"]:
        more = report["damaged_lines"] - len(report["damaged_examples"])
        row(
            "damaged",
            f"{report['damaged_lines']:,}",
            "manifest lines that are not records ("
            + ", ".join(report["damaged_examples"])
            + (f" and {more:,} more" if more else "")
            + "): the next run makes their items again",
        )
    for status, n in counts.items():
        if status not in STATUSES:
            row(status, f"{n:,}", "unknown status")
    if report["pending"] is None:
        row("pending", "?", "give --input PROMPTS to count")
    else:
        row(
            "pending",
            f"{report['pending']:,}",
            f"of {plural(report['input_rows'], 'input row')}; "
            f"~{plural(report['pending_images'], 'image')}"
            + (
                f"; {report['pending_paid']:,} of them paid, only to download"
                if report.get("pending_paid")
                else ""
            ),
        )
        row(
            "history",
            f"{report['history']:,}",
            "records of rows no longer in the input (edited or removed; kept)",
        )
    tp = report["throughput"]
    span_s = tp["span_h"] * 3600
    if tp["ok_per_hour"] is None and not counts.get("ok"):
        row("throughput", "-")
    elif tp["ok_per_hour"] is None or span_s < _MIN_RATE_SPAN_S:
        # An hourly rate from a few seconds of records says nothing about an hour.
        row("throughput", "-", f"records span {duration(span_s)}: too short for an hourly rate")
    else:
        note = f"ok/h over {duration(span_s)}"
        if tp["ok_per_active_hour"] is not None and tp["active_h"] < tp["span_h"]:
            note += (
                f"; {tp['ok_per_active_hour']:,} ok/h over {duration(tp['active_h'] * 3600)} active"
            )
        row("throughput", f"{tp['ok_per_hour']:,}", note)
    for key, label in (("latency_s", "latency"), ("inference_s", "inference")):
        p = report[key]
        row(f"{label} p50", _fmt(p["p50"], " s"), f"p95 {_fmt(p['p95'], ' s')} (n={p['n']:,})")
    billed = report["billed"]
    row(
        "billed today",
        f"{billed['today']:,}",
        f"day from {billed['day_start']} (UTC{billed['tz_offset_h']:+g})",
    )
    row("billed total", f"{billed['total']:,}")
    quota = report["quota"]
    if quota["ipd"] is not None:  # no daily quota: not a nightly build, nothing to count
        note = f"at {quota['ipd']:,} images/day ({quota['left_today']:,} left today)"
        row(
            "nights left",
            "?" if quota["nights_left"] is None else f"{quota['nights_left']:,}",
            note if quota["nights_left"] is not None else note + "; give --input PROMPTS",
        )

    head = (
        f"{report['out_dir']}: {plural(report['ids'], 'item')} from "
        f"{plural(len(report['manifests']), 'manifest')} ({plural(report['lines'], 'record')})"
    )
    label_w = max(len(r[0]) for r in rows)
    value_w = max(len(r[1]) for r in rows)
    lines = [head]
    for label, value, note in rows:
        # Rows without a label are the reasons under "failed" / "invalid".
        note = note if label else f"· {note}"
        lines.append(f"  {label:<{label_w}}  {value:>{value_w}}  {note}".rstrip())
    return "\n".join(lines)


def _list(title: str, items: list[str], show_all: bool) -> list[str]:
    shown = items if show_all else items[:_LIST_LIMIT]
    lines = [f"{title} ({len(items):,}):"] + [f"  {item}" for item in shown]
    if len(items) > len(shown):
        lines.append(f"  ... {len(items) - len(shown):,} more (--all or --json lists all)")
    return lines


def format_verify(report: VerifyReport, *, show_all: bool = False) -> str:
    """The human report of :func:`verify`."""
    checked = report.files + len(report.missing) + len(report.mismatched)
    hashed = human_bytes(report.bytes - report.sized_only_bytes)
    sized = (
        f", {human_bytes(report.sized_only_bytes)} in the store checked by size only (--deep)"
        if report.sized_only_bytes
        else ""
    )
    lines = [
        f"{report.out_dir}: checked {checked:,} "
        f"images of {report.records:,} ok records ({hashed} hashed{sized} "
        f"in {report.elapsed_s:.1f} s)"
    ]
    if report.missing:
        lines += _list("MISSING", [f"{p.id}  {p.path}" for p in report.missing], show_all)
    if report.mismatched:
        lines += _list(
            "MISMATCHED",
            [f"{p.id}  {p.path}  {p.problem}: {p.detail}".rstrip(": ") for p in report.mismatched],
            show_all,
        )
    if report.orphans:
        lines += _list(
            "warning: orphan files (no latest record refers to them)", report.orphans, show_all
        )
    if report.leftover_parts:
        lines += _list(
            "warning: leftover partial downloads (the next run removes them)",
            report.leftover_parts,
            show_all,
        )
    if report.damaged_lines:
        lines += _list(
            "warning: manifest lines that are not records (the next run makes their items again)",
            report.damaged_lines,
            show_all,
        )
    lines.append(
        "OK: every image matches the manifest"
        if report.ok
        else f"FAILED: {len(report.missing):,} missing, {len(report.mismatched):,} mismatched"
    )
    return "\n".join(lines)


# -- CLI -----------------------------------------------------------------------------


def status_command(args: argparse.Namespace) -> int:
    """summarise an output directory from its manifests

    Counts by status (failures by reason), images and bytes, throughput, latency
    percentiles, billed images, and with --input the pending rows and the nights the daily
    quota needs for them. Reads DIR/manifest*.jsonl only.
    """
    from sfbatch.errors import SfbatchError

    if args.ipd is not None and args.ipd < 1:
        print("sfbatch status: --ipd must be 1 or more", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = status_report(
            args.dir, input_path=args.input, ipd=args.ipd, tz_offset_h=args.tz_offset_h
        )
    except NoManifestError as exc:
        print(f"sfbatch status: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (SfbatchError, OSError) as exc:
        print(f"sfbatch status: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        sys.stdout.write(orjson.dumps(report).decode() + "\n")
    else:
        print(format_status(report))
    return EXIT_OK


def verify_command(args: argparse.Namespace) -> int:
    """check every image against the manifest's sha256 and size

    Exit 0 when every image of the latest ok records is present and matches; 1 when any is
    missing or mismatched; 2 when DIR has no manifest. Orphan files under DIR/images/ and
    leftover DIR/.tmp/*.part files are reported as warnings (exit 0).
    """
    try:
        report = verify(args.dir, deep=args.deep)
    except (NoManifestError, ConfigError) as exc:  # ConfigError: the s3 extra is missing
        print(f"sfbatch verify: {exc}", file=sys.stderr)
        return EXIT_USAGE
    repaired: list[str] | None = None
    if args.repair:
        from sfbatch.errors import SfbatchError

        try:
            repaired = repair(args.dir, report)
        except (SfbatchError, OSError) as exc:
            print(f"sfbatch verify --repair: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if args.json:
        found = report.as_dict()
        if repaired is not None:
            found["repaired"] = repaired
        sys.stdout.write(orjson.dumps(found).decode() + "\n")
    else:
        print(format_verify(report, show_all=args.show_all))
        if repaired:
            print(
                f"repaired: {len(repaired):,} items are due again (failed, code 'damaged'); "
                "the next run makes them again"
            )
    return report.exit_code


_DIR: Final = flag("dir", type=Path, metavar="DIR")

COMMANDS: Final = (
    Command(
        "status",
        status_command,
        (
            _DIR,
            flag("--json", "one JSON object instead of the table", action="store_true"),
            flag("--input", "the prompt file, to count pending rows", type=Path, metavar="PROMPTS"),
            flag("--ipd", "images per day (default: quota.ipd of DIR/summary.json)", type=int),
            flag(
                "--tz-offset",
                "UTC offset in hours of the account's day (default 8)",
                type=float,
                default=_DEFAULT_TZ_OFFSET_H,
                dest="tz_offset_h",
            ),
        ),
    ),
    Command(
        "verify",
        verify_command,
        (
            _DIR,
            flag("--json", "one JSON object instead of text", action="store_true"),
            flag(
                "--deep",
                "also download every s3:// image and check its sha256 (default: HEAD and size; "
                "files on disk are always hashed)",
                action="store_true",
            ),
            flag(
                "--all",
                f"list every problem (default: the first {_LIST_LIMIT} of each kind)",
                action="store_true",
                dest="show_all",
            ),
            flag(
                "--repair",
                "make the items whose images are missing or damaged due again: appends a "
                "failed record (error code 'damaged') for each, so the next run makes them again",
                action="store_true",
            ),
        ),
    ),
)
