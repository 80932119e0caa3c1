"""What an item is: its content digest, its fingerprint, its content id; and a compact key table.

An item's images are determined by its *content* (model, prompt, negative prompt, size,
steps, guidance/cfg, batch size, prompt enhancement, the image inputs' sha256 digests:
the effective values, so an explicit default changes nothing), its seed and its
variation. Three derived values, one home each:

- :func:`content_digest` -- 16 bytes of blake2b over the canonical content (prompt last, so
  the loader can prime a hash with the defaults once and add only each row's prompt);
- :func:`fingerprint` -- 16 hex digits over that digest, the seed and the variation; every
  manifest record carries it, and resume skips a row only when a record with its id *and*
  fingerprint is done;
- :func:`content_id` -- the id of a row without an explicit ``id``: the digest's first 12 hex
  digits, plus ``-N`` for the N-th repeat of the same content in a job (N >= 2), so ids do not
  move when other lines are inserted, deleted or moved.

:class:`KeyTable` holds millions of 64-bit keys in a few bytes each (the resume index and
the loader's repeat counter), instead of a dict of strings.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from sfbatch.models import DEFAULT_MODEL, ModelRegistry, effective_params

__all__ = [
    "CONTENT_ID_HEX",
    "Content",
    "KeyTable",
    "content_digest",
    "content_id",
    "content_of_record",
    "content_of_request",
    "content_prefix",
    "fingerprint",
    "item_key",
    "unused_stem",
]

#: Hex digits of a content id (48 bits).
CONTENT_ID_HEX: Final = 12
_MASK64: Final = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Content:
    """The effective parameters that, with a seed and a variation, determine an item's images."""

    model: str
    prompt: str
    negative_prompt: str | None
    image_size: str
    batch_size: int
    num_inference_steps: int | None
    guidance: float | None
    prompt_enhancement: bool
    input_digests: tuple[str, ...] = ()


def content_of_request(
    request: Mapping[str, Any], registry: ModelRegistry, input_digests: tuple[str, ...] = ()
) -> Content:
    """The :class:`Content` of a validated request (the server's defaults filled in)."""
    params = effective_params(request, registry)
    return _content(params, request["prompt"], request.get("negative_prompt"), input_digests)


def content_of_record(record: Mapping[str, Any]) -> Content | None:
    """The :class:`Content` a manifest record says it made, or None if it does not say."""
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or record.get("model") is None:
        return None
    digests = tuple(str(i.get("sha256")) for i in record.get("inputs") or () if i.get("sha256"))
    try:
        return _content(record, prompt, record.get("negative_prompt"), digests)
    except (KeyError, TypeError, ValueError):
        return None


def _content(
    params: Mapping[str, Any],
    prompt: str,
    negative: str | None,
    input_digests: tuple[str, ...],
) -> Content:
    guidance = params.get("guidance_scale")
    steps = params.get("num_inference_steps")
    return Content(
        model=str(params.get("model") or DEFAULT_MODEL),
        prompt=prompt,
        negative_prompt=negative or None,
        image_size=str(params["image_size"]),
        batch_size=int(params.get("batch_size") or 1),
        num_inference_steps=None if steps is None else int(steps),
        guidance=None if guidance is None else float(guidance),
        prompt_enhancement=bool(params.get("prompt_enhancement")),
        input_digests=tuple(input_digests),
    )


def content_prefix(content: Content) -> bytes:
    """The canonical bytes of ``content`` up to (not including) its prompt."""
    head = [
        content.model,
        content.negative_prompt,
        content.image_size,
        content.batch_size,
        content.num_inference_steps,
        content.guidance,
        content.prompt_enhancement,
        list(content.input_digests),
    ]
    return orjson.dumps(head)[:-1] + b","


def content_digest(content: Content) -> bytes:
    """16 bytes of blake2b over ``content_prefix(content) + json(prompt) + "]"``."""
    h = hashlib.blake2b(content_prefix(content), digest_size=16)
    h.update(orjson.dumps(content.prompt) + b"]")
    return h.digest()


def fingerprint(digest: bytes, seed: int | None, variation: int) -> str:
    """16 hex digits over a content digest, the requested seed and the variation."""
    tail = b"-" if seed is None else seed.to_bytes(8, "big")
    return hashlib.blake2b(digest + tail + variation.to_bytes(4, "big"), digest_size=8).hexdigest()


def item_key(row_id: str | bytes, fp: str | bytes) -> int:
    """The resume key of (id, fingerprint): the fingerprint's 64 bits xor the id's CRC-32
    shifted into the 54 bits a :class:`KeyTable` keeps. Stable across processes
    (``manifest.idx`` keeps these keys on disk).

    The fingerprint already separates items of different requests; the id's CRC separates
    rows asking the same (repeats with a fixed seed: ``abc``, ``abc-2``), and a CRC-32
    tells apart any two ids that differ in at most 32 bits' span. A fingerprint that is
    not hex (a hand-edited record) gives way to the id's blake2b.
    """
    if isinstance(row_id, str):
        row_id = row_id.encode("utf-8", "surrogatepass")
    try:
        bits = int(fp, 16)
    except ValueError:
        return int.from_bytes(hashlib.blake2b(row_id, digest_size=8).digest(), "little")
    return bits ^ (zlib.crc32(row_id) << 22)


def content_id(digest: bytes, occurrence: int) -> str:
    """The id of the ``occurrence``-th (1-based) row of a job with this content digest."""
    base = digest.hex()[:CONTENT_ID_HEX]
    return base if occurrence == 1 else f"{base}-{occurrence}"


#: Every extension the downloader can give an image.
_IMAGE_EXTENSIONS: Final = ("png", "jpg", "webp", "gif")


def unused_stem(out_dir: str | os.PathLike[str], stem: str, fp: str) -> str:
    """``stem``, or ``stem~FP8`` when a file of ``stem`` is already on disk.

    An id whose fingerprint changed (an explicit id with an edited prompt, another base
    seed) is made again under the same id: its new images get a name of their own, so a
    file that an earlier done record references is never overwritten.
    """
    for ext in _IMAGE_EXTENSIONS:
        if os.path.lexists(os.path.join(out_dir, f"{stem}.{ext}")):
            return f"{stem}~{fp[:8]}"
    return stem


class KeyTable:
    """A set of 64-bit keys with a value each, in ``5 + value_size`` bytes per key.

    Keys are spread over 16,384 ``bytearray`` buckets by their low 14 bits; an entry is
    the next 40 bits of the key and the value. A lookup is one ``rfind`` in one bucket
    (C speed), so a key is effectively 54 bits: two keys collide with probability about
    2**-54 per pair. ``put`` overwrites a key's value in place: one entry per key.

    Buckets are allocated with room for ``expected / 16384`` entries plus 5 %, and their
    used length is kept apart, so a table sized right seldom reallocates: growing many
    small buffers step by step leaves the heap fragmented (1.7x the entries' bytes).

    *Matched* entries (the resume index: items the current input asked for) cost no
    byte: after :meth:`seal` each bucket keeps its unmatched entries before a boundary
    and its matched ones after it; :meth:`mark` moves an entry across by one swap, and
    keys put after the seal land on the matched side.
    """

    _BITS: Final = 14
    _BUCKETS: Final = 1 << _BITS

    def __init__(self, value_size: int = 0, *, expected: int = 0) -> None:
        self._value_size = value_size
        self._width = 5 + value_size
        self._buckets: list[bytearray | None] = [None] * self._BUCKETS
        self._used = array("Q", bytes(8 * self._BUCKETS))
        # Per bucket: entries before this offset are unmatched (see seal/mark).
        self._bound = array("Q", bytes(8 * self._BUCKETS))
        self._reserve = self._width * (8 + expected * 105 // 100 // self._BUCKETS)
        self.size = 0

    def _split(self, key: int) -> tuple[int, bytes]:
        key &= _MASK64
        return key & (self._BUCKETS - 1), ((key >> self._BITS) & 0xFF_FFFF_FFFF).to_bytes(5, "big")

    def _find(self, bucket: bytearray, tag: bytes, end: int) -> int:
        width = self._width
        while True:
            pos = bucket.rfind(tag, 0, end)
            if pos < 0 or pos % width == 0:
                return pos
            end = pos + 4  # look again for a match starting before pos

    def _locate(self, key: int) -> tuple[int, bytearray, int] | None:
        """The key's bucket index, bucket and entry offset, or None if absent."""
        index, tag = self._split(key)
        bucket = self._buckets[index]
        if bucket is None:
            return None
        pos = self._find(bucket, tag, self._used[index])
        return None if pos < 0 else (index, bucket, pos)

    def get(self, key: int) -> bytes | None:
        """The key's value (``b""`` for a table without values), or None if absent."""
        if (found := self._locate(key)) is None:
            return None
        _, bucket, pos = found
        return bytes(bucket[pos + 5 : pos + self._width])

    def __contains__(self, key: int) -> bool:
        return self.get(key) is not None

    def put(self, key: int, value: bytes = b"") -> None:
        self.put_all(((key, value),))

    def discard(self, key: int) -> None:
        if (found := self._locate(key)) is None:
            return
        index, bucket, pos = found
        width, end = self._width, self._used[index]
        bucket[pos : end - width] = bucket[pos + width : end]  # keep the bucket's length
        self._used[index] = end - width
        if pos < self._bound[index]:
            self._bound[index] -= width
        self.size -= 1

    def seal(self) -> None:
        """Every entry so far is unmatched; entries put from now on are matched."""
        self._bound = array("Q", self._used)

    def mark(self, key: int) -> bytes | None:
        """Mark the key matched; its value, or None if absent."""
        if (found := self._locate(key)) is None:
            return None
        index, bucket, pos = found
        width = self._width
        bound = self._bound[index]
        if pos < bound:
            last = bound - width  # swap with the last unmatched entry, then move the bound
            if pos != last:
                bucket[pos : pos + width], bucket[last:bound] = (
                    bucket[last:bound],
                    bucket[pos : pos + width],
                )
            self._bound[index] = last
            pos = last
        return bytes(bucket[pos + 5 : pos + width])

    def matched_size(self) -> int:
        """How many entries are matched (before any :meth:`seal`: all of them)."""
        return (sum(self._used) - sum(self._bound)) // self._width

    def put_all(self, items: Iterable[tuple[int, bytes]]) -> None:
        """``put`` each ``(key, value)`` in order."""
        buckets = self._buckets
        used = self._used
        width = self._width
        find = self._find
        mask = self._BUCKETS - 1
        bits = self._BITS
        size = self.size
        for key, value in items:
            key &= _MASK64
            index = key & mask
            tag = ((key >> bits) & 0xFF_FFFF_FFFF).to_bytes(5, "big")
            bucket = buckets[index]
            end = used[index]
            if bucket is None:
                bucket = buckets[index] = bytearray(self._reserve)
            else:
                pos = find(bucket, tag, end)
                if pos >= 0:
                    bucket[pos + 5 : pos + width] = value
                    continue
            if end + width > len(bucket):
                bucket.extend(bytes(len(bucket) // 8 + 8 * width))
            bucket[end : end + width] = tag + value
            used[index] = end + width
            size += 1
        self.size = size

    def iter_keys(self, matched: bool | None = None) -> Iterator[int]:
        """Every key (or the matched or unmatched ones), as its 54 bits that the table keeps."""
        width = self._width
        for index, (bucket, end) in enumerate(zip(self._buckets, self._used, strict=True)):
            if bucket:
                bound = self._bound[index]
                start = bound if matched else 0
                stop = bound if matched is False else end
                for pos in range(start, stop, width):
                    tag = int.from_bytes(bucket[pos : pos + 5], "big")
                    yield tag << self._BITS | index

    def first_value_bytes(self, matched: bool | None = None) -> dict[int, int]:
        """How many entries (or matched or unmatched ones) have each first value byte."""
        counts: dict[int, int] = {}
        for bucket, end, bound in zip(self._buckets, self._used, self._bound, strict=True):
            if bucket:
                start = bound if matched else 0
                stop = bound if matched is False else end
                column = bytes(bucket[start + 5 : stop : self._width])
                for byte in set(column):
                    counts[byte] = counts.get(byte, 0) + column.count(byte)
        return counts

    def nbytes(self) -> int:
        """Bytes held by the entries (not counting reserved room)."""
        return sum(self._used)

    def bump(self, key: int) -> int:
        """Add one to the key's one-byte counter (a new key starts at 1); the new count.

        The counter stops at 255. One lookup where ``get`` then ``put`` would take two
        (the loader's repeat counter calls this for every row).
        """
        key &= _MASK64
        index = key & (self._BUCKETS - 1)
        tag = ((key >> self._BITS) & 0xFF_FFFF_FFFF).to_bytes(5, "big")
        bucket = self._buckets[index]
        end = self._used[index]
        if bucket is None:
            bucket = self._buckets[index] = bytearray(self._reserve)
        else:
            pos = self._find(bucket, tag, end)
            if pos >= 0:
                count = min(bucket[pos + 5] + 1, 255)
                bucket[pos + 5] = count
                return count
        if end + 6 > len(bucket):
            bucket.extend(bytes(len(bucket) // 8 + 48))
        bucket[end : end + 6] = tag + b"\x01"
        self._used[index] = end + 6
        self.size += 1
        return 1

    # -- bulk save and load (manifest.idx) ----------------------------------------

    def bucket_lengths(self) -> array[int]:
        """Each bucket's used bytes, in bucket order (what :meth:`load` takes back)."""
        return array("Q", self._used)

    def bucket_bytes(self) -> Iterator[bytes]:
        """The used bytes of every non-empty bucket, in bucket order (a copy of one at a time)."""
        for bucket, end in zip(self._buckets, self._used, strict=True):
            if bucket is not None and end:
                with memoryview(bucket) as view:
                    chunk = bytes(view[:end])
                yield chunk

    def load(self, lengths: array[int], read: Callable[[int], bytearray]) -> None:
        """Fill an empty table from :meth:`bucket_lengths` and ``read(n)`` of each bucket's bytes.

        No per-key work: each bucket is one ``read``, so millions of keys load at I/O speed.
        """
        if self.size or len(lengths) != self._BUCKETS or any(n % self._width for n in lengths):
            raise ValueError("not an empty table, or lengths of another table")
        for index, end in enumerate(lengths):
            if end:
                self._buckets[index] = read(end)
                self._used[index] = end
        self.size = sum(lengths) // self._width
