"""Input images of edit requests (``image``, ``image2``, ``image3``), as the server sees them.

An input is a URL (taken as is; the emulator never fetches it) or a data URI, which
is decoded and must hold a PNG, JPEG or WebP image. What was received is recorded as
a :class:`ReceivedImage`, so a test can compare it with the file it sent::

    >>> import base64
    >>> png = b"\\x89PNG\\r\\n\\x1a\\n" + bytes(24)
    >>> got = decode_input("image", "data:image/png;base64," + base64.b64encode(png).decode())
    >>> got["kind"], got["format"], got["bytes"]
    ('data', 'png', 32)
    >>> decode_input("image", "https://example.com/cat.png")["url"]
    'https://example.com/cat.png'
"""

from __future__ import annotations

import binascii
import hashlib
from typing import Literal, TypedDict

from sfbatch.downloader import sniff_image_type

__all__ = ["MAX_INPUT_BYTES", "ReceivedImage", "decode_input", "sniff_format"]

#: The largest decoded input image the emulator takes (the service's cap is not documented).
MAX_INPUT_BYTES = 20 * 1024 * 1024


class ReceivedImage(TypedDict):
    """One input image as received: a decoded data URI, or a URL."""

    kind: Literal["data", "url"]
    format: Literal["png", "jpeg", "webp"] | None  # None for a URL
    sha256: str | None  # of the decoded bytes; None for a URL
    bytes: int | None  # decoded length; None for a URL
    url: str | None  # None for a data URI


def sniff_format(data: bytes) -> Literal["png", "jpeg", "webp"] | None:
    """The image type the service takes (PNG, JPEG, WebP) by its magic bytes, or ``None``."""
    kind = sniff_image_type(data)
    if kind == "jpg":
        return "jpeg"
    if kind == "png":
        return "png"
    if kind == "webp":
        return "webp"
    return None


def decode_input(name: str, value: object) -> ReceivedImage:
    """Check one input field's value; raise ``ValueError`` with the server's message if bad."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a URL or a data URI")
    if value.startswith(("http://", "https://")):
        return ReceivedImage(kind="url", format=None, sha256=None, bytes=None, url=value)
    if not value.startswith("data:"):
        raise ValueError(f"{name} must be a URL or a data URI")
    header, comma, payload = value.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ValueError(f"{name}: a data URI must be base64 (data:image/png;base64,...)")
    try:
        data = binascii.a2b_base64(payload, strict_mode=True)
    except binascii.Error as exc:
        raise ValueError(f"{name}: the data URI is not valid base64") from exc
    if len(data) > MAX_INPUT_BYTES:
        raise ValueError(f"{name}: image is larger than {MAX_INPUT_BYTES} bytes")
    kind = sniff_format(data)
    if kind is None:
        raise ValueError(f"{name}: not a PNG, JPEG or WebP image")
    digest = hashlib.sha256(data).hexdigest()
    return ReceivedImage(kind="data", format=kind, sha256=digest, bytes=len(data), url=None)
