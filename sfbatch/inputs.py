"""Image inputs of edit models: a row's ``image``, ``image2`` and ``image3``.

An input's source is sent as it is when it is an ``http(s)`` URL or a data URI; any other
string is a local path (``~`` expanded; relative to the prompt file's folder), checked at
load time and sent as a data URI built only when its request is made::

    >>> url = InputChecker(Path(".")).check("image", "https://example.com/cat.png")
    >>> url.kind, url.sha256, url.identity
    ('url', None, 'https://example.com/cat.png')

At load time a file must exist, be readable, be a PNG, JPEG or WebP by its magic bytes
and be at most :data:`MAX_INPUT_BYTES`; it is hashed (sha256) once per
``(path, size, mtime_ns)``, so a million rows naming ``cat.png`` read it once. Its bytes
are not kept: :func:`materialize` reads the file again (in a worker thread) just before
the request is sent and refuses it if its digest changed. A data URI is decoded and
checked the same way at load time; a URL is not fetched, has no digest, and stands for
itself in a fingerprint (:attr:`ImageInput.identity`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
import re
import stat
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypedDict

from sfbatch.downloader import sniff_image_type
from sfbatch.errors import SfbatchError
from sfbatch.models import IMAGE_FIELDS

__all__ = [
    "IMAGE_FIELDS",
    "MAX_INPUT_BYTES",
    "ImageInput",
    "InputChecker",
    "InputImageError",
    "InputKind",
    "InputRecord",
    "abbreviate_source",
    "input_kind",
    "input_records",
    "materialize",
]

#: The largest input image accepted (a file, or the decoded bytes of a data URI).
MAX_INPUT_BYTES: Final = 10 * 1024 * 1024

InputKind = Literal["url", "data", "path"]

_MEDIA_TYPES: Final = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
_KINDS_TEXT: Final = "a PNG, JPEG or WebP image"
_SNIFF_BYTES: Final = 12
_CHUNK_BYTES: Final = 1 << 20
_DIGEST_CACHE_SIZE: Final = 4096
_SCHEME_RE: Final = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SHOWN_DATA_CHARS: Final = 40


class InputImageError(SfbatchError):
    """An input image cannot be used; the message names the field and the source.

    At load time it makes the row ``invalid``; raised by :func:`materialize` (the file
    vanished or changed since it was checked) it fails the item without a request.
    """


@dataclass(frozen=True, slots=True)
class ImageInput:
    """One checked input image of a row.

    ``source`` is what the user wrote (a URL, a data URI, or a path as given);
    ``path`` is the resolved absolute path of a ``"path"`` input; ``sha256`` and
    ``size_bytes`` describe the image bytes (``None`` for a URL, which is not fetched).
    """

    field: str
    source: str
    kind: InputKind
    sha256: str | None = None
    path: Path | None = None
    size_bytes: int | None = None

    @property
    def identity(self) -> str:
        """What stands for the input in a fingerprint: its sha256, or a URL itself."""
        return self.sha256 if self.sha256 is not None else self.source


class InputRecord(TypedDict):
    """One entry of a manifest record's ``inputs`` list."""

    field: str
    source: str
    sha256: str | None


def input_kind(source: str) -> InputKind | None:
    """``"url"``, ``"data"``, ``"path"``, or ``None`` for a URL of another scheme.

    >>> [input_kind(s) for s in ("HTTPS://x/a.png", "data:image/png;base64,AA", "a.png")]
    ['url', 'data', 'path']
    """
    head = source[:8].lower()
    if head.startswith(("http://", "https://")):
        return "url"
    if head.startswith("data:"):
        return "data"
    if _SCHEME_RE.match(source):
        return None
    return "path"


def abbreviate_source(source: str) -> str:
    """``source``, with a data URI cut to its start and its length (records stay small).

    >>> abbreviate_source("data:image/png;base64," + "A" * 1000)
    'data:image/png;base64,AAAAAAAAAAAAAAAAAA… (1022 chars)'
    """
    if input_kind(source) != "data" or len(source) <= _SHOWN_DATA_CHARS:
        return source
    return f"{source[:_SHOWN_DATA_CHARS]}… ({len(source)} chars)"


def input_records(inputs: Iterable[ImageInput]) -> list[InputRecord]:
    """The ``inputs`` list of a manifest record: field, source as written, sha256."""
    return [
        {"field": i.field, "source": abbreviate_source(i.source), "sha256": i.sha256}
        for i in inputs
    ]


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"


class InputChecker:
    """Checks the image inputs of rows; relative paths are taken from ``base_dir``.

    The digest of a file is cached by ``(path, size, mtime_ns)`` for the last
    ``cache_size`` files, so memory is bounded however many rows there are;
    ``files_hashed`` counts the files actually read.
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        max_bytes: int = MAX_INPUT_BYTES,
        cache_size: int = _DIGEST_CACHE_SIZE,
    ) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.max_bytes = max_bytes
        self.files_hashed = 0
        self._cache_size = cache_size
        # (path, size, mtime_ns) -> (sha256 hex, None) or (None, the problem found)
        self._digests: OrderedDict[tuple[str, int, int], tuple[str | None, str | None]] = (
            OrderedDict()
        )

    def check(self, field: str, value: Any) -> ImageInput:
        """The checked input for ``value`` in ``field``; raise :class:`InputImageError`."""
        if not isinstance(value, str):
            raise InputImageError(
                f"{field} must be a string (a path, URL or data URI), got {value!r}"
            )
        if not value.strip():
            raise InputImageError(f"{field} is empty")
        kind = input_kind(value)
        if kind == "url":
            return ImageInput(field, value, "url")
        if kind == "data":
            digest, size = self._check_data_uri(field, value)
            return ImageInput(field, value, "data", sha256=digest, size_bytes=size)
        if kind is None:
            raise InputImageError(
                f"{field}: {value} is not an http(s) URL, a data URI or a local path"
            )
        path = Path(os.path.normpath(self.base_dir / os.path.expanduser(value)))
        digest, size = self._check_file(field, value, path)
        return ImageInput(field, value, "path", sha256=digest, path=path, size_bytes=size)

    def _check_data_uri(self, field: str, uri: str) -> tuple[str, int]:
        header, comma, payload = uri.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise InputImageError(f"{field}: a data URI must be data:image/...;base64,...")
        if len(payload) * 3 // 4 > self.max_bytes + 2:
            raise InputImageError(
                f"{field}: the data URI's image is about {_megabytes(len(payload) * 3 // 4)}, "
                f"above the {_megabytes(self.max_bytes)} cap for input images"
            )
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error as exc:
            raise InputImageError(f"{field}: the data URI is not valid base64 ({exc})") from None
        if len(data) > self.max_bytes:
            raise InputImageError(
                f"{field}: the data URI's image is {_megabytes(len(data))}, "
                f"above the {_megabytes(self.max_bytes)} cap for input images"
            )
        if sniff_image_type(data[:_SNIFF_BYTES]) not in _MEDIA_TYPES:
            raise InputImageError(f"{field}: the data URI is not {_KINDS_TEXT}")
        return hashlib.sha256(data).hexdigest(), len(data)

    def _check_file(self, field: str, source: str, path: Path) -> tuple[str, int]:
        try:
            info = os.stat(path)
        except FileNotFoundError:
            raise InputImageError(f"{field}: no such file {source} (looked at {path})") from None
        except OSError as exc:
            raise InputImageError(f"{field}: cannot read {source}: {exc.strerror or exc}") from None
        if not stat.S_ISREG(info.st_mode):
            raise InputImageError(f"{field}: {source} is not a file ({path})")
        if info.st_size > self.max_bytes:
            raise InputImageError(
                f"{field}: {source} is {_megabytes(info.st_size)}, "
                f"above the {_megabytes(self.max_bytes)} cap for input images"
            )
        key = (str(path), info.st_size, info.st_mtime_ns)
        cached = self._digests.get(key)
        if cached is None:
            cached = self._hash_file(path)
            self._digests[key] = cached
            if len(self._digests) > self._cache_size:
                self._digests.popitem(last=False)
        else:
            self._digests.move_to_end(key)
        digest, problem = cached
        if digest is None:
            raise InputImageError(f"{field}: {source} {problem}")
        return digest, info.st_size

    def _hash_file(self, path: Path) -> tuple[str | None, str | None]:
        """``(sha256, None)``, or ``(None, problem)`` to cache as well."""
        self.files_hashed += 1
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                head = f.read(_SNIFF_BYTES)
                if sniff_image_type(head) not in _MEDIA_TYPES:
                    return None, f"is not {_KINDS_TEXT}"
                h.update(head)
                while chunk := f.read(_CHUNK_BYTES):
                    h.update(chunk)
        except OSError as exc:
            return None, f"cannot be read: {exc.strerror or exc}"
        return h.hexdigest(), None


def _data_uri_of(item: ImageInput) -> str:
    """Read a checked file again and encode it; refuse it if it is not what was checked."""
    assert item.path is not None and item.size_bytes is not None
    try:
        with open(item.path, "rb") as f:
            data = f.read(item.size_bytes + 1)
    except OSError as exc:
        raise InputImageError(
            f"{item.field}: cannot read {item.source}: {exc.strerror or exc}"
        ) from None
    if len(data) != item.size_bytes or hashlib.sha256(data).hexdigest() != item.sha256:
        raise InputImageError(
            f"{item.field}: {item.source} changed since it was checked; run again to use it"
        )
    media_type = _MEDIA_TYPES[sniff_image_type(data[:_SNIFF_BYTES]) or "png"]
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def _data_uris(files: Sequence[ImageInput]) -> dict[str, str]:
    return {item.field: _data_uri_of(item) for item in files}


async def materialize(
    request: Mapping[str, Any], inputs: Sequence[ImageInput]
) -> Mapping[str, Any]:
    """The body to send: ``request`` with each local file input replaced by its data URI.

    The files are read in a worker thread; ``request`` is returned unchanged (no copy)
    when no input is a local file. Raises :class:`InputImageError` if a file vanished
    or changed since it was checked.
    """
    files = [item for item in inputs if item.kind == "path"]
    if not files:
        return request
    uris = await asyncio.to_thread(_data_uris, files)
    return {**request, **uris}
