"""``manifest.idx``: a binary side file next to each manifest, so resume need not parse it.

It is a **cache**: deleting it, or anything wrong with it, costs time, never correctness.
What it holds is what :func:`sfbatch.resume.read_index` would find in the manifest bytes it
covers (each record's :func:`~sfbatch.identity.item_key` and latest status code, the full
records of ``generated`` items, damaged line numbers, recent billing), so resume reads
the manifest as JSONL only past what the side file covers.

Layout: a file header (magic, the manifest's device and inode), then blocks. Each block
covers manifest bytes ``[start, end)`` (whole lines ``line0+1 .. line0+lines``), starts
where the block before it ended, and ends with a CRC-32 of itself:

- an *entries* block (``ENTRIES``), appended by :class:`SideWriter` (the
  :class:`~sfbatch.manifest.ManifestWriter`) after the manifest lines it describes are
  flushed: one 8-byte key and one status byte per record, in file order;
- a *snapshot* block (``SNAPSHOT``, only first), written by :func:`write_snapshot` after a
  resume that had to parse much of the manifest: the resume index's key tables, bucket by
  bucket (loaded with one ``read`` per bucket, no per-key work).

A block is used only if its CRC holds, it starts where the last one ended, the manifest
is at least ``end`` bytes long, and the manifest's last bytes before ``end`` (up to 64,
ending in a newline) have the CRC the block recorded. The first block that fails stops
the chain; the manifest is parsed from there. A manifest replaced by another file (a new
inode: an editor, ``sed -i``) loses the whole side file. Not detected: an edit in place
that keeps the file's inode and the bytes at every block's end; delete ``manifest.idx``
after editing a manifest that way.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import struct
import zlib
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import orjson

from sfbatch.identity import KeyTable

__all__ = [
    "ENTRIES",
    "SNAPSHOT",
    "Block",
    "Extras",
    "SideWriter",
    "Snapshot",
    "read_blocks",
    "side_path",
    "tail_crc",
    "write_snapshot",
]

_MAGIC: Final = b"SFBIDX\x00\x01"
_FILE_HEAD: Final = struct.Struct("<8sQQ")  # magic, manifest st_dev, st_ino
_TAG: Final = b"SBLK"
# tag, kind, flags, sample crc, start, end, line0, lines, records, payload bytes,
# extras bytes, the latest finished_at of the block's billed records (ISO, padded)
_BLOCK_HEAD: Final = struct.Struct("<4sBBxxIQQQQQQQ24s")
_CRC: Final = struct.Struct("<I")
_SAMPLE_BYTES: Final = 64
ENTRIES: Final = 1
SNAPSHOT: Final = 2
_HAS_EXTRAS: Final = 1  # flags: generated records or damaged lines in the extras
_BUCKETS: Final = 1 << 14
_LENGTHS_BYTES: Final = 8 * _BUCKETS
_MAYBE_BYTES: Final = 1 << 17
#: The writer's block: at most this many records (and at most one per fsync tick).
_MAX_ENTRIES: Final = 65536


def side_path(manifest: Path) -> Path:
    """``manifest.jsonl`` -> ``manifest.idx`` (``manifest-1-of-4.idx`` for a shard)."""
    return manifest.with_suffix(".idx")


@dataclass
class Extras:
    """The rare things a block says beyond keys and statuses."""

    generated: list[dict[str, Any]] = field(default_factory=list)
    damaged: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    #: Billed records: (finished_at, images, key_index, model).
    billed: list[tuple[str, int, int, str]] = field(default_factory=list)

    def dump(self) -> bytes:
        if not (self.generated or self.damaged or self.billed):
            return b""
        return orjson.dumps(
            {"generated": self.generated, "damaged": self.damaged, "billed": self.billed}
        )

    @classmethod
    def parse(cls, raw: bytes) -> Extras:
        if not raw:
            return cls()
        data = orjson.loads(raw)
        return cls(
            generated=list(data["generated"]),
            damaged=[(int(line), str(why)) for line, why in data["damaged"]],
            billed=[(str(f), int(n), int(k), str(m)) for f, n, k, m in data["billed"]],
        )


@dataclass
class Snapshot:
    """The resume index's tables as a snapshot block holds them."""

    done: KeyTable
    other: KeyTable
    maybe_other: bytearray


@dataclass
class Block:
    """One valid block: what it covers and what it says."""

    kind: int
    start: int
    end: int
    line0: int
    lines: int
    records: int
    max_finished: str
    #: ENTRIES: keys and status codes in file order; SNAPSHOT: the tables.
    keys: array[int] = field(default_factory=lambda: array("Q"))
    codes: bytes = b""
    snapshot: Snapshot | None = None
    #: None when the caller's ``extras_since`` said the extras are not needed.
    extras: Extras | None = None


def _identity(manifest: Path) -> tuple[int, int] | None:
    try:
        st = manifest.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def tail_crc(f: IO[bytes], start: int, end: int) -> int | None:
    """CRC-32 of a manifest's last bytes before ``end`` (None unless they end a line)."""
    begin = max(start, end - _SAMPLE_BYTES)
    f.seek(begin)
    sample = f.read(end - begin)
    if len(sample) != end - begin or not sample.endswith(b"\n"):
        return None
    return zlib.crc32(sample)


def _head(
    kind: int,
    flags: int,
    sample: int,
    start: int,
    end: int,
    line0: int,
    lines: int,
    records: int,
    payload: int,
    extras: int,
    max_finished: str,
) -> bytes:
    return _BLOCK_HEAD.pack(
        _TAG,
        kind,
        flags,
        sample,
        start,
        end,
        line0,
        lines,
        records,
        payload,
        extras,
        max_finished.encode("ascii", "replace")[:24],
    )


def read_blocks(manifest: Path, *, extras_since: str = "") -> Iterator[Block]:
    """The side file's valid blocks, in order, each checked against ``manifest``.

    Stops at the first block that is torn, fails its CRC, or does not match the
    manifest. A block's extras are parsed when it has generated records or damaged
    lines, or billed records finished at or after ``extras_since``.
    """
    ident = _identity(manifest)
    try:
        side = open(side_path(manifest), "rb")  # noqa: SIM115  (closed by the with below)
        text = open(manifest, "rb")  # noqa: SIM115
    except OSError:
        return
    with side, text:
        head = side.read(_FILE_HEAD.size)
        if len(head) != _FILE_HEAD.size:
            return
        magic, dev, ino = _FILE_HEAD.unpack(head)
        if magic != _MAGIC or (dev, ino) != ident:
            return
        size = os.fstat(text.fileno()).st_size
        covered = lines_before = 0
        while True:
            block = _read_block(side, text, size, covered, lines_before, extras_since)
            if block is None:
                return
            yield block
            covered, lines_before = block.end, block.line0 + block.lines


def _read_block(
    side: io.BufferedReader, text: IO[bytes], size: int, covered: int, line0: int, extras_since: str
) -> Block | None:
    raw = side.read(_BLOCK_HEAD.size)
    if len(raw) != _BLOCK_HEAD.size:
        return None
    (tag, kind, flags, sample, start, end, b_line0, lines, records, payload, extras, finished) = (
        _BLOCK_HEAD.unpack(raw)
    )
    if tag != _TAG or start != covered or b_line0 != line0 or end > size or end <= start:
        return None
    if kind == SNAPSHOT and start != 0:
        return None
    if tail_crc(text, start, end) != sample:
        return None
    crc = zlib.crc32(raw)
    block = Block(kind, start, end, line0, lines, records, finished.rstrip(b"\0").decode())
    if kind == ENTRIES:
        if payload % 9:
            return None
        body = side.read(payload)
        if len(body) != payload:
            return None
        crc = zlib.crc32(body, crc)
        n = payload // 9
        block.keys = array("Q")
        block.keys.frombytes(body[: 8 * n])
        block.codes = body[8 * n :]
    elif kind == SNAPSHOT:
        snapshot, crc = _read_snapshot(side, payload, crc)
        if snapshot is None:
            return None
        block.snapshot = snapshot
    else:
        return None
    extras_raw = side.read(extras)
    tail = side.read(_CRC.size)
    if len(extras_raw) != extras or len(tail) != _CRC.size:
        return None
    if _CRC.unpack(tail)[0] != zlib.crc32(extras_raw, crc):
        return None
    if flags & _HAS_EXTRAS or (extras and block.max_finished >= extras_since):
        try:
            block.extras = Extras.parse(extras_raw)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
    return block


def _read_snapshot(side: io.BufferedReader, payload: int, crc: int) -> tuple[Snapshot | None, int]:
    head = side.read(2 * _LENGTHS_BYTES + _MAYBE_BYTES)
    if len(head) != 2 * _LENGTHS_BYTES + _MAYBE_BYTES:
        return None, crc
    crc = zlib.crc32(head, crc)
    done_lengths, other_lengths = array("Q"), array("Q")
    done_lengths.frombytes(head[:_LENGTHS_BYTES])
    other_lengths.frombytes(head[_LENGTHS_BYTES : 2 * _LENGTHS_BYTES])
    if len(head) + sum(done_lengths) + sum(other_lengths) != payload:
        return None, crc
    short = False

    def read(n: int) -> bytearray:
        nonlocal crc, short
        buf = bytearray(n)
        if side.readinto(buf) != n:
            short = True
        crc = zlib.crc32(buf, crc)
        return buf

    done, other = KeyTable(), KeyTable(value_size=1)
    try:
        done.load(done_lengths, read)
        other.load(other_lengths, read)
    except ValueError:
        return None, crc
    if short:
        return None, crc
    return Snapshot(done, other, bytearray(head[2 * _LENGTHS_BYTES :])), crc


def _write_block(
    f: IO[bytes],
    kind: int,
    sample: int,
    span: tuple[int, int, int, int, int],
    parts: Iterable[bytes],
    payload: int,
    extras: Extras,
    max_finished: str,
) -> None:
    """One block: ``span`` is (start, end, line0, lines, records); ``parts`` are streamed."""
    flags = _HAS_EXTRAS if extras.generated or extras.damaged else 0
    extras_raw = extras.dump()
    raw = _head(kind, flags, sample, *span, payload, len(extras_raw), max_finished)
    crc = zlib.crc32(raw)
    f.write(raw)
    written = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
        f.write(part)
        written += len(part)
    if written != payload:
        raise OSError(f"block payload of {written} bytes, {payload} announced")
    f.write(extras_raw)
    f.write(_CRC.pack(zlib.crc32(extras_raw, crc)))


def write_snapshot(
    manifest: Path,
    snapshot: Snapshot,
    *,
    end: int,
    lines: int,
    records: int,
    extras: Extras,
) -> bool:
    """Replace the side file with one snapshot block covering ``manifest[:end]``.

    Written to a temporary name and renamed (no fsync: a lost or torn side file is
    only a slower next resume). False if the manifest cannot be read or changed.
    """
    ident = _identity(manifest)
    if ident is None or end <= 0:
        return False
    try:
        with open(manifest, "rb") as text:
            sample = tail_crc(text, 0, end)
        if sample is None:
            return False
        path = side_path(manifest)
        tmp = path.with_name(path.name + ".tmp")
        done, other = snapshot.done, snapshot.other
        lengths = (done.bucket_lengths(), other.bucket_lengths())
        payload = 2 * _LENGTHS_BYTES + _MAYBE_BYTES + sum(lengths[0]) + sum(lengths[1])
        parts = itertools.chain(
            (lengths[0].tobytes(), lengths[1].tobytes(), bytes(snapshot.maybe_other)),
            done.bucket_bytes(),
            other.bucket_bytes(),
        )
        max_finished = max((b[0] for b in extras.billed), default="")
        with open(tmp, "wb") as f:
            f.write(_FILE_HEAD.pack(_MAGIC, *ident))
            span = (0, end, 0, lines, records)
            _write_block(f, SNAPSHOT, sample, span, parts, payload, extras, max_finished)
        os.replace(tmp, path)
    except OSError:
        return False
    return True


def _chain_end(f: IO[bytes], ident: tuple[int, int]) -> tuple[int, int, int] | None:
    """(side bytes, manifest end, lines) after the last complete block, or None if unusable.

    Hops block headers without checking CRCs (the reader does).
    """
    f.seek(0)
    head = f.read(_FILE_HEAD.size)
    if len(head) != _FILE_HEAD.size:
        return None
    magic, dev, ino = _FILE_HEAD.unpack(head)
    if magic != _MAGIC or (dev, ino) != ident:
        return None
    size = os.fstat(f.fileno()).st_size
    pos, end, lines = _FILE_HEAD.size, 0, 0
    while pos + _BLOCK_HEAD.size <= size:
        f.seek(pos)
        fields = _BLOCK_HEAD.unpack(f.read(_BLOCK_HEAD.size))
        if fields[0] != _TAG or fields[4] != end:
            break
        stop = pos + _BLOCK_HEAD.size + fields[9] + fields[10] + _CRC.size
        if stop > size:
            break
        pos, end, lines = stop, fields[5], fields[6] + fields[7]
    return pos, end, lines


class SideWriter:
    """Appends entries blocks for the records a :class:`~sfbatch.manifest.ManifestWriter` writes.

    Enabled only when the side file covers the manifest exactly up to ``manifest_end``
    (or both are empty); otherwise it writes nothing and the next resume catches up.
    A torn last block (a crash mid-write) is cut off first.
    """

    def __init__(self, manifest: Path, manifest_end: int) -> None:
        self._manifest = manifest
        self._file: IO[bytes] | None = None
        self._keys = array("Q")
        self._codes = bytearray()
        self._extras = Extras()
        self._max_finished = ""
        self._end = self._start = manifest_end
        self._line0 = 0
        ident = _identity(manifest)
        if ident is None:
            return
        path = side_path(manifest)
        try:
            f = open(path, "r+b" if path.exists() else "w+b")  # noqa: SIM115  (see close)
        except OSError:
            return
        chain = _chain_end(f, ident)
        if chain is None and manifest_end == 0:
            f.seek(0)
            f.write(_FILE_HEAD.pack(_MAGIC, *ident))
            chain = (_FILE_HEAD.size, 0, 0)
        if chain is None or chain[1] != manifest_end:
            f.close()
            return
        pos, _, self._line0 = chain
        f.truncate(pos)
        f.seek(pos)
        self._file = f

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def add(
        self, key: int, code: int, line_bytes: int, record: dict[str, Any], billed: bool
    ) -> None:
        """One record just written: ``line_bytes`` of manifest, its key and status code."""
        if self._file is None:
            return
        self._keys.append(key & 0xFFFF_FFFF_FFFF_FFFF)
        self._codes.append(code)
        self._end += line_bytes
        if record.get("status") == "generated":
            self._extras.generated.append(record)
        if billed:
            finished = str(record.get("finished_at", ""))
            key_index = record.get("key_index")
            self._extras.billed.append(
                (
                    finished,
                    int(record.get("billed_images") or 0),
                    key_index if isinstance(key_index, int) else 0,
                    str(record.get("model") or ""),
                )
            )
            self._max_finished = max(self._max_finished, finished)
        if len(self._codes) >= _MAX_ENTRIES:
            self.flush()

    def flush(self) -> None:
        """Write a block for the records added since the last one (their lines are flushed)."""
        f = self._file
        if f is None or not self._codes:
            return
        try:
            with open(self._manifest, "rb") as text:
                sample = tail_crc(text, self._start, self._end)
            if sample is None:
                raise OSError("the manifest does not end where its records do")
            lines = len(self._codes)
            span = (self._start, self._end, self._line0, lines, lines)
            parts = (self._keys.tobytes(), bytes(self._codes))
            _write_block(
                f, ENTRIES, sample, span, parts, 9 * lines, self._extras, self._max_finished
            )
            f.flush()
        except OSError:
            self.close()  # a cache: the next resume parses what it lacks
            return
        self._start, self._line0 = self._end, self._line0 + len(self._codes)
        self._keys, self._codes, self._extras, self._max_finished = (
            array("Q"),
            bytearray(),
            Extras(),
            "",
        )

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
