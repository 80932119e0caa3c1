"""Every exception sfbatch raises, and what the engine does with each.

Third-party exceptions (aiohttp, OS errors) are translated into these at exactly one
boundary each: :mod:`sfbatch.client` for the API, :mod:`sfbatch.downloader` for
image URLs. The tree, with the engine's reaction::

    SfbatchError
    ├── ConfigError (ValueError)           bad flags, job file, models file   → exit 2
    │   └── InputFileError                 prompt file unreadable / missing     → exit 2
    ├── ApiError                           the API answered with an error
    │   ├── BadRequestError                400 and other 4xx: the item fails, not retried
    │   ├── FatalApiError                  the whole job stops                 → exit 3
    │   │   ├── AuthenticationError        401 / 403: bad or missing key
    │   │   └── EndpointNotFoundError      404 on the API path: wrong base URL
    │   ├── RateLimitError                 429: slow the whole engine down, retry
    │   │   └── DailyQuotaError            429 naming a daily limit (IPD/RPD)  → exit 4
    │   │                                  (also a QuotaReachedError)
    │   └── ServerError                    5xx: retry with backoff
    ├── TransportError (ConnectionError)   reset, refused, truncated body: retry
    │   └── RequestTimeoutError (TimeoutError)
    ├── QuotaReachedError                  our own ipd budget is used up       → exit 4
    ├── MalformedResponseError             a 200 that is not the documented JSON: retry
    └── DownloadError                      fetching an image URL failed
        ├── ExpiredUrlError                403/404/410: generate again with the same seed
        ├── NotAnImageError                the bytes are not PNG/JPEG/WEBP: retry
        └── ImageTooLargeError             over the size cap: the item fails

``retryable`` on every error says whether trying the same thing again can help.
Messages never contain the API key: the client never puts it in one, and
:func:`redact` scrubs any text that came back from elsewhere.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ApiError",
    "AuthenticationError",
    "BadRequestError",
    "ConfigError",
    "DailyQuotaError",
    "DownloadError",
    "EndpointNotFoundError",
    "ExpiredUrlError",
    "FatalApiError",
    "ImageTooLargeError",
    "InputFileError",
    "MalformedResponseError",
    "NotAnImageError",
    "QuotaReachedError",
    "RateLimitError",
    "RequestTimeoutError",
    "ServerError",
    "SfbatchError",
    "TransportError",
    "redact",
]


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


class FatalApiError(ApiError):
    """Nothing will succeed: the job must stop (exit 3)."""


class AuthenticationError(FatalApiError):
    """401/403: the API key is missing, wrong, or not valid for this endpoint."""


class EndpointNotFoundError(FatalApiError):
    """404 on the API path: the base URL is wrong."""


class RateLimitError(ApiError):
    """429: over the account's per-minute limits."""

    retryable = True


class QuotaReachedError(SfbatchError):
    """The images-per-day budget is used up: stop taking work, resume tomorrow (exit 4)."""


class DailyQuotaError(RateLimitError, QuotaReachedError):
    """429 whose details name a daily limit: nothing more today (exit 4)."""

    retryable = False


class ServerError(ApiError):
    """5xx: the service is overloaded or failed; try again later."""

    retryable = True


class TransportError(SfbatchError, ConnectionError):
    """The connection failed, was reset, or the body was cut short."""

    retryable = True


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


def redact(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` replaced by ``***``.

    >>> redact("Bearer sk-abc failed", "sk-abc")
    'Bearer *** failed'
    """
    if not secret:
        return text
    return text.replace(secret, "***")
