"""``sfbatch export``: a build's ``ok`` images as webdataset shards, parquet or an imagefolder.

    sfbatch export out/ --format webdataset --to s3://bucket/ds [--shard-size 1GB]

How it works, and why it stays flat in memory on millions of records:

1. **Index** (:func:`latest_index`): every manifest line of ``DIR`` (``manifest.jsonl`` and
   the shards' ``manifest-I-of-N.jsonl``) becomes a small entry ``(id, file, offset,
   status)``; entries are sorted in chunks spilled to temporary files and merged, and the
   last entry per id wins (later lines supersede earlier ones). Memory: one chunk.
2. **Join** with what earlier exports to the same ``DEST`` wrote: each shard's ids are kept,
   sorted, in ``DEST/.sfbatch-export/NNNNNN.ids``, so "already exported" is a merge of
   sorted streams, not a set in memory. What is left is read back by offset, in id order.
3. **Shards**: records go, in id order, into new shards of about ``--shard-size``
   (``NNNNNN.tar`` / ``NNNNNN.parquet`` / ``NNNNNN/``), numbered after the existing ones.
   Every shard is written to a local temporary file, then stored (uploaded for ``s3://``),
   then its ids file, then ``state.json``; an interrupted export redoes only its last shard.
   Same manifest → same shards, byte for byte (tar entries carry mtime 0, uid 0, no names).

Images are read through :mod:`sfbatch.storage`: a record's image ``path`` is relative to
``DIR`` or an ``s3://`` URL; they are streamed, never all held.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import heapq
import io
import logging
import os
import re
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Final, Literal

import orjson

from sfbatch.commands import Command, flag, flag_type, given
from sfbatch.errors import ConfigError, SfbatchError
from sfbatch.manifest import STATUSES, manifest_paths
from sfbatch.storage import (
    ImageStore,
    MissingExtraError,
    StorageError,
    StoreAccessError,
    StoreConfig,
    is_s3_url,
    open_store,
    parse_s3_url,
)

__all__ = [
    "COMMANDS",
    "FORMATS",
    "STATE_DIR",
    "ExportConfig",
    "ExportResult",
    "IndexEntry",
    "export",
    "latest_index",
    "parse_size",
]

Format = Literal["webdataset", "parquet", "imagefolder"]
FORMATS: tuple[Format, ...] = ("webdataset", "parquet", "imagefolder")
STATE_DIR = ".sfbatch-export"
_STATE_KEY = f"{STATE_DIR}/state.json"
_STATE_VERSION = 1
_SUFFIX = {"webdataset": ".tar", "parquet": ".parquet", "imagefolder": ""}
_RECORD_OVERHEAD_BYTES = 2048  # a sample's JSON and tar headers, for sizing shards
_ROW_GROUP_BYTES = 16 << 20
_ROW_GROUP_ROWS = 4096
_PUTS_AT_ONCE = 64  # imagefolder files stored concurrently (the store bounds it again)

log = logging.getLogger("sfbatch.export")


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """One export: what to read, where to, in which format."""

    source_dir: Path
    dest: str
    format: Format
    shard_size_bytes: int = 1 << 30
    include_failed: bool = False
    include_bytes: bool = True
    store: StoreConfig = field(default_factory=StoreConfig)
    work_dir: Path | None = None  # temporary files (default: the system's)
    sort_chunk_entries: int = 50_000

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"unknown format {self.format!r}: one of {', '.join(FORMATS)}")
        if self.shard_size_bytes < 1:
            raise ConfigError("shard size must be positive")
        if not self.include_bytes and self.format != "parquet":
            raise ConfigError("--no-bytes is for --format parquet (the others hold the images)")
        if self.sort_chunk_entries < 1:
            raise ConfigError("sort_chunk_entries must be >= 1")
        if not self.dest.strip():
            raise ConfigError("--to is empty: give a directory or s3://bucket/prefix")
        if not is_s3_url(self.dest) and Path(self.dest).exists() and not Path(self.dest).is_dir():
            raise ConfigError(f"--to {self.dest} is a file, not a directory")


@dataclass
class ExportResult:
    """What one export wrote. ``files`` are the new files' keys under ``dest``."""

    dest: str
    files: list[str] = field(default_factory=list)
    records: int = 0
    images: int = 0
    bytes: int = 0
    already_exported: int = 0
    failures: int = 0
    #: records left out because an image's bytes are not what the manifest says:
    #: ``(id, why)``; a later export takes them once they are made again
    damaged: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True, order=True)
class IndexEntry:
    """Where an id's latest record is: manifest ``file`` (index into the paths), byte offset."""

    id: str
    file: int
    offset: int
    status: str


# ---------------------------------------------------------------------------------------
# 1. the index: latest record per id, sorted by id, through an external merge sort


def latest_index(
    paths: list[Path], work_dir: Path, *, chunk_entries: int = 50_000
) -> Iterator[IndexEntry]:
    """The latest entry of every id across ``paths``, in id order.

    Holds at most ``chunk_entries`` entries in memory; the rest wait, sorted, in
    temporary files under ``work_dir``. Torn or corrupt lines are skipped.
    """
    runs: list[Path] = []
    chunk: list[tuple[str, int, int, str]] = []
    for number, path in enumerate(paths):
        for offset, row_id, status in _scan(path):
            chunk.append((row_id, number, offset, status))
            if len(chunk) >= chunk_entries:
                runs.append(_spill(chunk, work_dir, len(runs)))
                chunk = []
    chunk.sort()
    streams: list[Iterator[tuple[str, int, int, str]]] = [iter(chunk)]
    streams += [_read_run(run) for run in runs]
    previous: tuple[str, int, int, str] | None = None
    for entry in heapq.merge(*streams):
        if previous is not None and previous[0] != entry[0]:
            yield IndexEntry(*previous)
        previous = entry
    if previous is not None:
        yield IndexEntry(*previous)
    for run in runs:
        run.unlink(missing_ok=True)


_STATUSES: dict[str, str] = {
    s: s for s in STATUSES
}  # one string object per status, not one per line


def _scan(path: Path) -> Iterator[tuple[int, str, str]]:
    offset = 0
    with open(path, "rb") as f:
        for raw in f:
            start, offset = offset, offset + len(raw)
            if not raw.endswith(b"\n"):
                return  # a torn last line
            try:
                record = orjson.loads(raw)
                row_id, status = record["id"], record["status"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
            if isinstance(row_id, str) and isinstance(status, str):
                yield start, row_id, _STATUSES.get(status, status)


def _spill(chunk: list[tuple[str, int, int, str]], work_dir: Path, number: int) -> Path:
    chunk.sort()
    path = work_dir / f"index-{number:05d}.run"
    with open(path, "wb") as f:
        f.writelines(orjson.dumps(entry) + b"\n" for entry in chunk)
    return path


def _read_run(path: Path) -> Iterator[tuple[str, int, int, str]]:
    with open(path, "rb") as f:
        for raw in f:
            row_id, number, offset, status = orjson.loads(raw)
            yield row_id, number, offset, status


class _Records:
    """Reads a record back from its manifest by byte offset."""

    def __init__(self, paths: list[Path]) -> None:
        self._files: list[IO[bytes]] = [open(p, "rb") for p in paths]  # noqa: SIM115

    def read(self, entry: IndexEntry) -> dict[str, Any]:
        f = self._files[entry.file]
        f.seek(entry.offset)
        record: dict[str, Any] = orjson.loads(f.readline())
        return record

    def close(self) -> None:
        for f in self._files:
            f.close()


def _sorted_ids(paths: Iterable[Path]) -> Iterator[str]:
    """The union of sorted id files, in order (duplicates kept)."""

    def read(path: Path) -> Iterator[str]:
        with open(path, "rb") as f:
            for raw in f:
                value = orjson.loads(raw)
                assert isinstance(value, str)
                yield value

    return heapq.merge(*(read(p) for p in paths))


class _Seen:
    """Membership in a sorted id stream, asked in increasing id order."""

    def __init__(self, ids: Iterator[str]) -> None:
        self._ids = ids
        self._head: str | None = next(ids, None)

    def __contains__(self, row_id: str) -> bool:
        while self._head is not None and self._head < row_id:
            self._head = next(self._ids, None)
        return self._head == row_id


# ---------------------------------------------------------------------------------------
# 2. state kept in DEST


@dataclass
class _State:
    format: Format
    images: list[dict[str, Any]] = field(default_factory=list)  # one per shard
    failures: list[dict[str, Any]] = field(default_factory=list)  # one per failures file

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "version": _STATE_VERSION,
                "format": self.format,
                "images": self.images,
                "failures": self.failures,
            },
            option=orjson.OPT_INDENT_2,
        )


async def _load_state(store: ImageStore, fmt: Format) -> _State:
    if await store.head(_STATE_KEY) is None:
        return _State(format=fmt)
    try:
        raw = orjson.loads(await store.read(_STATE_KEY))
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{store.url_for(_STATE_KEY)} is corrupt: {exc}") from exc
    if raw.get("format") != fmt:
        raise ConfigError(
            f"{store.url} already holds a {raw.get('format')} export: "
            f"export {fmt} to another destination"
        )
    return _State(format=fmt, images=list(raw["images"]), failures=list(raw["failures"]))


# ---------------------------------------------------------------------------------------
# 3. rows: the record's fields as typed columns (parquet, imagefolder metadata)

_STR, _INT, _FLOAT, _BOOL = "string", "int64", "float64", "bool"
RECORD_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", _STR),
    ("file", _STR),
    ("line", _INT),
    ("variation", _INT),
    ("status", _STR),
    ("prompt", _STR),
    ("negative_prompt", _STR),
    ("model", _STR),
    ("image_size", _STR),
    ("batch_size", _INT),
    ("num_inference_steps", _INT),
    ("guidance_scale", _FLOAT),
    ("prompt_enhancement", _BOOL),
    ("requested_seed", _INT),
    ("seed", _INT),
    ("inference_s", _FLOAT),
    ("attempts", _INT),
    ("billed_images", _INT),
    ("latency_s", _FLOAT),
    ("trace_id", _STR),
    ("finished_at", _STR),
)
IMAGE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("image_index", _INT),
    ("image_path", _STR),
    ("image_sha256", _STR),
    ("image_nbytes", _INT),
)
ERROR_COLUMNS: tuple[tuple[str, str], ...] = (
    ("error_status", _INT),
    ("error_code", _STR),
    ("error_message", _STR),
)


def _coerce(kind: str, value: Any) -> Any:
    if value is None:
        return None
    if kind == _STR:
        return value if isinstance(value, str) else orjson.dumps(value).decode()
    if kind == _BOOL:
        return value if isinstance(value, bool) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value) if kind == _INT else float(value)


def _record_row(record: dict[str, Any]) -> dict[str, Any]:
    timings = record.get("timings")
    source = {
        **record,
        "inference_s": timings.get("inference") if isinstance(timings, dict) else None,
    }
    return {name: _coerce(kind, source.get(name)) for name, kind in RECORD_COLUMNS}


def _image_row(record: dict[str, Any], index: int, image: dict[str, Any]) -> dict[str, Any]:
    row = _record_row(record)
    values = {
        "image_index": index,
        "image_path": image.get("path"),
        "image_sha256": image.get("sha256"),
        "image_nbytes": image.get("bytes"),
    }
    row.update({name: _coerce(kind, values[name]) for name, kind in IMAGE_COLUMNS})
    return row


def _failure_row(record: dict[str, Any]) -> dict[str, Any]:
    row = _record_row(record)
    error = record.get("error") if isinstance(record.get("error"), dict) else {}
    assert isinstance(error, dict)
    values = {
        "error_status": error.get("status"),
        "error_code": error.get("code"),
        "error_message": error.get("message"),
    }
    row.update({name: _coerce(kind, values[name]) for name, kind in ERROR_COLUMNS})
    return row


def _arrow_schema(columns: tuple[tuple[str, str], ...], with_image: bool) -> Any:
    pa = _pyarrow()
    types = {_STR: pa.string(), _INT: pa.int64(), _FLOAT: pa.float64(), _BOOL: pa.bool_()}
    fields = [pa.field(name, types[kind]) for name, kind in columns]
    if with_image:
        fields.append(pa.field("image", pa.binary()))
    return pa.schema(fields)


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise MissingExtraError("parquet", "pyarrow") from exc
    return pyarrow


# ---------------------------------------------------------------------------------------
# 4. writers: one per format, each building one shard in a local directory


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sample_key(row_id: str, index: int) -> str:
    """A webdataset/imagefolder key for image ``index`` of ``row_id``: no dots, no slashes.

    Ids with other characters are made safe and given 8 hex digits of their hash, so two
    ids never share a key.
    """
    safe = _KEY_UNSAFE.sub("_", row_id)
    if safe != row_id:
        safe += "-" + hashlib.blake2b(row_id.encode(), digest_size=4).hexdigest()
    return f"{safe}_{index}"


@dataclass(frozen=True)
class _Image:
    index: int
    meta: dict[str, Any]
    local: Path  # the bytes, on local disk (unused when the writer needs no bytes)
    ext: str
    temporary: bool  # a downloaded copy, removed once written


class _ShardWriter:
    """Writes one shard under ``work`` and says which files it made (relative names)."""

    needs_bytes = True

    def __init__(self, work: Path, name: str) -> None:
        self.work = work
        self.name = name
        self.bytes = 0

    def add(self, record: dict[str, Any], images: list[_Image]) -> None:
        raise NotImplementedError

    def close(self) -> list[str]:
        raise NotImplementedError


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _TarWriter(_ShardWriter):
    def __init__(self, work: Path, name: str) -> None:
        super().__init__(work, name)
        self.file = f"{name}.tar"
        self._tar = tarfile.open(work / self.file, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def add(self, record: dict[str, Any], images: list[_Image]) -> None:
        for image in images:
            key = sample_key(record["id"], image.index)
            size = image.local.stat().st_size
            with open(image.local, "rb") as f:
                self._tar.addfile(_tarinfo(f"{key}.{image.ext}", size), f)
            meta = orjson.dumps({**record, "image_index": image.index})
            self._tar.addfile(_tarinfo(f"{key}.json", len(meta)), io.BytesIO(meta))
        # the tar as written (headers, padding): --shard-size holds for small images too
        assert self._tar.fileobj is not None
        self.bytes = self._tar.fileobj.tell()

    def close(self) -> list[str]:
        self._tar.close()
        return [self.file]


# Statistics only where they help a reader skip row groups: long text columns' min/max
# would make the footer (held in memory until close) grow with every row group.
_STATISTICS = ["id", "line", "variation", "seed", "requested_seed", "finished_at", "image_index"]


def _parquet_writer(path: Path, schema: Any) -> Any:
    pa = _pyarrow()
    names = set(schema.names)
    return pa.parquet.ParquetWriter(
        path,
        schema,
        # Images are already compressed: no dictionary, no second compression.
        use_dictionary=[n for n in names if n != "image"],
        compression={n: "none" if n == "image" else "snappy" for n in names},
        write_statistics=[n for n in _STATISTICS if n in names],
    )


class _ParquetWriter(_ShardWriter):
    def __init__(self, work: Path, name: str, *, include_bytes: bool) -> None:
        super().__init__(work, name)
        self.file = f"{name}.parquet"
        self._schema = _arrow_schema(RECORD_COLUMNS + IMAGE_COLUMNS, include_bytes)
        self._writer = _parquet_writer(work / self.file, self._schema)
        self._include_bytes = self.needs_bytes = include_bytes
        self._rows: list[dict[str, Any]] = []
        self._buffered = 0

    def add(self, record: dict[str, Any], images: list[_Image]) -> None:
        for image in images:
            row = _image_row(record, image.index, image.meta)
            size = 0
            if self._include_bytes:
                row["image"] = image.local.read_bytes()
                size = len(row["image"])
            self._rows.append(row)
            self._buffered += size + 512
            self.bytes += size + 256
        if self._buffered >= _ROW_GROUP_BYTES or len(self._rows) >= _ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            pa = _pyarrow()
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self._schema))
            self._rows, self._buffered = [], 0

    def close(self) -> list[str]:
        self._flush()
        self._writer.close()
        return [self.file]


class _FolderWriter(_ShardWriter):
    """``NNNNNN/KEY.ext`` and ``NNNNNN/metadata.jsonl`` with ``file_name`` and the columns."""

    def __init__(self, work: Path, name: str) -> None:
        super().__init__(work, name)
        (work / name).mkdir()
        self._files: list[str] = []
        self._meta = open(work / name / "metadata.jsonl", "wb")  # noqa: SIM115

    def add(self, record: dict[str, Any], images: list[_Image]) -> None:
        for image in images:
            file_name = f"{sample_key(record['id'], image.index)}.{image.ext}"
            target = self.work / self.name / file_name
            if image.temporary:
                os.replace(image.local, target)
            else:
                _link_or_copy(image.local, target)
            row = {"file_name": file_name, **_image_row(record, image.index, image.meta)}
            self._meta.write(orjson.dumps(row) + b"\n")
            self._files.append(f"{self.name}/{file_name}")
            self.bytes += target.stat().st_size + 512

    def close(self) -> list[str]:
        self._meta.close()
        return [*self._files, f"{self.name}/metadata.jsonl"]


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        import shutil

        shutil.copyfile(source, target)


def _failures_file(work: Path, fmt: Format, name: str, rows: Iterable[dict[str, Any]]) -> str:
    """The failures table: parquet for parquet exports, JSON lines otherwise."""
    if fmt == "parquet":
        pa = _pyarrow()
        schema = _arrow_schema(RECORD_COLUMNS + ERROR_COLUMNS, False)
        file = f"failures/{name}.parquet"
        (work / "failures").mkdir(exist_ok=True)
        with _parquet_writer(work / file, schema) as writer:
            batch: list[dict[str, Any]] = []
            for row in rows:
                batch.append(row)
                if len(batch) >= _ROW_GROUP_ROWS:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    batch = []
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        return file
    file = f"failures/{name}.jsonl"
    (work / "failures").mkdir(exist_ok=True)
    with open(work / file, "wb") as f:
        f.writelines(orjson.dumps(row) + b"\n" for row in rows)
    return file


# ---------------------------------------------------------------------------------------
# 5. the export


class _Sources:
    """Image bytes on local disk: ``DIR/path`` as is, ``s3://`` objects downloaded."""

    def __init__(self, source_dir: Path, config: StoreConfig) -> None:
        self.source_dir = source_dir
        self.config = config
        self._stores: dict[str, ImageStore] = {}
        self._downloads = 0

    async def local(self, path: str, work: Path) -> tuple[Path, bool]:
        """A local file with the image's bytes, and whether it is a temporary copy."""
        if is_s3_url(path):
            bucket, key = parse_s3_url(path)
            store = self._stores.get(bucket)
            if store is None:
                store = await open_store(f"s3://{bucket}", self.config).__aenter__()
                self._stores[bucket] = store
            self._downloads += 1
            target = work / f"download-{self._downloads}{PurePosixPath(key).suffix}"
            await store.download(key, target)
            return target, True
        relative = PurePosixPath(path)
        if relative.is_absolute() or ".." in relative.parts:
            raise StorageError(f"image path {path!r} is outside {self.source_dir}")
        return self.source_dir / relative, False

    async def aclose(self) -> None:
        for store in self._stores.values():
            await store.aclose()


def _first(group: BaseExceptionGroup[Exception]) -> Exception:
    leaf: Exception | BaseExceptionGroup[Exception] = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


def _damage(local: Path, image: dict[str, Any]) -> str | None:
    """Why the bytes at ``local`` are not the image its record describes, or ``None``."""
    try:
        size = local.stat().st_size
        if isinstance(image.get("bytes"), int) and size != image["bytes"]:
            return f"{size} bytes where the manifest says {image['bytes']}"
        if isinstance(image.get("sha256"), str):
            with open(local, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            if digest != image["sha256"]:
                return "its sha256 is not the manifest's (damaged or replaced)"
    except FileNotFoundError:
        return "missing"
    return None


def _ext(path: str) -> str:
    suffix = PurePosixPath(path).suffix.lower().lstrip(".")
    return "jpg" if suffix == "jpeg" else suffix or "bin"


async def export(config: ExportConfig) -> ExportResult:
    """Export ``config.source_dir``'s ok records to ``config.dest``; see the module docstring."""
    paths = manifest_paths(config.source_dir)
    if not paths:
        raise ConfigError(f"no manifest*.jsonl in {config.source_dir}")
    if config.format == "parquet":
        _pyarrow()
    result = ExportResult(dest=config.dest)
    sources = _Sources(config.source_dir, config.store)
    with tempfile.TemporaryDirectory(prefix="sfbatch-export-", dir=config.work_dir) as tmp:
        work = Path(tmp)
        async with open_store(config.dest, config.store) as dest:
            await dest.check_writable()
            fresh = await dest.head(_STATE_KEY) is None
            state = await _load_state(dest, config.format)
            if fresh:
                await _claim(dest, state)
            try:
                await _export(config, paths, dest, state, sources, work, result)
            finally:
                await sources.aclose()
    return result


async def _claim(dest: ImageStore, state: _State) -> None:
    """Make ``dest`` an export's before writing a shard: refuse one that holds a file an
    export would overwrite (not this tool's: there is no state yet), then write the state,
    so a file found there later is an interrupted export's own, redone."""
    first = {"webdataset": "000000.tar", "parquet": "000000.parquet"}.get(
        state.format, "000000/metadata.jsonl"
    )
    for key in (first, "failures/000000.jsonl", "failures/000000.parquet"):
        if await dest.head(key) is not None:
            raise ConfigError(
                f"{dest.url_for(key)} is there already, and not from an sfbatch export (there "
                f"is no {STATE_DIR}/ beside it): export to an empty or new destination"
            )
    await dest.put_bytes(state.to_json(), _STATE_KEY)


async def _fetch_ids(dest: ImageStore, files: list[dict[str, Any]], work: Path) -> list[Path]:
    local: list[Path] = []
    for number, entry in enumerate(files):
        path = work / f"seen-{number}.ids"
        await dest.download(entry["ids"], path)
        local.append(path)
    return local


async def _export(
    config: ExportConfig,
    paths: list[Path],
    dest: ImageStore,
    state: _State,
    sources: _Sources,
    work: Path,
    result: ExportResult,
) -> None:
    exported = _Seen(_sorted_ids(await _fetch_ids(dest, state.images, work)))
    failed_before = _Seen(_sorted_ids(await _fetch_ids(dest, state.failures, work)))
    records = _Records(paths)
    shard: _Shard | None = None
    failures_path = work / "failures.pending"
    failures_out = _open_write(failures_path)
    changed = False
    try:
        for entry in latest_index(paths, work, chunk_entries=config.sort_chunk_entries):
            if entry.status == "ok":
                if entry.id in exported:
                    result.already_exported += 1
                    continue
                record = records.read(entry)
                images = [i for i in record.get("images") or [] if isinstance(i, dict)]
                size = sum(int(i.get("bytes") or 0) for i in images) + _RECORD_OVERHEAD_BYTES
                if (
                    shard is not None
                    and shard.records
                    and shard.writer.bytes + size > config.shard_size_bytes
                ):
                    await shard.finish(dest, state, result)
                    shard = None
                if shard is None:
                    shard = _Shard.start(config, work, len(state.images))
                damage = await shard.add(record, images, sources)
                if damage is not None:
                    result.damaged.append((entry.id, damage))
                    continue
                result.records += 1
                result.images += len(images)
            elif entry.status == "failed" and config.include_failed:
                changed |= entry.id not in failed_before
                failures_out.write(orjson.dumps(records.read(entry)) + b"\n")
                result.failures += 1
        if shard is not None and shard.records:  # none: every record since was damaged
            await shard.finish(dest, state, result)
        failures_out.close()
        # The table lists what fails now: a failure made ok since leaves it, so it is
        # written again whole when that set changed (ids in order: a merge, no set).
        listed_before = sum(int(entry["records"]) for entry in state.failures)
        if config.include_failed and (changed or result.failures != listed_before):
            await _write_failures(config, failures_path, dest, state, work, result)
    finally:
        failures_out.close()
        records.close()


async def _write_failures(
    config: ExportConfig,
    pending: Path,
    dest: ImageStore,
    state: _State,
    work: Path,
    result: ExportResult,
) -> None:
    """The whole failures table again (``failures/000000``), then the state, then what
    earlier exports listed under other names is removed."""
    old = state.failures
    name = "000000"
    ids_path = work / f"failures-{name}.ids"
    file = _failures_files(config.format, pending, work, name, ids_path)
    ids_key = f"{STATE_DIR}/failures-{name}.ids"
    if result.failures:
        await dest.put_file(work / file, file, remove_source=True)
        await dest.put_file(ids_path, ids_key, remove_source=True)
        state.failures = [{"file": file, "ids": ids_key, "records": result.failures}]
        result.files.append(file)
    else:
        state.failures = []
    await dest.put_bytes(state.to_json(), _STATE_KEY)
    kept = {key for entry in state.failures for key in (entry["file"], entry["ids"])}
    for key in {key for entry in old for key in (entry["file"], entry["ids"])} - kept:
        await dest.delete(key)


def _failures_files(fmt: Format, pending: Path, work: Path, name: str, ids_path: Path) -> str:
    with open(ids_path, "wb") as ids:
        ids.writelines(orjson.dumps(r["id"]) + b"\n" for r in _read_jsonl(pending))
    return _failures_file(work, fmt, name, (_failure_row(r) for r in _read_jsonl(pending)))


def _open_write(path: Path) -> IO[bytes]:
    return open(path, "wb")


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as f:
        for raw in f:
            record: dict[str, Any] = orjson.loads(raw)
            yield record


@dataclass
class _Shard:
    name: str
    writer: _ShardWriter
    ids_path: Path
    ids: IO[bytes]
    work: Path
    records: int = 0
    images: int = 0

    @classmethod
    def start(cls, config: ExportConfig, work: Path, number: int) -> _Shard:
        name = f"{number:06d}"
        shard_work = work / f"shard-{name}"
        shard_work.mkdir()
        writer: _ShardWriter
        if config.format == "webdataset":
            writer = _TarWriter(shard_work, name)
        elif config.format == "parquet":
            writer = _ParquetWriter(shard_work, name, include_bytes=config.include_bytes)
        else:
            writer = _FolderWriter(shard_work, name)
        ids_path = work / f"{name}.ids"
        return cls(name, writer, ids_path, open(ids_path, "wb"), shard_work)

    async def add(
        self, record: dict[str, Any], images: list[dict[str, Any]], sources: _Sources
    ) -> str | None:
        """Add the record and its images; or, when an image's bytes are not what the
        record says, add nothing and say why."""
        local: list[_Image] = []
        for index, image in enumerate(images):
            path = image.get("path")
            if not isinstance(path, str) or not path:
                raise StorageError(f"record {record['id']}: image {index} has no path")
            where, temporary = Path(), False
            if self.writer.needs_bytes:
                where, temporary = await sources.local(path, self.work)
            local.append(_Image(index, image, where, _ext(path), temporary))
            why = _damage(where, image) if self.writer.needs_bytes else None
            if why is not None:
                for done in local:
                    if done.temporary:
                        done.local.unlink(missing_ok=True)
                return f"{path}: {why}"
        try:
            # In the loop's thread: a thread trip per record costs more than the write.
            self.writer.add(record, local)
        except OSError as exc:
            raise StorageError(f"record {record['id']}: {exc.filename}: {exc.strerror}") from exc
        for done in local:
            if done.temporary:
                done.local.unlink(missing_ok=True)
        self.ids.write(orjson.dumps(record["id"]) + b"\n")
        self.records += 1
        self.images += len(images)
        return None

    async def finish(self, dest: ImageStore, state: _State, result: ExportResult) -> None:
        self.ids.close()
        files = self.writer.close()
        for start in range(0, len(files), _PUTS_AT_ONCE):
            try:
                async with asyncio.TaskGroup() as group:
                    for file in files[start : start + _PUTS_AT_ONCE]:
                        group.create_task(dest.put_file(self.work / file, file, remove_source=True))
            except* Exception as group:  # the same failure, many times (a full disk): one
                raise _first(group) from None
        ids_key = f"{STATE_DIR}/{self.name}.ids"
        await dest.put_file(self.ids_path, ids_key, remove_source=True)
        state.images.append(
            {
                "file": files[0] if len(files) == 1 else f"{self.name}/",
                "ids": ids_key,
                "records": self.records,
                "images": self.images,
                "bytes": self.writer.bytes,
            }
        )
        await dest.put_bytes(state.to_json(), _STATE_KEY)
        result.files.extend(files if len(files) == 1 else [f"{self.name}/"])
        result.bytes += self.writer.bytes


# ---------------------------------------------------------------------------------------
# 6. command line


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"1GB"``, ``"500MB"``, ``"64MiB"``, ``"2g"``, ``"1000"`` → bytes (KB = 1000, KiB = 1024)."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (e.g. 1GB, 500MB, 64MiB)")
    number, unit, suffix = match.groups()
    power = " kmgt".index(unit.lower() or " ")
    base = 1024 if suffix.lower().startswith("i") else 1000
    size = int(float(number) * base**power)
    if size < 1:
        raise ValueError(f"size must be positive: {text!r}")
    return size


def run_export(args: argparse.Namespace) -> int:
    """export a build's images as webdataset shards, parquet or an imagefolder

    Export the ok images of DIR (the latest record per id, across manifest.jsonl and the
    shards' manifests) to DEST, a directory or s3://bucket/prefix. Incremental: a rerun
    after the build grew writes only new shards.
    """
    # Exit 0 done, 1 an image or store failed, 2 usage, 3 store refused.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = ExportConfig(source_dir=args.dir, **given(args, _FLAGS))
        if not args.dir.is_dir():
            raise ConfigError(f"{args.dir} is not a directory")
        result = asyncio.run(export(config))
    except ConfigError as exc:
        print(f"sfbatch export: {exc}", file=sys.stderr)
        return 2
    except StoreAccessError as exc:
        print(f"sfbatch export: the store refused: {exc}", file=sys.stderr)
        return 3
    except SfbatchError as exc:
        print(f"sfbatch export: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the destination or the work directory: a full disk, most often
        where = f" writing {exc.filename}" if exc.filename else ""
        print(
            f"sfbatch export: {exc.strerror or exc}{where}; the shards written before are "
            "kept: fix it and run the same command again",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130
    print(
        f"exported {result.records} records ({result.images} images, "
        f"{result.bytes / 1e6:.1f} MB) into {len(result.files)} new file(s) at {result.dest}; "
        f"{result.already_exported} already exported"
        + (f"; {result.failures} failures listed" if config.include_failed else "")
    )
    if result.damaged:
        shown = "; ".join(f"{row_id} ({why})" for row_id, why in result.damaged[:5])
        more = f" and {len(result.damaged) - 5} more" if len(result.damaged) > 5 else ""
        print(
            f"sfbatch export: {len(result.damaged)} records left out, their images are not "
            f"what the manifest says: {shown}{more}. Run `sfbatch verify {args.dir} --repair`, "
            "then the build again to make them again; the next export adds them",
            file=sys.stderr,
        )
        return 1
    return 0


#: The flags of ``sfbatch export``: DIR, then each an :class:`ExportConfig` field.
_FLAGS: Final = (
    flag("dir", "the run's output directory", type=Path, metavar="DIR"),
    flag("--format", field="format", required=True, choices=FORMATS),
    flag("--to", "directory or s3://", field="dest", required=True, metavar="DEST"),
    flag(
        "--shard-size",
        "about this much per shard, e.g. 500MB, 1GiB (default 1 GiB)",
        field="shard_size_bytes",
        type=flag_type(parse_size, ValueError),
        default=1 << 30,
        metavar="SIZE",
    ),
    flag(
        "--include-failed",
        "also write a table of failed records (failures/NNNNNN.parquet or .jsonl)",
        field="include_failed",
        action="store_true",
    ),
    flag(
        "--no-bytes",
        "parquet: store each image's path instead of its bytes",
        field="include_bytes",
        action="store_false",
    ),
)

COMMANDS: Final = (Command("export", run_export, _FLAGS),)
