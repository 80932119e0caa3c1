"""Every exception sfbatch raises, and what the engine does with each.

Third-party exceptions (aiohttp, OS errors) are translated into these at exactly one
boundary each: :mod:`sfbatch.client` for the API, :mod:`sfbatch.downloader` for
image URLs. The tree, with the engine's reaction::

    SfbatchError
    ├── ConfigError (ValueError)           bad flags, job file, models file   → exit 2
    │   ├── InputFileError                 prompt file unreadable / missing     → exit 2
    │   └── OutDirInUseError               another run holds DIR's lock         → exit 2
    ├── ApiError                           the API answered with an error
    │   ├── BadRequestError                400 and other 4xx: the item fails, not retried
    │   │   └── ModelDisabledError         403 code 30003: that model's rows fail
    │   ├── FatalApiError                  the whole job stops                 → exit 3
    │   │   ├── AuthenticationError        401: bad or missing key
    │   │   └── EndpointNotFoundError      404 on the API path: wrong base URL
    │   ├── RateLimitError                 429: slow down on ``limit``, retry
    │   │   └── DailyQuotaError            429 naming a daily limit (IPD/RPD)  → exit 4
    │   │                                  (also a QuotaReachedError)
    │   └── ServerError                    5xx: retry with backoff
    ├── RunBlockedError                    outside the run, something must be   → exit 5
    │   │                                  fixed; no new request, rerun resumes
    │   ├── AccountBlockedError            403 balance / real-name verification /
    │   │                                  other 403 (also an ApiError)
    │   ├── OutputWriteError (OSError)     DIR refused a write (permissions, read-only)
    │   │   └── DiskFullError              ENOSPC / EDQUOT while writing
    │   └── OutageError                    endpoint unreachable past the outage limit
    ├── TransportError (ConnectionError)   reset, refused, truncated body: retry;
    │   │                                  ``connection_level`` when the endpoint could
    │   │                                  not be reached at all (the outage detector's cue)
    │   └── RequestTimeoutError (TimeoutError)
    ├── QuotaReachedError                  our own ipd budget is used up       → exit 4
    ├── MalformedResponseError             a 200 that is not the documented JSON: retry
    └── DownloadError                      fetching an image URL failed
        ├── ExpiredUrlError                403/404/410: generate again with the same seed
        ├── NotAnImageError                the bytes are not PNG/JPEG/WEBP: retry
        └── ImageTooLargeError             over the size cap: the item fails

``retryable`` on every error says whether trying the same thing again can help.
Messages never contain the API key: the client never puts it in one, and
:func:`redact` scrubs (and cuts to length) any text that came from the server or the
environment, including a key cut in two at the end of the text.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import Any

__all__ = [
    "DAILY_LIMITS",
    "DISK_FULL_ERRNOS",
    "OUTPUT_ERRNOS",
    "AccountBlockedError",
    "ApiError",
    "AuthenticationError",
    "BadRequestError",
    "ConfigError",
    "DailyQuotaError",
    "DiskFullError",
    "DownloadError",
    "EndpointNotFoundError",
    "ExpiredUrlError",
    "FatalApiError",
    "ImageTooLargeError",
    "InputFileError",
    "MalformedResponseError",
    "ModelDisabledError",
    "NotAnImageError",
    "OutDirInUseError",
    "OutageError",
    "OutputWriteError",
    "QuotaReachedError",
    "RateLimitError",
    "RequestTimeoutError",
    "RunBlockedError",
    "ServerError",
    "SfbatchError",
    "TransportError",
    "is_connection_level",
    "redact",
    "redact_each",
]

# The limits a 429 can name that reset only with the account's day.
DAILY_LIMITS = frozenset({"IPD", "RPD", "TPD"})
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# What a file write in the output directory fails with when the directory, not the run,
# is at fault (never a network errno: a reset connection is not a disk's problem).
OUTPUT_ERRNOS = DISK_FULL_ERRNOS | {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.EIO,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EFBIG,
    errno.EEXIST,  # a file where a directory of DIR's tree should be
}
# A key fragment this short at a cut is harmless ("sk-" is public); longer ones are scrubbed.
_MAX_FRAGMENT_CHARS = 3


class SfbatchError(Exception):
    """Base of every sfbatch error."""

    retryable: bool = False

    def to_record(self) -> dict[str, Any]:
        """The ``error`` object of a manifest record."""
        return {"status": None, "code": type(self).__name__, "message": str(self)}


class ConfigError(SfbatchError, ValueError):
    """A flag, job file or models file is wrong; the message names the key and file."""


class InputFileError(ConfigError):
    """The prompt file cannot be opened or read at all."""


class OutDirInUseError(ConfigError):
    """Another run holds the output directory's lock; the message names it (pid, host, start)."""


class ApiError(SfbatchError):
    """The API answered with an error status."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: int | str | None = None,
        trace_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.trace_id = trace_id
        self.retry_after_s = retry_after_s

    def to_record(self) -> dict[str, Any]:
        return {"status": self.status, "code": self.code, "message": str(self)}


class BadRequestError(ApiError):
    """400 or another 4xx: this request will never succeed unchanged."""


class ModelDisabledError(BadRequestError):
    """403 code 30003: ``model`` is disabled for this account; only its rows fail."""

    def __init__(
        self,
        message: str,
        *,
        model: str | None,
        status: int = 403,
        code: int | str | None = 30003,
        trace_id: str | None = None,
    ) -> None:
        super().__init__(message, status=status, code=code, trace_id=trace_id)
        self.model = model


class FatalApiError(ApiError):
    """Nothing will succeed: the job must stop (exit 3)."""


class AuthenticationError(FatalApiError):
    """401: the API key is missing, wrong, or not valid for this endpoint."""


class EndpointNotFoundError(FatalApiError):
    """404 on the API path: the base URL is wrong."""


class RateLimitError(ApiError):
    """429: over one of the account's limits; ``limit`` is the one the server named, if any.

    ``limit`` is ``"RPM"``, ``"IPM"``, ``"TPM"``, ``"IPD"``, ``"RPD"``, ``"TPD"`` or ``None``.
    """

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        status: int = 429,
        code: int | str | None = None,
        trace_id: str | None = None,
        retry_after_s: float | None = None,
        limit: str | None = None,
    ) -> None:
        super().__init__(
            message, status=status, code=code, trace_id=trace_id, retry_after_s=retry_after_s
        )
        self.limit = limit


class QuotaReachedError(SfbatchError):
    """The images-per-day budget is used up: stop taking work, resume tomorrow (exit 4)."""


class DailyQuotaError(RateLimitError, QuotaReachedError):
    """429 whose details name a daily limit: nothing more today (exit 4)."""

    retryable = False


class ServerError(ApiError):
    """5xx: the service is overloaded or failed; try again later."""

    retryable = True


class RunBlockedError(SfbatchError):
    """Something outside the run must be fixed first: stop sending, land in-flight work, exit 5.

    The message says what happened and what to do; running the same command again resumes.
    """


class AccountBlockedError(RunBlockedError, ApiError):
    """403 for the account (balance, real-name verification, permission): not the key's fault."""


class OutputWriteError(RunBlockedError, OSError):
    """The output directory refused a write (permissions, a read-only or failing disk):
    the run stops (exit 5), paid images not yet written kept by their URL."""

    def __init__(self, message: str, *, errno_: int, path: str | None = None) -> None:
        super().__init__(errno_, message)
        self.message = message
        self.filename = path

    def __str__(self) -> str:
        return self.message


class DiskFullError(OutputWriteError):
    """ENOSPC / EDQUOT while writing into the output directory."""


class OutageError(RunBlockedError):
    """The endpoint stayed unreachable for longer than ``outage_timeout_s``."""

    def __init__(self, message: str, *, down_s: float) -> None:
        super().__init__(message)
        self.down_s = down_s


class TransportError(SfbatchError, ConnectionError):
    """The connection failed, was reset, or the body was cut short.

    ``connection_level`` is true when no HTTP answer came at all because the endpoint
    could not be reached (refused, DNS, reset before any response, connect timeout):
    the cue for :mod:`sfbatch.outage`, as opposed to a failure of this one request.
    """

    retryable = True

    def __init__(self, message: str, *, connection_level: bool = False) -> None:
        super().__init__(message)
        self.connection_level = connection_level


class RequestTimeoutError(TransportError, TimeoutError):
    """No complete answer within the deadline."""


class MalformedResponseError(SfbatchError):
    """A 200 whose body is not the documented JSON (or has no images)."""

    retryable = True


class DownloadError(SfbatchError):
    """Fetching an image URL failed."""

    retryable = True


class ExpiredUrlError(DownloadError):
    """The image URL answered 403/404/410: generate the item again with the same seed."""

    retryable = False


class NotAnImageError(DownloadError):
    """The URL served bytes that are not an image."""


class ImageTooLargeError(DownloadError):
    """The image is larger than the configured cap."""

    retryable = False


def is_connection_level(exc: BaseException) -> bool:
    """Whether ``exc`` says the endpoint could not be reached at all (see TransportError)."""
    return isinstance(exc, TransportError) and exc.connection_level


def redact(text: str, secret: str | None, *, max_chars: int | None = None) -> str:
    """``text`` cut to ``max_chars``, then every piece of ``secret`` in it replaced by ``***``.

    Cutting first and scrubbing after is what makes a cut safe: a key split by this cut,
    or by an earlier one elsewhere, leaves a prefix or suffix of itself in the text, and
    any such piece longer than a few characters is scrubbed, not only the whole key.

    >>> redact("Bearer sk-abcdef failed", "sk-abcdef")
    'Bearer *** failed'
    >>> redact("key: sk-abcdef", "sk-abcdef", max_chars=12)
    'key: ***'
    """
    if max_chars is not None and len(text) > max_chars:
        text = text[:max_chars]
    if not secret:
        return text
    if len(secret) <= _MAX_FRAGMENT_CHARS:
        return text.replace(secret, "***")
    text = _scrub_prefixes(text, secret)
    return _scrub_prefixes(text[::-1], secret[::-1])[::-1]  # the suffixes


def redact_each(text: str, secrets: Iterable[str]) -> str:
    """:func:`redact` for several secrets (a run's keys)."""
    for secret in secrets:
        text = redact(text, secret)
    return text


def _scrub_prefixes(text: str, secret: str) -> str:
    """Replace every run of ``text`` that is a long enough prefix of ``secret``."""
    head = secret[: _MAX_FRAGMENT_CHARS + 1]
    parts: list[str] = []
    start = 0
    while (found := text.find(head, start)) >= 0:
        end = found + len(head)
        while end - found < len(secret) and end < len(text) and text[end] == secret[end - found]:
            end += 1
        parts += (text[start:found], "***")
        start = end
    parts.append(text[start:])
    return "".join(parts)
