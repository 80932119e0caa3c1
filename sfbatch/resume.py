"""The resume index: what earlier runs recorded, keyed by item id *and* fingerprint.

A row is skipped only when a record with its id and its fingerprint is done, so an edited
row, another ``--model`` or another base seed is made again while a row that merely moved
is not. :func:`read_index` reads manifests of millions of lines flat and fast:

- each record is one entry of a :class:`~sfbatch.identity.KeyTable`: the key mixes the
  id's hash with the 64-bit fingerprint, the value is the latest status; about 6.5 bytes a
  record (10M records: ~65 MB), never a dict of strings;
- a record is taken from the front of its line with one regex (``id``, ``status``,
  ``finished_at``, ``billed_images``, ``fingerprint``: the writer puts them first), and
  trusted only if the line is complete: it ends with ``}`` and holds no second record
  start (a ``{"id":"`` outside a string can only begin a record). Any other line is
  parsed in full; one that does not parse is *damaged*: listed in
  :attr:`ResumeIndex.damaged` with its line number, and its item is made again. A
  complete record glued behind a torn one (a crash mid-line, then appends) is recovered.
- records written before fingerprints existed (line ids ``000000042``) get the
  fingerprint of the fields they stored; a row whose content matches one adopts its
  line id and seed (:meth:`ResumeIndex.adopt`), so upgrading pays nothing again.
- the side file ``manifest.idx`` (:mod:`sfbatch.sideindex`, a cache) says all this for
  the manifest bytes it covers: only the rest is read as above. After a resume that read
  much of a manifest as text, :func:`refresh_side` writes it afresh (a snapshot of the
  tables, loaded back with no per-key work).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import re
import struct
import time
import zlib
from array import array
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, NamedTuple

import orjson

from sfbatch import sideindex
from sfbatch.identity import KeyTable, content_digest, content_of_record, fingerprint, item_key
from sfbatch.loader import IdSpace, Jump
from sfbatch.manifest import FRONT_RE, REPAIRED_CODE, STATUS_CODES, STATUSES

__all__ = [
    "DAMAGED",
    "DAMAGED_CODE",
    "Billed",
    "Cursor",
    "DamagedLine",
    "ResumeIndex",
    "SourceRead",
    "cursor_path",
    "item_key",
    "read_index",
    "refresh_side",
]

_CODE: Final = STATUS_CODES
#: The index's name for a ``failed`` record with error code ``damaged`` (written by
#: ``sfbatch verify --repair`` for an ok item whose files are missing or damaged): it is
#: made again even without ``--retry-failed``. Counted as ``failed``.
DAMAGED: Final = "damaged"
DAMAGED_CODE: Final = "damaged"
_NAMES: Final = (*STATUSES, DAMAGED)
_DAMAGED_BYTE: Final = bytes((REPAIRED_CODE,))
_DAMAGED_FIELD: Final = b'"code":"damaged"'
_RECORD_START: Final = b'{"id":"'
# A whole clean line: the front fields, then anything up to the closing brace.
_WHOLE_LINE_RE: Final = re.compile(rb"^" + FRONT_RE.pattern + rb"[^\n]*\}\n", re.MULTILINE)
#: Billed lines older than this before now can no longer fall on the account's current day.
_BILLING_HORIZON_S: Final = 48 * 3600.0
#: Records read as text (not from ``manifest.idx``) above which :func:`refresh_side`
#: rewrites the side file.
_REFRESH_RECORDS: Final = 20_000


class Billed(NamedTuple):
    """Where recent billed images go: the minute they finished in, the key, the model."""

    minute: str  # finished_at cut to the minute, then ":00.000Z"
    key_index: int
    model: str


def _minute(finished_at: str) -> str:
    # day_start_iso is a whole minute: a minute compares with it as its records do
    return finished_at[:16] + ":00.000Z" if len(finished_at) >= 16 else finished_at


@dataclass
class SourceRead:
    """How one manifest was read: from its side file up to ``side_end``, then as text."""

    side_end: int = 0
    end: int = 0  # after the last complete line
    lines: int = 0
    side_records: int = 0
    snapshot_records: int = 0  # of side_records: loaded with no per-key work
    text_records: int = 0
    #: Where the last block or chunk holding a record not ``ok`` (or a damaged line) ends.
    not_ok_end: int = 0


@dataclass(frozen=True, slots=True)
class DamagedLine:
    """A manifest line that is not a complete record; its item is made again."""

    path: Path
    line: int
    reason: str


@dataclass
class ResumeIndex:
    """What earlier runs recorded: each (id, fingerprint)'s latest status, today's billing."""

    #: Items with an ``ok`` record (most of them: 5 bytes each) ...
    done: KeyTable = field(default_factory=KeyTable)
    #: ... and items whose latest record is another status, with its code (6 bytes each).
    #: An item in both is in ``other``'s status (an ``ok`` record takes it out of ``other``).
    other: KeyTable = field(default_factory=lambda: KeyTable(value_size=1))
    # One bit per 2**-20 of the key space: set if a key there was ever put in ``other``.
    _maybe_other: bytearray = field(default_factory=lambda: bytearray(1 << 17))
    #: Full records of items paid for but not downloaded, by :func:`item_key` (a later
    #: record of the item makes its entry stale: :meth:`generated_record` checks).
    generated: dict[int, dict[str, Any]] = field(default_factory=dict)
    billed_today: int = 0
    #: Today's billed images by (key index, model): what each key's daily quota has used.
    billed_by: Counter[tuple[int, str]] = field(default_factory=Counter)
    #: Images billed since the billing horizon, by minute, key and model (kept for
    #: :func:`refresh_side`: a few thousand entries at most).
    billing: Counter[Billed] = field(default_factory=Counter)
    sources: dict[Path, SourceRead] = field(default_factory=dict)
    records: int = 0
    legacy_records: int = 0
    damaged: list[DamagedLine] = field(default_factory=list)
    # Legacy (line-id) records by content: digest prefix -> line numbers.
    _legacy_content: dict[bytes, list[int]] = field(default_factory=dict)
    _claimed: set[str] = field(default_factory=set)
    _day_start: str = ""
    _horizon: str = ""
    #: Items matched in bulk (all ``ok``): the done prefix a resume cursor jumped past.
    premarked: int = 0
    _not_ok_seen: int = 0

    def billed_today_for(self, key_index: int, model: str) -> int:
        """Images billed today to key ``key_index`` for ``model`` (records without a
        ``key_index`` were made by key 0)."""
        return self.billed_by.get((key_index, model), 0)

    def status(self, row_id: str, fp: str) -> str | None:
        """The latest status recorded for this id and fingerprint (or :data:`DAMAGED`), or None."""
        key = item_key(row_id, fp)
        value = self.other.get(key)
        if value is not None:
            return _NAMES[value[0] - 1]
        return "ok" if key in self.done else None

    def match(self, row_id: str, fp: str) -> str | None:
        """:meth:`status`, and mark the item as one the current input asks for.

        Items never matched are *history* (rows edited away or removed); the run's counts
        and exit code come from matched items only (:meth:`counts` with ``matched=True``).
        """
        key = item_key(row_id, fp)
        bit = (key >> 20) & 0xFFFFF
        value = None
        if self._maybe_other[bit >> 3] & (1 << (bit & 7)):
            value = self.other.mark(key)
        done = self.done.mark(key) is not None
        if value is not None:
            return _NAMES[value[0] - 1]
        return "ok" if done else None

    def done_check(
        self, *, retry_failed: bool, skipped_as: Counter[str] | None = None
    ) -> Callable[[str, str], bool]:
        """``is_done(id, fp)`` for the loader: :meth:`match`, then "skip this row?" (each
        skip counted in ``skipped_as`` by the status found)."""
        match = self.match
        tally: Counter[str] = Counter() if skipped_as is None else skipped_as

        def is_done(row_id: str, fp: str) -> bool:
            status = match(row_id, fp)
            if status == "ok" or (status == "failed" and not retry_failed):
                tally[status] += 1
                return True
            return False

        return is_done

    def seal(self) -> None:
        """Everything read so far is history until :meth:`match` finds it in the input."""
        self.done.seal()
        self.other.seal()

    def generated_record(self, row_id: str, fp: str) -> dict[str, Any] | None:
        """The record of an item paid for but not downloaded, if that is its latest status."""
        if self.status(row_id, fp) != "generated":
            return None
        return self.generated.get(item_key(row_id, fp))

    def set_status(self, row_id: str, fp: str, status: str) -> None:
        self._set(item_key(row_id, fp), _CODE_BYTE[status])

    def _set(self, key: int, code: bytes) -> None:
        if code == _OK:
            self._leave_other(key)
            self.done.put(key)
        else:
            self._enter_other(key, code)

    def _enter_other(self, key: int, code: bytes) -> None:
        self._not_ok_seen += 1
        bit = (key >> 20) & 0xFFFFF
        self._maybe_other[bit >> 3] |= 1 << (bit & 7)
        self.other.put(key, code)

    def _leave_other(self, key: int) -> None:
        bit = (key >> 20) & 0xFFFFF
        if self._maybe_other[bit >> 3] & (1 << (bit & 7)):
            self.other.discard(key)

    def counts(self, matched: bool | None = None) -> Counter[str]:
        """How many (id, fingerprint) items are in each latest status: all of them, or
        only those the current input matched (``True``), or only history (``False``)."""
        counts: Counter[str] = Counter()
        done_size = self.done.size
        if matched is not None:
            done_size = self.done.matched_size()
            if not matched:
                done_size = self.done.size - done_size
        in_both = sum(1 for key in self.other.iter_keys(matched) if key in self.done)
        ok = done_size - in_both
        if matched is not None and self.premarked:  # matched in bulk, all ok
            ok = ok + self.premarked if matched else max(0, ok - self.premarked)
        if ok:
            counts["ok"] = ok
        for code, n in self.other.first_value_bytes(matched).items():
            if n and 1 <= code <= len(STATUSES):
                counts[STATUSES[code - 1]] += n
            elif n and code == _DAMAGED_BYTE[0]:
                counts["failed"] += n
        return counts

    @property
    def damaged_lines(self) -> list[int]:
        return [d.line for d in self.damaged]

    def adopt(
        self, line: int, digest: bytes, fingerprint_of: Callable[[str], str], suffix: str
    ) -> str | None:
        """The legacy line id this content was made under (see :class:`~sfbatch.loader.LegacyIds`).

        Tried: the row's own line (the file did not change), then every legacy record of
        the same content not adopted yet (lines moved). A legacy id is adopted once.
        """
        if not self.legacy_records:
            return None
        candidates = [line, *self._legacy_content.get(digest[:8], ())]
        for number in candidates:
            legacy_id = f"{number:09d}"
            if legacy_id in self._claimed:
                continue
            if self.status(legacy_id + suffix, fingerprint_of(legacy_id)) is not None:
                self._claimed.add(legacy_id)
                return legacy_id
        return None

    # -- reading -----------------------------------------------------------------

    def _add(self, row_id: str, status: str, fp: str) -> None:
        self.records += 1
        self.set_status(row_id, fp, status)

    def _bill(self, record: dict[str, Any]) -> None:
        """Keep a record's billing if it is recent (see :class:`Billed`)."""
        billed, finished = record.get("billed_images"), record.get("finished_at")
        if not (isinstance(billed, int) and billed > 0 and isinstance(finished, str)):
            return
        if finished >= self._horizon:
            key_index = record.get("key_index")
            model = str(record.get("model") or "")
            kept = key_index if isinstance(key_index, int) else 0
            self.billing[Billed(_minute(finished), kept, model)] += billed

    def _settle_billing(self) -> None:
        self.billed_today = 0
        self.billed_by.clear()
        for (minute, key_index, model), images in self.billing.items():
            if minute >= self._day_start:
                self.billed_today += images
                self.billed_by[key_index, model] += images

    def _add_parsed(self, record: dict[str, Any]) -> bool:
        """Add a fully parsed record; False if it is not one."""
        row_id, status = record.get("id"), record.get("status")
        if not isinstance(row_id, str) or status not in _CODE:
            return False
        fp = record.get("fingerprint")
        if not isinstance(fp, str):
            fp = self._legacy_fingerprint(row_id, record)
        self._add(row_id, str(status), fp)
        self._bill(record)
        if status == "failed" and _is_damaged(record):
            self._set(item_key(row_id, fp), _DAMAGED_BYTE)
        if status == "generated":
            self.generated[item_key(row_id, fp)] = record
        return True

    def _add_generated(self, record: dict[str, Any]) -> None:
        self.generated[item_key(record["id"], record["fingerprint"])] = record

    def _legacy_fingerprint(self, row_id: str, record: dict[str, Any]) -> str:
        self.legacy_records += 1
        content = content_of_record(record)
        if content is None:
            return ""
        digest = content_digest(content)
        seed = record.get("requested_seed")
        variation = record.get("variation")
        k = variation if isinstance(variation, int) else 0
        base = row_id.removesuffix(f"-v{k}") if k or row_id.endswith("-v0") else row_id
        if k == 0 and len(base) == 9 and base.isdigit():
            self._legacy_content.setdefault(digest[:8], []).append(int(base))
        return fingerprint(digest, seed if isinstance(seed, int) else None, k)


def read_index(paths: Iterable[Path], *, day_start: str, use_side: bool = True) -> ResumeIndex:
    """Read manifests back for resume (later lines win), each from its side file
    (``manifest.idx``) as far as that covers it (``use_side=False``: all as text).

    ``day_start`` (from :func:`~sfbatch.manifest.day_start_iso`) bounds "today" for the
    daily quota: records finished since then add their ``billed_images`` to
    ``billed_today`` and ``billed_by`` (every line counts, not only the latest of an item).
    """
    paths = list(paths)
    index = ResumeIndex(done=KeyTable(expected=_estimate_records(paths)))
    index._day_start = day_start
    horizon = datetime.fromtimestamp(time.time() - _BILLING_HORIZON_S, UTC)
    index._horizon = min(day_start, horizon.strftime("%Y-%m-%dT%H:%M:%S.000Z"))
    for path in paths:
        source = index.sources[path] = SourceRead()
        if use_side:
            _read_side(index, path, source)
        records = index.records
        _read_one(index, path, source)
        source.text_records = index.records - records
    index._settle_billing()
    index.seal()
    return index


def _read_side(index: ResumeIndex, path: Path, source: SourceRead) -> None:
    """Take what ``path``'s side file covers; ``source.side_end`` is where it stops."""
    for block in sideindex.read_blocks(path, extras_since=index._horizon):
        if block.snapshot is not None:
            index.done, index.other = block.snapshot.done, block.snapshot.other
            index._maybe_other = block.snapshot.maybe_other
            source.snapshot_records = block.records
            if block.snapshot.other.size:
                source.not_ok_end = block.end
        else:
            if block.codes.count(_OK) != len(block.codes):
                source.not_ok_end = block.end
            done: list[tuple[int, bytes]] = []
            for key, code in zip(block.keys, block.codes, strict=True):
                if code == _OK[0]:
                    index._leave_other(key)
                    done.append((key, b""))
                else:
                    index._enter_other(key, bytes((code,)))
            index.done.put_all(done)
        index.records += block.records
        source.side_records += block.records
        if block.extras is not None:
            for record in block.extras.generated:
                index._add_generated(record)
            index.damaged.extend(DamagedLine(path, n, why) for n, why in block.extras.damaged)
            if block.extras.damaged:
                source.not_ok_end = block.end
            for finished, images, key_index, model in block.extras.billed:
                if finished >= index._horizon:
                    index.billing[Billed(_minute(finished), key_index, model)] += images
        source.side_end = source.end = block.end
        source.lines = block.line0 + block.lines


def refresh_side(index: ResumeIndex, path: Path, *, min_records: int = _REFRESH_RECORDS) -> bool:
    """Rewrite ``path``'s side file as one snapshot of ``index`` (read from ``path`` alone)
    when more than ``min_records`` records were read one by one (as text, or from the
    writer's entries blocks), or the side file stops short of the manifest's last complete
    line. Not for manifests with records older than fingerprints (their line ids need
    the text). True if it was written.
    """
    source = index.sources.get(path)
    if source is None or len(index.sources) != 1 or index.legacy_records or not source.end:
        return False
    one_by_one = source.text_records + source.side_records - source.snapshot_records
    if one_by_one <= min_records and source.side_end == source.end:
        return False
    generated = [
        record
        for record in index.generated.values()
        if index.status(record["id"], record["fingerprint"]) == "generated"
    ]
    damaged = [(d.line, d.reason) for d in index.damaged if d.path == path]
    billed = [(b.minute, n, b.key_index, b.model) for b, n in index.billing.items()]
    extras = sideindex.Extras(generated, damaged, billed)
    snapshot = sideindex.Snapshot(index.done, index.other, index._maybe_other)
    return sideindex.write_snapshot(
        path, snapshot, end=source.end, lines=source.lines, records=index.records, extras=extras
    )


_CHUNK_BYTES: Final = 1 << 20
_CODE_OF: Final = {name.encode(): bytes((code,)) for name, code in _CODE.items()}
_CODE_BYTE: Final = {name: bytes((code,)) for name, code in _CODE.items()}
_OK: Final = _CODE_BYTE["ok"]
_GENERATED_FIELD: Final = b'","status":"generated","'


def _estimate_records(paths: list[Path]) -> int:
    """Lines in ``paths``, from their size and the mean length of the first 1 MB's lines."""
    total = sample_lines = sample_bytes = 0
    for path in paths:
        try:
            total += path.stat().st_size
            if not sample_lines:
                with open(path, "rb") as f:
                    sample = f.read(1 << 20)
                sample_lines, sample_bytes = sample.count(b"\n"), len(sample)
        except OSError:
            continue
    return total * sample_lines // sample_bytes if sample_lines else 0


def _read_one(index: ResumeIndex, path: Path, source: SourceRead) -> None:
    """Read one manifest from ``source.end`` in chunks of whole lines; a chunk of clean
    records is one regex pass.

    One buffer is reused for every chunk: fresh 1 MB buffers between the table's small
    allocations would strand heap memory (RSS) for the whole run.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115  (closed by the with below)
    except FileNotFoundError:
        return
    buf = bytearray(_CHUNK_BYTES)
    filled = 0
    line = source.lines  # lines before this chunk
    with f:
        f.seek(source.end)
        while True:
            with memoryview(buf) as view:
                n = f.readinto(view[filled:])
            if not n:
                break  # what is left is a torn last line: not a record
            filled += n
            cut = buf.rfind(b"\n", 0, filled) + 1
            if not cut:
                if filled == len(buf):
                    buf.extend(bytes(len(buf)))  # a line longer than the buffer
                continue
            seen = index._not_ok_seen, len(index.damaged)
            line = _read_chunk(index, path, buf, cut, line)
            source.end += cut
            source.lines = line
            if (index._not_ok_seen, len(index.damaged)) != seen:
                source.not_ok_end = source.end
            buf[: filled - cut] = buf[cut:filled]
            filled -= cut


def _read_chunk(index: ResumeIndex, path: Path, buf: bytearray, end: int, line: int) -> int:
    """Add the records of ``buf[:end]`` (whole lines after ``line``); the last line's number."""
    lines = buf.count(b"\n", 0, end)
    matches = _WHOLE_LINE_RE.findall(buf, 0, end)
    # Every line a clean record: as many record starts and regex matches as lines.
    if not len(matches) == lines == buf.count(_RECORD_START, 0, end):
        chunk = bytes(buf[:end])
        for number, raw in enumerate(chunk.split(b"\n")[:-1], start=line + 1):
            _line(index, path, number, raw + b"\n")
        return line + lines
    index.records += lines
    horizon = index._horizon.encode()
    billed_recently = False
    done: list[tuple[int, bytes]] = []
    maybe_other = index._maybe_other
    code_of = _CODE_OF
    crc32 = zlib.crc32
    others: set[bytes] = set()  # the statuses other than ok in this chunk
    for row_id, status, finished, billed, fp in matches:
        key = int(fp, 16) ^ (crc32(row_id) << 22)  # item_key(), inlined (FRONT_RE: fp is hex)
        if finished >= horizon and billed != b"0":
            billed_recently = True
        if status == b"ok":
            bit = (key >> 20) & 0xFFFFF
            if maybe_other[bit >> 3] & (1 << (bit & 7)):
                index.other.discard(key)
            done.append((key, b""))
        else:
            index._enter_other(key, code_of[status])
            others.add(status)
    index.done.put_all(done)
    # Each a pass over the chunk's bytes: only when a line it is for is in it.
    if billed_recently:
        _billing_in(index, buf, end, horizon)
    if b"generated" in others:
        _generated_in(index, buf, end)
    if b"failed" in others:  # a repair record is a failed one
        _damaged_in(index, buf, end)
    return line + lines


def _billing_in(index: ResumeIndex, buf: bytearray, end: int, horizon: bytes) -> None:
    """Keep the billing of every recent billed line of a clean chunk (parsed in full)."""
    for m in FRONT_RE.finditer(buf, 0, end):
        if m.group(4) != b"0" and m.group(3) >= horizon:
            stop = buf.find(b"\n", m.end(), end) + 1
            index._bill(orjson.loads(bytes(buf[m.start() : stop])))


def _generated_in(index: ResumeIndex, buf: bytearray, end: int) -> None:
    """Keep the full record of every ``generated`` line of a clean chunk."""
    pos = buf.find(_GENERATED_FIELD, 0, end)
    while pos >= 0:
        start = buf.rfind(b"\n", 0, pos) + 1
        stop = buf.find(b"\n", pos, end) + 1
        index._add_generated(orjson.loads(bytes(buf[start:stop])))
        pos = buf.find(_GENERATED_FIELD, stop, end)


def _damaged_in(index: ResumeIndex, buf: bytearray, end: int) -> None:
    """Re-read in full every line of a clean chunk that may be a repair record (rare)."""
    pos = buf.find(_DAMAGED_FIELD, 0, end)
    while pos >= 0:
        start = buf.rfind(b"\n", 0, pos) + 1
        stop = buf.find(b"\n", pos, end) + 1
        record = orjson.loads(bytes(buf[start:stop]))
        if record.get("status") == "failed" and _is_damaged(record):
            index._set(item_key(record["id"], record["fingerprint"]), _DAMAGED_BYTE)
        pos = buf.find(_DAMAGED_FIELD, stop, end)


def _is_damaged(record: dict[str, Any]) -> bool:
    error = record.get("error")
    return isinstance(error, dict) and error.get("code") == DAMAGED_CODE


def _line(index: ResumeIndex, path: Path, number: int, raw: bytes) -> None:
    m = FRONT_RE.match(raw)
    if m is not None and raw.endswith(b"}\n") and raw.find(_RECORD_START, 1) < 0:
        status = m.group(2).decode()
        recent = m.group(4) != b"0" and m.group(3) >= index._horizon.encode()
        if status != "generated" and status in _CODE and _DAMAGED_FIELD not in raw and not recent:
            index._add(m.group(1).decode("utf-8", "surrogatepass"), status, m.group(5).decode())
            return
    _slow_line(index, path, number, raw)


def _slow_line(index: ResumeIndex, path: Path, number: int, raw: bytes) -> None:
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        record = None
    if isinstance(record, dict):
        if not index._add_parsed(record):
            index.damaged.append(DamagedLine(path, number, "not a manifest record"))
        return
    index.damaged.append(DamagedLine(path, number, "not a complete JSON record"))
    start = raw.rfind(_RECORD_START)
    if start > 0:  # a torn record with a complete one glued behind it
        try:
            glued = orjson.loads(raw[start:])
        except orjson.JSONDecodeError:
            return
        if isinstance(glued, dict):
            index._add_parsed(glued)


# -- the resume cursor ---------------------------------------------------------------

_CURSOR_MAGIC: Final = b"SFBCUR\x00\x01"
_CURSOR_HEAD: Final = struct.Struct("<8sI")  # magic, header JSON bytes
#: Fewer done rows at the start of a file than this are not worth a cursor file.
_CURSOR_MIN_ROWS: Final = 10_000


def cursor_path(manifest: Path) -> Path:
    """``manifest.jsonl`` -> ``manifest.cursor``."""
    return manifest.with_suffix(".cursor")


class Cursor:
    """How far the rows of a job's first ``.txt`` file were all ``ok`` already, kept in
    ``manifest.cursor`` (a cache like ``manifest.idx``: safe to delete), so the next resume
    jumps there instead of rebuilding each done row's id and fingerprint
    (:class:`sfbatch.loader.ResumeCursor`).

    It holds the rows, lines and bytes of that done prefix, a blake2b of those bytes,
    what else the rows' ids depend on (``identity``: the defaults, the base seed...), the
    content-id repeat counts after them, and where the manifest ended when the run that
    wrote it read it. It is used only if all of that still holds and no record after that
    point is anything but ``ok`` (so no done prefix row can have become undone); the items
    jumped past count as matched (``ResumeIndex.premarked``).
    """

    def __init__(
        self,
        index: ResumeIndex,
        manifest: Path,
        skipped_as: Counter[str],
        *,
        min_rows: int | None = None,
    ) -> None:
        self.path = cursor_path(manifest)
        self._index = index
        self._manifest = manifest
        self._skipped_as = skipped_as
        self._min_rows = _CURSOR_MIN_ROWS if min_rows is None else min_rows
        self._source = index.sources.get(manifest, SourceRead())
        self._jumped = 0

    def jump(self, path: str, identity: bytes) -> Jump | None:
        if self._index.legacy_records:
            return None
        try:
            with open(self.path, "rb") as f:
                return self._read(f, path, identity)
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            return None

    def _read(self, f: io.BufferedReader, path: str, identity: bytes) -> Jump | None:
        magic, size = _CURSOR_HEAD.unpack(f.read(_CURSOR_HEAD.size))
        head_raw = f.read(size)
        if magic != _CURSOR_MAGIC or len(head_raw) != size:
            return None
        head = orjson.loads(head_raw)
        if head["file"] != path or head["identity"] != identity.hex():
            return None
        end = int(head["manifest_end"])
        source = self._source
        st = self._manifest.stat()
        if [st.st_dev, st.st_ino] != head["manifest"] or end > source.end:
            return None
        if source.not_ok_end > end:
            return None  # a record since may have undone a row of the prefix
        with open(self._manifest, "rb") as text:
            if end and sideindex.tail_crc(text, 0, end) != head["manifest_tail"]:
                return None
        offset, lines = int(head["offset"]), int(head["lines"])
        if _prefix_digest(path, lines) != (offset, head["input"]):
            return None
        crc = zlib.crc32(head_raw)
        raw = f.read(8 * (1 << 14))
        lengths = array("Q")
        lengths.frombytes(raw)
        crc = zlib.crc32(raw, crc)
        short = False

        def read(n: int) -> bytearray:
            nonlocal crc, short
            buf = bytearray(n)
            short = short or f.readinto(buf) != n
            crc = zlib.crc32(buf, crc)
            return buf

        repeats = KeyTable(value_size=1)
        repeats.load(lengths, read)
        tail = f.read(4)
        if short or len(tail) != 4 or int.from_bytes(tail, "little") != crc:
            return None
        rows = int(head["rows"])
        self._index.premarked = self._jumped = rows  # one cursor, for the job's first file
        many = {int(k): int(v) for k, v in head["many"]}
        return Jump(rows, lines, offset, repeats, many)

    def reached(self, path: str, identity: bytes, rows: int, lines: int, space: IdSpace) -> None:
        if rows < self._min_rows or any(n for s, n in self._skipped_as.items() if s != "ok"):
            return
        if rows <= self._jumped:
            return  # no further than the cursor it jumped with (which still holds)
        if self._index.legacy_records or not self._source.end:
            return
        try:
            with open(self._manifest, "rb") as text:
                tail = sideindex.tail_crc(text, 0, self._source.end)
            st = self._manifest.stat()
            offset, digest = _prefix_digest(path, lines)
            repeats, many = space.repeats
            head = orjson.dumps(
                {
                    "file": path,
                    "identity": identity.hex(),
                    "rows": rows,
                    "lines": lines,
                    "offset": offset,
                    "input": digest,
                    "manifest": [st.st_dev, st.st_ino],
                    "manifest_end": self._source.end,
                    "manifest_tail": tail,
                    "many": sorted(many.items()),
                }
            )
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(_CURSOR_HEAD.pack(_CURSOR_MAGIC, len(head)) + head)
                crc = zlib.crc32(head)
                for part in itertools.chain(
                    (repeats.bucket_lengths().tobytes(),), repeats.bucket_bytes()
                ):
                    crc = zlib.crc32(part, crc)
                    f.write(part)
                f.write(crc.to_bytes(4, "little"))
            os.replace(tmp, self.path)
        except (OSError, ValueError):
            return  # a cache: the next resume takes the long way


def _prefix_digest(path: str, lines: int) -> tuple[int, str]:
    """The byte offset after ``lines`` lines of ``path``, and blake2b of the bytes before it."""
    h = hashlib.blake2b(digest_size=16)
    offset = 0
    left = lines
    with open(path, "rb") as f:
        while left:
            chunk = f.read(1 << 20)
            if not chunk:
                raise ValueError("the file has fewer lines than the cursor says")
            n = chunk.count(b"\n")
            if n >= left:
                cut = -1
                for _ in range(left):
                    cut = chunk.index(b"\n", cut + 1)
                chunk = chunk[: cut + 1]
                n = left
            h.update(chunk)
            offset += len(chunk)
            left -= n
    return offset, h.hexdigest()
