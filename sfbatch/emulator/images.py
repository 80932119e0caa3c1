"""Deterministic PNG images and the stateless URLs that serve them.

An image is a function of ``(seed, prompt, index, width, height)``: colour gradients
whose direction, span and base colour come from a hash of the first three, so
different seeds look different and the same inputs give the same bytes, always::

    >>> png = render_png(42, prompt_digest("a cat"), 0, 64, 64)
    >>> png[:8] == PNG_SIGNATURE
    True
    >>> png == render_png(42, prompt_digest("a cat"), 0, 64, 64)
    True

The server keeps no per-image state: an image URL carries everything needed to
render it again (:class:`ImageRef`), signed with an HMAC so it cannot be forged.
The encoder is zlib + struct; rows are built with ``bytes.translate`` so a 64x64
image takes a few tens of microseconds, and recent images are kept in a small LRU.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["PNG_SIGNATURE", "ImageRef", "TokenCodec", "encode_png", "prompt_digest", "render_png"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# _SHIFT[k] maps every byte value v to (v + k) % 256: adds a constant to a whole row in C.
_SHIFT = tuple(bytes((v + k) & 255 for v in range(256)) for k in range(256))


def prompt_digest(prompt: str) -> bytes:
    """The 8-byte digest of a prompt that image URLs carry instead of the prompt."""
    return hashlib.blake2b(prompt.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(width: int, height: int, rgb: bytes | bytearray) -> bytes:
    """An 8-bit RGB PNG of ``rgb`` (``height`` rows of ``3 * width`` bytes)."""
    stride = 3 * width
    if len(rgb) != stride * height:
        raise ValueError(f"expected {stride * height} bytes of RGB, got {len(rgb)}")
    raw = bytearray((stride + 1) * height)  # each row: filter byte 0, then the pixels
    for y in range(height):
        start = y * (stride + 1) + 1
        raw[start : start + stride] = rgb[y * stride : (y + 1) * stride]
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"".join(
        (
            PNG_SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(bytes(raw), 1)),
            _chunk(b"IEND", b""),
        )
    )


@lru_cache(maxsize=256)
def render_png(seed: int, digest: bytes, index: int, width: int, height: int) -> bytes:
    """The image for ``(seed, prompt digest, index)`` at ``width`` x ``height``."""
    if not (1 <= width <= 65535 and 1 <= height <= 65535):
        raise ValueError(f"image size out of range: {width}x{height}")
    h = hashlib.blake2b(struct.pack(">QB", seed, index) + digest, digest_size=9).digest()
    rgb = bytearray(3 * width * height)
    for channel in range(3):
        base, x_span, y_span = h[channel], h[3 + channel], h[6 + channel]
        # Spans run -256..254 over the image, so each channel ramps across it, wrapping.
        x_step, y_step = 2 * x_span - 256, 2 * y_span - 256
        row = bytes((base + x * x_step // width) & 255 for x in range(width))
        plane = b"".join(row.translate(_SHIFT[(y * y_step // height) & 255]) for y in range(height))
        rgb[channel::3] = plane
    return encode_png(width, height, rgb)


@dataclass(frozen=True, slots=True)
class ImageRef:
    """Everything an image URL encodes."""

    seed: int
    digest: bytes
    index: int
    width: int
    height: int
    created_ms: int


# seed, prompt digest, index, width, height, created (epoch ms); then a truncated HMAC.
_PAYLOAD = struct.Struct(">Q8sBHHQ")
_MAC_BYTES = 12
_TOKEN_BYTES = _PAYLOAD.size + _MAC_BYTES


class TokenCodec:
    """Turns an :class:`ImageRef` into a URL-safe, signed token and back."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, payload: bytes) -> bytes:
        return hmac.digest(self._secret, payload, "sha256")[:_MAC_BYTES]

    def encode(self, ref: ImageRef) -> str:
        payload = _PAYLOAD.pack(
            ref.seed, ref.digest, ref.index, ref.width, ref.height, ref.created_ms
        )
        return base64.urlsafe_b64encode(payload + self._mac(payload)).rstrip(b"=").decode()

    def decode(self, token: str) -> ImageRef | None:
        """The reference in ``token``, or ``None`` if it is malformed or forged."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) != _TOKEN_BYTES:
            return None
        payload, mac = raw[: _PAYLOAD.size], raw[_PAYLOAD.size :]
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        seed, digest, index, width, height, created_ms = _PAYLOAD.unpack(payload)
        if width < 1 or height < 1:
            return None
        return ImageRef(seed, digest, index, width, height, created_ms)
