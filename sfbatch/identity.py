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
from collections.abc import Iterable, Iterator, Mapping
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
    except (TypeError, ValueError):
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
    """Latest value per 64-bit key, in ``5 + value_size`` bytes per key.

    Keys are spread over 65,536 append-only ``bytearray`` buckets by their low 16 bits;
    an entry is the next 40 bits of the key and the value. A lookup is one ``rfind`` in
    one bucket (C speed), so a key is effectively 56 bits: two keys collide with
    probability about 2**-56 per pair. ``put`` overwrites a key's value in place, so the
    table holds one entry per key.
    """

    _BUCKET_BITS: Final = 16

    def __init__(self, value_size: int = 1) -> None:
        self._value_size = value_size
        self._width = 5 + value_size
        self._buckets: list[bytearray | None] = [None] * (1 << self._BUCKET_BITS)
        self.size = 0

    def _locate(self, key: int) -> tuple[bytearray | None, int, bytes, int]:
        key &= _MASK64
        index = key & 0xFFFF
        tag = ((key >> 16) & 0xFF_FFFF_FFFF).to_bytes(5, "big")
        bucket = self._buckets[index]
        if bucket is None:
            return None, index, tag, -1
        width = self._width
        end = len(bucket)
        while True:
            pos = bucket.rfind(tag, 0, end)
            if pos < 0 or pos % width == 0:
                return bucket, index, tag, pos
            end = pos + 4  # look again for a match starting before pos

    def get(self, key: int) -> bytes | None:
        bucket, _, _, pos = self._locate(key)
        if bucket is None or pos < 0:
            return None
        return bytes(bucket[pos + 5 : pos + self._width])

    def put(self, key: int, value: bytes) -> None:
        bucket, index, tag, pos = self._locate(key)
        if bucket is None:
            bucket = self._buckets[index] = bytearray()
        if pos >= 0:
            bucket[pos + 5 : pos + self._width] = value
            return
        bucket += tag
        bucket += value
        self.size += 1

    def put_all(self, items: Iterable[tuple[int, bytes]]) -> None:
        """``put`` each ``(key, value)`` in order (the same as the loop, at half the cost)."""
        buckets = self._buckets
        width = self._width
        size = self.size
        for key, value in items:
            key &= _MASK64
            tag = ((key >> 16) & 0xFF_FFFF_FFFF).to_bytes(5, "big")
            bucket = buckets[key & 0xFFFF]
            if bucket is None:
                buckets[key & 0xFFFF] = bytearray(tag + value)
                size += 1
                continue
            end = len(bucket)
            while True:
                pos = bucket.rfind(tag, 0, end)
                if pos < 0 or pos % width == 0:
                    break
                end = pos + 4
            if pos >= 0:
                bucket[pos + 5 : pos + width] = value
            else:
                bucket += tag + value
                size += 1
        self.size = size

    def values(self) -> Iterator[bytes]:
        """Every entry's value (in no particular order)."""
        width = self._width
        for bucket in self._buckets:
            if bucket:
                for pos in range(5, len(bucket), width):
                    yield bytes(bucket[pos : pos + self._value_size])

    def count_first_byte(self) -> dict[int, int]:
        """How many entries have each value of the first value byte (fast, for 1-byte values)."""
        counts: dict[int, int] = {}
        for bucket in self._buckets:
            if bucket:
                column = bytes(bucket[5 :: self._width])
                for byte in set(column):
                    counts[byte] = counts.get(byte, 0) + column.count(byte)
        return counts

    def nbytes(self) -> int:
        """Bytes held by the entries (not counting allocator slack)."""
        return sum(len(b) for b in self._buckets if b)
