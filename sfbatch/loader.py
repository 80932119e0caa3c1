"""Stream prompt files into validated :class:`Row` objects, one line at a time.

Formats, chosen by extension (each may end in ``.gz``): ``.txt`` (one prompt per
line), ``.jsonl`` (one object per line with ``prompt`` and optional request fields
and ``id``), ``.csv`` / ``.tsv`` (a header row naming the same fields). ``-`` reads
stdin as ``.txt``, or as ``.jsonl`` when its first non-blank line starts with ``{``.

Input images of edit models (``image``, ``image2``, ``image3``: a path relative to the
prompt file, a URL or a data URI) are checked while the row is read (:mod:`sfbatch.inputs`).

A row that cannot be sent (bad UTF-8, bad JSON, a field out of range for its model,
an unsafe or duplicate id, a missing or non-image input file) becomes an *invalid*
:class:`Row` whose ``error`` names the file and line; the rest of the file goes on.
Only a file that cannot be opened or read at all raises
(:class:`~sfbatch.errors.InputFileError`)::

    >>> import io
    >>> data = b'{"prompt": "a cat", "seed": 1}\\n\\n{"prompt": "a dog", "batch_size": 9}\\n'
    >>> for row in PromptSource("-", stdin=io.BytesIO(data)):    # or "prompts.csv.gz"
    ...     print(row.id, row.request if row.valid else row.error)
    3202f6a5aabe {'prompt': 'a cat', 'seed': 1, 'model': 'Kwai-Kolors/Kolors'}
    ec58be108a11 -:3: batch_size must be 1..4, got 9

Memory does not grow with the file, with two documented exceptions: explicit row ids
are remembered (to reject duplicates), and with ``dedupe`` one 16-byte fingerprint
plus the first id is remembered per distinct request.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import functools
import gzip
import hashlib
import io
import itertools
import logging
import os
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, Final, Protocol

import orjson

from sfbatch.config import RequestDefaults
from sfbatch.errors import ConfigError, InputFileError
from sfbatch.identity import (
    CONTENT_ID_HEX,
    KeyTable,
    content_digest,
    content_id,
    content_of_request,
    content_prefix,
    fingerprint,
)
from sfbatch.inputs import IMAGE_FIELDS, ImageInput, InputChecker, InputImageError
from sfbatch.models import REQUEST_FIELDS, SEED_MAX, ModelRegistry, validate_request

if TYPE_CHECKING:
    from sfbatch.modelcheck import ModelOffer

__all__ = [
    "FORMATS",
    "ROW_FIELDS",
    "SKIPPED",
    "IdSpace",
    "JobRows",
    "Jump",
    "LegacyIds",
    "PromptSource",
    "ResumeCursor",
    "Row",
    "SkippedRows",
    "derive_seed",
    "image_shard_dir",
    "shard_of",
]

log = logging.getLogger("sfbatch")

FORMATS: Final = (".txt", ".jsonl", ".csv", ".tsv")
#: Request fields a JSONL row or CSV column may set (``id`` is not sent).
ROW_FIELDS: Final = frozenset(REQUEST_FIELDS)
_KNOWN_KEYS: Final = ROW_FIELDS | {"id"}
_FAST_KEYS: Final = frozenset({"prompt", "id"})
_ID_MAX: Final = 200
_SEED_MOD: Final = SEED_MAX + 1
_BOM: Final = b"\xef\xbb\xbf"
_BLANK_BYTES: Final = b" \t\r\x0b\x0c"
# What a failing gzip/zlib stream or a failing disk raises while we read.
_READ_ERRORS: Final = (OSError, EOFError, zlib.error)
_NO_DEFAULTS: Final = RequestDefaults()

# (line, prompt of a .txt row, fields of a .jsonl/.csv row, problems found while parsing)
_Parsed = tuple[int, str | None, dict[str, Any] | None, list[str] | None]


@dataclass(frozen=True, slots=True)
class Row:
    """One item to generate, or an invalid input row to record as such.

    ``request`` is the validated body to send (with ``model``, ``prompt`` and
    ``seed`` always set) and ``error`` is ``None``; or ``request`` is ``None`` and
    ``error`` says why, as ``"FILE:LINE: reason; reason"``. ``fingerprint`` is
    :func:`sfbatch.identity.fingerprint` of what the row asks for (see there).

    ``inputs`` are the checked input images of a valid row, in the order ``image``,
    ``image2``, ``image3``; ``request`` holds their sources as written (a local file
    becomes a data URI only when it is sent: :func:`sfbatch.inputs.materialize`).
    """

    id: str
    line: int
    file: str
    variation: int
    request: dict[str, Any] | None
    error: str | None
    prompt: str | None
    duplicate_of: str | None = None
    fingerprint: str = ""
    inputs: tuple[ImageInput, ...] = ()

    @property
    def valid(self) -> bool:
        return self.error is None

    @property
    def input_digests(self) -> tuple[str, ...]:
        """Per input, in field order: its sha256, or for a URL the URL itself."""
        return tuple(item.identity for item in self.inputs)


# A frozen dataclass's __init__ sets each field through object.__setattr__, which
# makes it the costliest step per row; setting the slots directly halves that.
_new_object = object.__new__
_S_ID, _S_LINE, _S_FILE, _S_VAR, _S_REQ, _S_ERR, _S_PROMPT, _S_DUP, _S_FP, _S_INPUTS = (
    getattr(Row, name).__set__ for name in Row.__slots__
)


def _row(
    row_id: str,
    line: int,
    file: str,
    variation: int,
    request: dict[str, Any] | None,
    error: str | None,
    prompt: str | None,
    duplicate_of: str | None = None,
    fingerprint: str = "",
    inputs: tuple[ImageInput, ...] = (),
) -> Row:
    row: Row = _new_object(Row)
    _S_ID(row, row_id)
    _S_LINE(row, line)
    _S_FILE(row, file)
    _S_VAR(row, variation)
    _S_REQ(row, request)
    _S_ERR(row, error)
    _S_PROMPT(row, prompt)
    _S_DUP(row, duplicate_of)
    _S_FP(row, fingerprint)
    _S_INPUTS(row, inputs)
    return row


#: What the loader yields for a row the resume index says is done, instead of building it
#: (see ``PromptSource.done``): the pipeline only counts it as skipped.
SKIPPED: Final = _row("", 0, "", 0, None, "done already", None)

#: ``done(id, fingerprint)``: is this row done already (so it need not be built)?
DoneCheck = Callable[[str, str], bool]


@dataclass(frozen=True, slots=True)
class SkippedRows:
    """``count`` rows at the start of a file found done in bulk (see :class:`ResumeCursor`):
    the loader yields this once instead of ``count`` :data:`SKIPPED`, building none of them."""

    count: int


@dataclass(frozen=True, slots=True)
class Jump:
    """Where a file's done prefix ends: ``rows`` rows in ``lines`` lines, ``offset`` bytes,
    and the content-id repeat counts (:class:`IdSpace`) as they were after them."""

    rows: int
    lines: int
    offset: int
    repeats: KeyTable
    many: dict[int, int]


class ResumeCursor(Protocol):
    """Remembers, across runs, how far a plain ``.txt`` file's rows were all done already
    (:class:`sfbatch.resume.Cursor`), so a resume jumps past them instead of rebuilding
    each row's id and fingerprint. ``identity`` says everything the rows' ids and
    fingerprints depend on besides the file's bytes (which the cursor checks)."""

    def jump(self, path: str, identity: bytes) -> Jump | None: ...

    def reached(self, path: str, identity: bytes, rows: int, lines: int, space: IdSpace) -> None:
        """The first ``rows`` rows (``lines`` lines) were all skipped as done."""
        ...


class LegacyIds(Protocol):
    """What the resume index knows of records written before ids came from content."""

    def adopt(
        self, line: int, digest: bytes, fingerprint_of: Callable[[str], str], suffix: str
    ) -> str | None:
        """The line id (``000000042``) under which this content was made, if one was.

        ``fingerprint_of(candidate)`` is the row's variation-0 fingerprint had it that id
        (its derived seed depends on the id); ``suffix`` is ``"-v0"`` with variations.
        """
        ...


class IdSpace:
    """The ids handed out in one pass over a job's inputs, so that they never collide.

    Explicit ids are remembered with their ``file:line`` (a repeat anywhere in the job
    is invalid, naming both places); content ids count repeats of the same content
    (5-6 bytes per distinct content, in a :class:`~sfbatch.identity.KeyTable`).
    """

    def __init__(
        self,
        legacy: LegacyIds | None = None,
        done: DoneCheck | None = None,
        cursor: ResumeCursor | None = None,
    ) -> None:
        self.legacy = legacy
        self.done = done
        self.cursor = cursor
        self._explicit: dict[str, str] = {}
        self._repeats = KeyTable(value_size=1)
        self._many: dict[int, int] = {}  # repeats beyond 254
        self._first: dict[bytes, str] = {}  # with dedupe: content -> first id

    def claim(self, row_id: str, place: str) -> str | None:
        """Take an explicit id for the row at ``place``; the earlier place if it was taken."""
        first = self._explicit.get(row_id)
        if first is not None:
            return first
        if self._is_issued_content_id(row_id):
            return "an earlier row with the content this id names"
        self._explicit[row_id] = place
        return None

    def content_id(self, digest: bytes) -> str:
        """The id of the next row with this content digest (``abcdef012345``, then ``-2``...)."""
        key = int.from_bytes(digest[: CONTENT_ID_HEX // 2], "big")
        while True:
            seen = self._bump(key)
            row_id = content_id(digest, seen)
            if row_id not in self._explicit:
                return row_id

    def first_with(self, digest: bytes, row_id: str) -> str | None:
        """With dedupe: the first id given this content, or None if ``row_id`` is the first."""
        first = self._first.setdefault(digest, row_id)
        return None if first == row_id else first

    @property
    def fresh(self) -> bool:
        """No id handed out yet (a resume cursor applies only to a job's first file)."""
        return not (self._repeats.size or self._explicit or self._first)

    @property
    def repeats(self) -> tuple[KeyTable, dict[int, int]]:
        """The content-id repeat counts (what a :class:`Jump` restores)."""
        return self._repeats, self._many

    def restore(self, jump: Jump) -> None:
        self._repeats, self._many = jump.repeats, dict(jump.many)

    def unbump(self, digest: bytes) -> None:
        """Take back the last :meth:`content_id` of this digest (no explicit ids taken)."""
        key = int.from_bytes(digest[: CONTENT_ID_HEX // 2], "big")
        count = self._many.pop(key, 0) - 1 if key in self._many else 0
        if count >= 255:
            self._many[key] = count
            return
        found = self._repeats.get(key)
        left = (found[0] if found is not None else 0) - 1 if count <= 0 else count
        if left <= 0:
            self._repeats.discard(key)
        else:
            self._repeats.put(key, bytes((min(left, 255),)))

    def _bump(self, key: int) -> int:
        count = self._repeats.bump(key)
        if count == 255:  # the byte is full: the dict counts on
            count = self._many[key] = self._many.get(key, 254) + 1
        return count

    def _is_issued_content_id(self, row_id: str) -> bool:
        base, _, nth = row_id.partition("-")
        if len(base) != CONTENT_ID_HEX or (nth and not nth.isdigit()):
            return False
        try:
            key = int(base, 16)
        except ValueError:
            return False
        found = self._repeats.get(key)
        if found is None:
            return False
        count = self._many.get(key, 254) if found[0] == 255 else found[0]
        return (int(nth) if nth else 1) <= count


class JobRows:
    """The rows of several prompt files as one job: ids are unique across the files.

    Iterating starts afresh each time (like :class:`PromptSource`). ``legacy`` is set by
    the pipeline once it has read the manifest.
    """

    def __init__(self, sources: Iterable[PromptSource]) -> None:
        self.sources = list(sources)
        self.legacy: LegacyIds | None = None
        self.done: DoneCheck | None = None
        self.cursor: ResumeCursor | None = None

    def __iter__(self) -> Iterator[Row]:
        space = IdSpace(self.legacy, self.done, self.cursor)
        for source in self.sources:
            yield from source.rows(space)


def derive_seed(base_seed: int, row_id: str, variation: int) -> int:
    """A seed in ``0..SEED_MAX`` that depends only on its arguments (stable across runs).

    It is blake2b (8 bytes) of ``f"{base_seed}:{variation}:{row_id}"``, mod ``SEED_MAX + 1``.

    >>> derive_seed(0, "000000001", 0) == derive_seed(0, "000000001", 0)
    True
    """
    return _seed_from(_seed_prefix(base_seed, variation), row_id)


@functools.lru_cache(maxsize=1024)
def _seed_prefix(base_seed: int, variation: int) -> hashlib.blake2b:
    return hashlib.blake2b(f"{base_seed}:{variation}:".encode(), digest_size=8)


def _seed_from(prefix: hashlib.blake2b, row_id: str) -> int:
    # Copying a primed hash is ~40% cheaper than hashing the whole string afresh.
    h = prefix.copy()
    h.update(row_id.encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest(), "big") % _SEED_MOD


def shard_of(row_id: str, count: int) -> int:
    """The shard (``0..count-1``) a row id belongs to: blake2b (8 bytes) of the id mod count."""
    if count < 1:
        raise ValueError(f"shard count must be at least 1, got {count}")
    digest = hashlib.blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def image_shard_dir(row_id: str) -> str:
    """The ``images/SHARD`` directory name (``"000"``..``"999"``) of a row id.

    >>> image_shard_dir("000042017")
    '042'
    """
    if row_id.isascii() and row_id.isdigit():
        value = (int(row_id) // 1000) % 1000
    else:
        value = int(hashlib.blake2b(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:3], 16)
        value %= 1000
    return f"{value:03d}"


def _format_of(name: str) -> tuple[str, bool]:
    lower = name.lower()
    gz = lower.endswith(".gz")
    if gz:
        lower = lower[:-3]
    ext = os.path.splitext(lower)[1]
    if ext not in FORMATS:
        if os.path.isdir(name):
            raise ConfigError(f"{name} is a directory, not a prompt file")
        if ext == ".toml":
            raise ConfigError(
                f"{name} is a job file, not a prompt file: give one of the job's inputs"
            )
        supported = ", ".join(f"{f}, {f}.gz" for f in FORMATS)
        raise ConfigError(
            f"{name}: unknown prompt file type; supported: {supported}, or - for stdin"
        )
    return ext, gz


def _id_problem(row_id: str) -> str | None:
    if not row_id:
        return "id is empty"
    if len(row_id) > _ID_MAX:
        return f"id is longer than {_ID_MAX} characters"
    if row_id[0] == "." or "/" in row_id or "\\" in row_id:
        return f"id {row_id!r} would escape the output directory"
    if not row_id.isprintable() and any(ord(c) < 32 or ord(c) == 127 for c in row_id):
        return f"id {row_id!r} contains a control character"
    return None


def _coerce_id(value: Any) -> tuple[str | None, str | None]:
    """``(id, None)`` or ``(None, reason)`` for the ``id`` of a row."""
    if isinstance(value, str):
        row_id = value
    elif isinstance(value, int) and not isinstance(value, bool):
        row_id = str(value)
    elif isinstance(value, float):
        row_id = str(int(value)) if value.is_integer() else repr(value)
    else:
        return None, f"id must be a string or a number, got {value!r}"
    problem = _id_problem(row_id)
    return (None, problem) if problem else (row_id, None)


def _has_surrogates(text: str) -> bool:
    # surrogateescape turns each undecodable byte into a lone surrogate.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _csv_int(cell: str) -> int:
    try:
        return int(cell)
    except ValueError:
        number = float(cell)  # spreadsheets write 5 as "5.0"
        if number.is_integer():
            return int(number)
        raise


_TRUE: Final = frozenset({"true", "1", "yes"})
_FALSE: Final = frozenset({"false", "0", "no"})


def _csv_bool(cell: str) -> bool:
    lower = cell.lower()
    if lower in _TRUE:
        return True
    if lower in _FALSE:
        return False
    raise ValueError(cell)


_CSV_CONVERTERS: Final[dict[str, tuple[Callable[[str], Any], str]]] = {
    "seed": (_csv_int, "an integer"),
    "batch_size": (_csv_int, "an integer"),
    "num_inference_steps": (_csv_int, "an integer"),
    "guidance_scale": (float, "a number"),
    "cfg": (float, "a number"),
    "prompt_enhancement": (_csv_bool, "true/false/1/0/yes/no"),
}


class PromptSource:
    """Streams rows from a prompt file; iterating is synchronous and lazy.

    Each iteration re-opens the file (stdin can be read once) and starts afresh;
    run one iteration at a time. ``bytes_read`` / ``total_bytes`` give progress
    when the number of rows is unknown.

    Seeds: variation 0 gets the row's ``seed``, else ``defaults.seed``, else
    ``derive_seed(base_seed, id, 0)``; variation ``k > 0`` gets
    ``derive_seed(source, id, k)`` where ``source`` is the row's or default seed
    when one is given, else ``base_seed`` (``id`` is always the base id, without
    ``-vK``).

    ``limit`` counts input rows (valid and invalid, not blank lines) *before*
    sharding and before variations, so the shards of a limited run partition
    exactly the rows the unsharded limited run would make.

    A row whose id cannot be used (unsafe, or a repeat of an earlier explicit id) is
    yielded invalid under the line-derived id ``f"{line:09d}"``, so its record never
    supersedes the record of the row that owns the id. A JSON ``null`` or an empty
    CSV cell means "not given": the default applies.

    ``offer``: the models the endpoint lists (:func:`sfbatch.modelcheck.fetch_offer`); a
    row naming another is invalid, saying what the endpoint offers.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        defaults: RequestDefaults = _NO_DEFAULTS,
        registry: ModelRegistry | None = None,
        base_seed: int = 0,
        variations: int = 1,
        shard: tuple[int, int] | None = None,
        limit: int | None = None,
        dedupe: bool = False,
        stdin: BinaryIO | None = None,
        offer: ModelOffer | None = None,
    ) -> None:
        self.file = str(path)
        self.warnings: list[str] = []
        self._unknown_fields: set[str] = set()
        self.total_bytes: int | None = None
        self._warned: set[str] = set()
        self._stdin = stdin
        self._is_stdin = self.file == "-"
        if isinstance(variations, bool) or not isinstance(variations, int) or variations < 1:
            raise ConfigError(f"variations must be a whole number >= 1, got {variations!r}")
        if limit is not None and (isinstance(limit, bool) or limit < 0):
            raise ConfigError(f"limit must be 0 or more, got {limit!r}")
        if shard is not None and not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
            raise ConfigError(f"shard must be i/N with 0 <= i < N, got {shard[0]}/{shard[1]}")
        if isinstance(base_seed, bool) or not isinstance(base_seed, int):
            raise ConfigError(f"base seed must be an integer, got {base_seed!r}")
        self._base_seed = base_seed
        self._variations = variations
        self._shard = shard
        self._limit = limit
        self._dedupe = dedupe
        self._registry = registry if registry is not None else ModelRegistry.builtin()
        # Input image paths of rows are relative to the prompt file; the default's to the cwd.
        image_dir = Path.cwd() if self._is_stdin else Path(self.file).parent
        self._inputs = InputChecker(image_dir)
        self._default_inputs: tuple[ImageInput, ...] = ()
        if defaults.image is not None:
            try:
                self._default_inputs = (InputChecker(Path.cwd()).check("image", defaults.image),)
            except InputImageError as exc:
                raise ConfigError(f"default {exc}") from None

        self._fmt, self._gz = (".txt", False) if self._is_stdin else _format_of(self.file)
        if not self._is_stdin:
            try:
                with open(self.file, "rb") as f:
                    self.total_bytes = os.fstat(f.fileno()).st_size
            except OSError as exc:
                raise InputFileError(f"{self.file}: cannot open: {exc.strerror or exc}") from exc

        self._raw: IO[bytes] | None = None
        self._bytes_read = 0
        self._records: Iterable[str | Mapping[str, Any]] | None = None

        # Validate the defaults once: a row that adds only a prompt (and the seed we
        # derive) is valid exactly when this probe is, so it skips validate_request.
        self._base = defaults.as_request()
        probe_body = {**self._base, "prompt": "x", "seed": self._base.get("seed", 0)}
        probe = validate_request(probe_body, self._registry, unknown_model="warn")
        self._template: dict[str, Any] | None = None
        self._template_warnings = probe.warnings
        self._fixed_seed: int | None = None
        # The content digest of a template row, hashed up to its prompt (see identity.py).
        self._primed = hashlib.blake2b(digest_size=16)
        if probe.request is not None:
            template = dict(probe.request)
            digests = tuple(item.identity for item in self._default_inputs)
            prefix = content_prefix(content_of_request(template, self._registry, digests))
            self._primed = hashlib.blake2b(prefix, digest_size=16)
            del template["prompt"]
            seed = template.pop("seed")
            if "seed" in self._base:
                self._fixed_seed = seed
            self._template = template
        self._offer = offer
        self._not_offered: dict[str, str | None] = {}  # model -> why not (None: offered)
        if self._template is not None and self._offered_problem(self._template["model"]):
            self._template = None  # every row is checked on its own, and found invalid
        self.legacy: LegacyIds | None = None
        #: Set by the pipeline from the resume index: a row found done is yielded as
        #: :data:`SKIPPED` (where its id and fingerprint are known early: plain rows).
        self.done: DoneCheck | None = None
        #: Set by the pipeline: jumps past a plain ``.txt`` file's done prefix.
        self.cursor: ResumeCursor | None = None

    @classmethod
    def from_records(
        cls, records: Iterable[str | Mapping[str, Any]], **options: Any
    ) -> PromptSource:
        """Rows from memory: each item a prompt string or a mapping of row fields.

        The item's 1-based position stands in for the line number; options are those
        of the constructor. This is what :func:`sfbatch.generate` reads.

        >>> [r.id for r in PromptSource.from_records(["a cat", {"id": "dog", "prompt": "a dog"}])]
        ['3202f6a5aabe', 'dog']
        """
        source = cls("-", stdin=io.BytesIO(b""), **options)
        source.file = "<records>"
        source._records = records
        return source

    @property
    def bytes_read(self) -> int:
        """Bytes of the (compressed) input consumed so far."""
        raw = self._raw
        if raw is not None:
            try:
                return raw.tell()
            except (OSError, ValueError):
                pass
        return self._bytes_read

    def count_rows(self) -> int | None:
        """The number of rows iteration will yield, when cheap to know; else ``None``.

        Known for plain (not gzipped) ``.txt`` and ``.jsonl`` files without a shard:
        the non-blank lines (counted in 1 MiB binary chunks), capped by ``limit``,
        times ``variations``. ``None`` for stdin, gzip, CSV/TSV (quoted cells may span
        lines) and sharded runs (membership needs each row's id).
        """
        if self._is_stdin or self._gz or self._fmt not in (".txt", ".jsonl") or self._shard:
            return None
        count = 0
        tail = b""
        try:
            with open(self.file, "rb") as f:
                while chunk := f.read(1 << 20):
                    parts = (tail + chunk.translate(None, _BLANK_BYTES)).split(b"\n")
                    tail = parts.pop()
                    count += len(parts) - parts.count(b"")
        except OSError as exc:
            raise InputFileError(f"{self.file}: cannot read: {exc.strerror or exc}") from exc
        if tail:
            count += 1
        if self._limit is not None:
            count = min(count, self._limit)
        return count * self._variations

    def __iter__(self) -> Iterator[Row]:
        return self.rows(IdSpace(self.legacy, self.done, self.cursor))

    def rows(self, space: IdSpace) -> Iterator[Row]:
        """The rows, with ids taken from ``space`` (shared by the files of one job)."""
        if self._limit == 0:
            return
        identity = self._cursor_identity(space)
        jump = None
        if identity is not None and space.cursor is not None:
            jump = space.cursor.jump(self.file, identity)
        with contextlib.ExitStack() as stack:
            if self._records is not None:
                parsed = self._parse_records(self._records)
            else:
                parsed = self._open(stack, jump)
            if self._limit is not None:
                # islice stops without reading past the limit (matters for stdin).
                parsed = itertools.islice(parsed, self._limit)
            if jump is not None:
                space.restore(jump)
                yield SkippedRows(jump.rows)  # type: ignore[misc]
            if jump is None:
                yield from self._build(parsed, space, identity)
            else:
                yield from self._build(parsed, space, identity, jump.rows, jump.lines)

    def _cursor_identity(self, space: IdSpace) -> bytes | None:
        """What the rows' ids and fingerprints depend on besides the file's bytes (which
        the cursor checks), when a resume cursor can apply: a plain ``.txt`` file, the
        job's first, rows made from the defaults alone."""
        if (
            space.cursor is None
            or not space.fresh
            or self._is_stdin
            or self._gz
            or self._records is not None
            or self._fmt != ".txt"
            or self._variations != 1
            or self._dedupe
            or self._shard is not None
            or self._limit is not None
            or self._template is None
        ):
            return None
        parts = [
            self.file,
            os.path.abspath(self.file),
            self._primed.copy().hexdigest(),
            self._base_seed,
            self._fixed_seed,
        ]
        return hashlib.blake2b(orjson.dumps(parts), digest_size=16).digest()

    # -- opening ---------------------------------------------------------------

    def _open(self, stack: contextlib.ExitStack, jump: Jump | None = None) -> Iterator[_Parsed]:
        if self._is_stdin:
            stream = self._stdin if self._stdin is not None else sys.stdin.buffer
            self._raw = None
            self._bytes_read = 0
            try:
                fmt, lines = self._sniff(self._count_bytes(stream))
            except _READ_ERRORS as exc:
                raise self._read_error(exc, 0) from exc
            return self._parse_lines(fmt, lines)
        try:
            raw = stack.enter_context(open(self.file, "rb"))  # noqa: SIM115  # closed by stack
        except OSError as exc:
            raise InputFileError(f"{self.file}: cannot open: {exc.strerror or exc}") from exc
        self._raw = raw
        if jump is not None:  # a plain .txt: go on after its done prefix
            raw.seek(jump.offset)
            stack.callback(self._closing, raw)
            return self._parse_txt(iter(raw), jump.lines)
        binary: IO[bytes] | gzip.GzipFile = raw
        if self._gz:
            binary = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
        if self._fmt in (".csv", ".tsv"):
            text = io.TextIOWrapper(
                binary, encoding="utf-8-sig", errors="surrogateescape", newline=""
            )
            stack.enter_context(text)
            parsed = self._parse_csv(text)
        else:
            parsed = self._parse_lines(self._fmt, iter(binary))
        stack.callback(self._closing, raw)  # runs first: the wrappers close raw too
        return parsed

    def _closing(self, raw: IO[bytes]) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._bytes_read = raw.tell()
        self._raw = None

    def _count_bytes(self, stream: Iterable[bytes]) -> Iterator[bytes]:
        for line in stream:
            self._bytes_read += len(line)
            yield line

    def _sniff(self, lines: Iterator[bytes]) -> tuple[str, Iterator[bytes]]:
        for blanks, line in enumerate(lines):
            if not blanks and line.startswith(_BOM):
                line = line[len(_BOM) :]
            if line.strip():
                fmt = ".jsonl" if line.lstrip().startswith(b"{") else ".txt"
                return fmt, itertools.chain(itertools.repeat(b"\n", blanks), (line,), lines)
        return ".txt", iter(())

    def _parse_records(self, records: Iterable[str | Mapping[str, Any]]) -> Iterator[_Parsed]:
        for line, item in enumerate(records, start=1):
            if isinstance(item, str):
                if item.strip():
                    yield line, item.strip(), None, None
            elif isinstance(item, Mapping):
                for key in item:
                    if key not in _KNOWN_KEYS:
                        self._unknown_field(key, line)
                yield line, None, dict(item), None
            else:
                yield line, None, None, [f"not a prompt or a mapping (got {type(item).__name__})"]

    def _parse_lines(self, fmt: str, lines: Iterator[bytes]) -> Iterator[_Parsed]:
        if fmt == ".jsonl":
            return self._parse_jsonl(lines)
        return self._parse_txt(lines)

    def _read_error(self, exc: BaseException, line: int) -> InputFileError:
        what = "corrupt or truncated gzip data" if self._gz else "read failed"
        return InputFileError(f"{self.file}: {what} after line {line}: {exc}")

    # -- parsing: bytes -> (line, prompt | fields, problems) -------------------------

    def _parse_txt(self, lines: Iterator[bytes], line: int = 0) -> Iterator[_Parsed]:
        try:
            for raw in lines:
                line += 1
                if line == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM) :]
                try:
                    prompt = raw.decode("utf-8").strip()
                except UnicodeDecodeError:
                    yield line, None, None, ["not valid UTF-8"]
                    continue
                if prompt:
                    yield line, prompt, None, None
        except _READ_ERRORS as exc:
            raise self._read_error(exc, line) from exc

    def _parse_jsonl(self, lines: Iterator[bytes]) -> Iterator[_Parsed]:
        line = 0
        loads = orjson.loads
        try:
            for raw in lines:
                line += 1
                if line == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM) :]
                if not raw or raw.isspace():
                    continue
                try:
                    obj = loads(raw)
                except orjson.JSONDecodeError as exc:
                    yield line, None, None, [_json_problem(raw, exc)]
                    continue
                if type(obj) is not dict:
                    yield line, None, None, [f"not a JSON object (got {_json_kind(obj)})"]
                    continue
                if not _KNOWN_KEYS.issuperset(obj):
                    for key in obj:
                        if key not in _KNOWN_KEYS:
                            self._unknown_field(key, line)
                yield line, None, obj, None
        except _READ_ERRORS as exc:
            raise self._read_error(exc, line) from exc

    def _parse_csv(self, text: io.TextIOWrapper) -> Iterator[_Parsed]:
        # strict: a quote opened and never closed is an error, not the rest of the file
        # read as one field (one paid prompt of every line after a stray quote)
        dialect = "excel-tab" if self._fmt == ".tsv" else "excel"
        reader = csv.reader(text, dialect=dialect, strict=True)
        columns: list[tuple[int, str]] | None = None
        width = 0
        end = 0  # the physical line the previous record ended on
        while True:
            start = end + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                end = reader.line_num
                problem = f"malformed {self._fmt[1:].upper()} row: {exc}"
                if "unexpected end of data" in str(exc):
                    problem = (
                        f"a quoted field opened here is never closed: lines {start}-{end} "
                        "(the end of the file) would be one field; close or remove the quote"
                    )
                yield start, None, None, [problem]
                continue
            except _READ_ERRORS as exc:
                raise self._read_error(exc, end) from exc
            end = reader.line_num
            joined = "".join(cells)
            if not joined.strip():
                continue
            if columns is None:
                columns, width = self._header(cells, start)
                continue
            if not joined.isascii() and _has_surrogates(joined):
                yield start, None, None, ["not valid UTF-8"]
                continue
            problems: list[str] = []
            if len(cells) > width:
                problems.append(f"row has {len(cells)} fields, the header has {width}")
            fields: dict[str, Any] = {}
            for index, name in columns:
                if index >= len(cells):
                    break
                cell = cells[index].strip()
                if not cell:
                    continue
                converter = _CSV_CONVERTERS.get(name)
                if converter is None:
                    fields[name] = cell
                    continue
                try:
                    fields[name] = converter[0](cell)
                except ValueError:
                    problems.append(f"{name} must be {converter[1]}, got {cell!r}")
            yield start, None, fields, problems or None

    def _header(self, cells: list[str], line: int) -> tuple[list[tuple[int, str]], int]:
        names = [c.strip().lower() for c in cells]
        if "prompt" not in names:
            found = ", ".join(repr(n) for n in names[:5])
            raise InputFileError(
                f"{self.file}:{line}: the header row has no 'prompt' column (found {found}); "
                "CSV/TSV prompt files need a header row naming the fields"
            )
        columns: list[tuple[int, str]] = []
        seen: set[str] = set()
        for index, name in enumerate(names):
            if name in seen:
                raise InputFileError(f"{self.file}:{line}: column {name!r} appears twice")
            seen.add(name)
            if name in _KNOWN_KEYS:
                columns.append((index, name))
            elif name:
                self._unknown_field(name, line)
        return columns, len(cells)

    # -- building: ids, shard, seeds, validation, fingerprints, variations, dedupe -----

    def _build(
        self,
        parsed: Iterator[_Parsed],
        space: IdSpace,
        identity: bytes | None = None,
        skipped: int = 0,
        last_line: int = 0,
    ) -> Iterator[Row]:
        """Rows from parsed lines. With a cursor ``identity``, the rows skipped as done
        from the start (``skipped`` of them, to ``last_line``, jumped already) are told
        to the cursor at the first row that is not, or at the end."""
        cursor = space.cursor if identity is not None else None
        file = self.file
        shard = self._shard
        template = self._template
        fixed_seed = self._fixed_seed
        base_seed = self._base_seed
        seed0 = _seed_prefix(base_seed, 0)
        simple = self._variations == 1 and not self._dedupe
        primed = self._primed
        default_inputs = self._default_inputs
        legacy = space.legacy
        is_done = space.done if simple else None
        dumps = orjson.dumps
        template_warned = False

        for line, text, fields, problems in parsed:
            if cursor is not None and (fields is not None or problems is not None):
                cursor.reached(file, identity, skipped, last_line, space)  # type: ignore[arg-type]
                cursor = None
            if fields is None:
                if problems is not None:
                    yield from self._invalid("", line, None, {}, "; ".join(problems), space)
                    continue
                if template is None:
                    fields = {"prompt": text}  # the defaults are invalid: check the row fully
                else:
                    prompt: str = text  # type: ignore[assignment]  # set whenever fields is None
                    h = primed.copy()
                    h.update(dumps(prompt) + b"]")
                    digest = h.digest()
                    base_id = space.content_id(digest)
                    if legacy is not None:
                        base_id = self._adopt(legacy, line, digest, base_id, fixed_seed)
                    if shard is not None and shard_of(base_id, shard[1]) != shard[0]:
                        continue
                    if not template_warned:
                        template_warned = True
                        for warning in self._template_warnings:
                            self._warn(f"{file}: {warning}")
                    seed = _seed_from(seed0, base_id) if fixed_seed is None else fixed_seed
                    if simple:
                        fp = fingerprint(digest, seed, 0)
                        if is_done is not None and is_done(base_id, fp):
                            skipped += 1
                            last_line = line
                            yield SKIPPED
                            continue
                        if cursor is not None:  # the prefix ends before this row
                            space.unbump(digest)
                            cursor.reached(file, identity, skipped, last_line, space)  # type: ignore[arg-type]
                            space.content_id(digest)
                            cursor = None
                        request = {**template, "prompt": prompt, "seed": seed}
                        yield _row(
                            base_id, line, file, 0, request, None, prompt, None, fp, default_inputs
                        )
                    else:
                        request = {**template, "prompt": prompt, "seed": seed}
                        source = base_seed if fixed_seed is None else fixed_seed
                        duplicate = self._duplicate(base_id, digest, space)
                        yield from self._expand(
                            base_id,
                            line,
                            prompt,
                            request,
                            source,
                            None,
                            duplicate,
                            digest,
                            default_inputs,
                        )
                    continue
            reasons = list(problems) if problems is not None else []
            base_id = ""
            raw_id = fields.get("id")
            if raw_id is not None:
                row_id, why = _coerce_id(raw_id)
                if row_id is None:
                    reasons.append(why)  # type: ignore[arg-type]  # set when id is None
                else:
                    if shard is not None and shard_of(row_id, shard[1]) != shard[0]:
                        space.claim(row_id, f"{file}:{line}")
                        continue
                    first = space.claim(row_id, f"{file}:{line}")
                    if first is not None:
                        reasons.append(f"duplicate id {row_id} (first at {first})")
                    else:
                        base_id = row_id
            yield from self._slow(base_id, line, text, fields, reasons, space)
        if cursor is not None:  # every row was done
            cursor.reached(file, identity, skipped, last_line, space)  # type: ignore[arg-type]

    def _adopt(
        self, legacy: LegacyIds, line: int, digest: bytes, base_id: str, seed: int | None
    ) -> str:
        """``base_id``, or the line id an older sfbatch made this content under."""
        base_seed = self._base_seed

        def fingerprint_of(candidate: str) -> str:
            chosen = derive_seed(base_seed, candidate, 0) if seed is None else seed
            return fingerprint(digest, chosen, 0)

        suffix = "-v0" if self._variations > 1 else ""
        adopted = legacy.adopt(line, digest, fingerprint_of, suffix)
        return base_id if adopted is None else adopted

    def _slow(
        self,
        base_id: str,
        line: int,
        text: str | None,
        fields: dict[str, Any],
        reasons: list[str],
        space: IdSpace,
    ) -> Iterator[Row]:
        body = dict(self._base)
        for key, value in fields.items():
            if value is not None and key in ROW_FIELDS:
                body[key] = value
        prompt = body.get("prompt")
        if prompt is None:
            reasons.append("missing prompt")
            body["prompt"] = "-"  # so the other fields are still checked
        inputs = self._check_inputs(fields, body, reasons)
        explicit_seed = "seed" in body
        if not explicit_seed:
            body["seed"] = 0  # the seed is derived from the id, which needs the content
        checked = validate_request(body, self._registry, unknown_model="warn")
        for warning in checked.warnings:
            self._warn(f"{self.file}: {warning}")
        text = prompt if isinstance(prompt, str) else text
        request = checked.request
        if request is not None and (why := self._offered_problem(request["model"])):
            reasons.append(why)
        if reasons or request is None:
            why = "; ".join([*reasons, *checked.errors])
            yield from self._invalid(base_id, line, text, fields, why, space)
            return
        digests = tuple(item.identity for item in inputs)
        digest = content_digest(content_of_request(request, self._registry, digests))
        row_id = base_id
        if not row_id:
            row_id = space.content_id(digest)
            if space.legacy is not None:
                fixed = request["seed"] if explicit_seed else None
                row_id = self._adopt(space.legacy, line, digest, row_id, fixed)
            if self._shard is not None and shard_of(row_id, self._shard[1]) != self._shard[0]:
                return
        if not explicit_seed:
            request["seed"] = derive_seed(self._base_seed, row_id, 0)
        source = request["seed"] if explicit_seed else self._base_seed
        duplicate = self._duplicate(row_id, digest, space)
        yield from self._expand(
            row_id, line, text, request, source, None, duplicate, digest, inputs
        )

    def _offered_problem(self, model: str) -> str | None:
        """Why the endpoint cannot take ``model`` (see ``offer``), or ``None``."""
        if self._offer is None:
            return None
        if model not in self._not_offered:
            self._not_offered[model] = self._offer.problem(model, self._registry)
        return self._not_offered[model]

    def _check_inputs(
        self, fields: dict[str, Any], body: dict[str, Any], reasons: list[str]
    ) -> tuple[ImageInput, ...]:
        """The row's input images (its own, else the default image); problems to ``reasons``."""
        inputs: list[ImageInput] = []
        for name in IMAGE_FIELDS:
            value = fields.get(name)
            if value is None:
                if name == "image":
                    inputs.extend(self._default_inputs)
                continue
            try:
                inputs.append(self._inputs.check(name, value))
            except InputImageError as exc:
                reasons.append(str(exc))
                body[name] = "-"  # so the model's rules do not report the field again
        return tuple(inputs)

    def _invalid(
        self,
        base_id: str,
        line: int,
        text: str | None,
        fields: Mapping[str, Any],
        why: str,
        space: IdSpace,
    ) -> Iterator[Row]:
        """An invalid row: under its own id if it has a usable one, else a content id."""
        digest = _invalid_digest(fields, why)
        row_id = base_id or space.content_id(digest)
        if self._shard is not None and shard_of(row_id, self._shard[1]) != self._shard[0]:
            return
        error = f"{self.file}:{line}: {why}"
        yield from self._expand(row_id, line, text, None, 0, error, None, digest)

    def _duplicate(self, base_id: str, digest: bytes, space: IdSpace) -> str | None:
        if not self._dedupe:
            return None
        return space.first_with(digest, base_id)

    def _expand(
        self,
        base_id: str,
        line: int,
        prompt: str | None,
        request: dict[str, Any] | None,
        seed_source: int,
        error: str | None,
        duplicate: str | None,
        digest: bytes,
        inputs: tuple[ImageInput, ...] = (),
    ) -> Iterator[Row]:
        file = self.file
        count = self._variations
        if count == 1:
            seed = request["seed"] if request is not None else None
            fp = fingerprint(digest, seed, 0)
            yield _row(base_id, line, file, 0, request, error, prompt, duplicate, fp, inputs)
            return
        for k in range(count):
            varied = request
            if request is not None and k:
                varied = {**request, "seed": derive_seed(seed_source, base_id, k)}
            dup = f"{duplicate}-v{k}" if duplicate is not None else None
            fp = fingerprint(digest, varied["seed"] if varied is not None else None, k)
            yield _row(f"{base_id}-v{k}", line, file, k, varied, error, prompt, dup, fp, inputs)

    def _unknown_field(self, key: str, line: int) -> None:
        """Warn once per field name, at its first line, with the likely intended one."""
        if key in self._unknown_fields:
            return
        self._unknown_fields.add(key)
        close = difflib.get_close_matches(key, sorted(_KNOWN_KEYS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        self._warn(f"{self.file}:{line}: unknown field {key!r} ignored{hint}")

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            self.warnings.append(message)
            log.warning("%s", message)


def _json_problem(raw: bytes, exc: orjson.JSONDecodeError) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "not valid UTF-8"
    # The parser counts lines within this one line of the file: give the column only.
    reason = _PARSER_POSITION.sub("", str(exc))
    return f"not a JSON object ({reason} at column {exc.pos + 1})"


_PARSER_POSITION = re.compile(r":? line \d+ column \d+ \(char \d+\)")


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def _invalid_digest(fields: Mapping[str, Any], why: str) -> bytes:
    """The content digest of an invalid row: its fields and what is wrong with them."""
    try:
        blob = orjson.dumps(
            [dict(fields), why], option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS
        )
    except TypeError:
        blob = repr((sorted(map(repr, fields.items())), why)).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(b"invalid\n" + blob, digest_size=16).digest()
