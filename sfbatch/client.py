"""One request to ``POST {base_url}/images/generations``, with errors mapped once.

This module is the only place aiohttp's exceptions and the API's error statuses are
turned into :mod:`sfbatch.errors`; everything above it reasons in those terms::

    async with SiliconFlowClient(base_url=url, api_key=key) as client:
        generation = await client.generate({"prompt": "a lighthouse", "seed": 7})
        print(generation.urls, generation.seed)

The API key is sent in the ``Authorization`` header and nowhere else; no message built
here contains it, and text the server sends back is passed through :func:`redact`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
import orjson

from sfbatch.errors import (
    ApiError,
    AuthenticationError,
    BadRequestError,
    DailyQuotaError,
    EndpointNotFoundError,
    MalformedResponseError,
    RateLimitError,
    RequestTimeoutError,
    ServerError,
    TransportError,
    redact,
)

__all__ = ["TRACE_HEADER", "Generation", "SiliconFlowClient"]

TRACE_HEADER = "x-siliconcloud-trace-id"
_MAX_ERROR_BODY = 64 * 1024
_DAILY_MARKERS = ("IPD", "RPD", "per day", "daily")


@dataclass(frozen=True, slots=True)
class Generation:
    """A successful generation: temporary image URLs and what the server reports."""

    urls: tuple[str, ...]
    seed: int | None
    inference_s: float | None
    trace_id: str | None
    latency_s: float


class SiliconFlowClient:
    """An async client for the images endpoint; create and use it inside a running loop.

    Pass ``session`` to share one; otherwise the client owns a session it closes on exit.
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        session: aiohttp.ClientSession | None = None,
        request_timeout_s: float = 300.0,
        connect_timeout_s: float = 30.0,
        max_connections: int = 100,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
        }
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(
            total=request_timeout_s, sock_connect=connect_timeout_s
        )
        self._max_connections = max_connections

    def __repr__(self) -> str:
        return f"SiliconFlowClient(base_url={self.base_url!r})"

    async def __aenter__(self) -> SiliconFlowClient:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=self._timeout,
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use the client as `async with SiliconFlowClient(...)`")
        return self._session

    async def generate(self, request: Mapping[str, Any]) -> Generation:
        """Send one generation request; raise a :class:`~sfbatch.errors.SfbatchError` on failure."""
        url = f"{self.base_url}/images/generations"
        started = time.monotonic()
        try:
            async with self.session.post(
                url, data=orjson.dumps(request), headers=self._headers, timeout=self._timeout
            ) as resp:
                trace_id = resp.headers.get(TRACE_HEADER)
                if resp.status != 200:
                    body = await resp.content.read(_MAX_ERROR_BODY)
                    raise self._api_error(resp, body, trace_id)
                body = await resp.read()
        except TimeoutError as exc:
            raise RequestTimeoutError(f"no complete answer from {url} in time") from exc
        except aiohttp.ClientError as exc:
            raise TransportError(self._describe(exc, url)) from exc
        return self._parse_success(body, trace_id, time.monotonic() - started)

    async def list_models(self) -> list[str]:
        """The image models the endpoint lists (``GET /models?type=image``)."""
        url = f"{self.base_url}/models"
        try:
            async with self.session.get(
                url, params={"type": "image"}, headers=self._headers, timeout=self._timeout
            ) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise self._api_error(resp, body, resp.headers.get(TRACE_HEADER))
        except TimeoutError as exc:
            raise RequestTimeoutError(f"no complete answer from {url} in time") from exc
        except aiohttp.ClientError as exc:
            raise TransportError(self._describe(exc, url)) from exc
        try:
            data = orjson.loads(body)["data"]
            return [str(item["id"]) for item in data]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise MalformedResponseError(f"{url}: unexpected models listing") from exc

    def _describe(self, exc: BaseException, url: str) -> str:
        return redact(f"{type(exc).__name__} talking to {url}: {exc}", self._api_key)

    def _parse_success(self, body: bytes, trace_id: str | None, latency_s: float) -> Generation:
        try:
            doc = orjson.loads(body)
            urls = tuple(str(image["url"]) for image in doc["images"])
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise MalformedResponseError(
                f"200 without the documented images[].url (trace {trace_id})"
            ) from exc
        if not urls or not all(urls):
            raise MalformedResponseError(f"200 with no image URLs (trace {trace_id})")
        seed = doc.get("seed")
        timings = doc.get("timings")
        inference = timings.get("inference") if isinstance(timings, dict) else None
        return Generation(
            urls=urls,
            seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
            inference_s=float(inference) if isinstance(inference, int | float) else None,
            trace_id=trace_id,
            latency_s=latency_s,
        )

    def _api_error(
        self, resp: aiohttp.ClientResponse, body: bytes, trace_id: str | None
    ) -> ApiError:
        status = resp.status
        code, message = _error_fields(body)
        message = redact(message, self._api_key)
        where = f"{resp.method} {resp.url.path}"
        if status in (401, 403):
            return AuthenticationError(
                f"{status} from {where}: {message or 'invalid token'}; check SILICONFLOW_API_KEY "
                "and that the key belongs to this endpoint (.cn and .com keys differ)",
                status=status,
                code=code,
                trace_id=trace_id,
            )
        if status == 404:
            return EndpointNotFoundError(
                f"404 from {where}: the base URL {self.base_url} does not serve the images API "
                "(it should end in /v1)",
                status=status,
                code=code,
                trace_id=trace_id,
            )
        if status == 429:
            retry_after = _retry_after_s(resp.headers.get("Retry-After"))
            cls = DailyQuotaError if any(m in message for m in _DAILY_MARKERS) else RateLimitError
            return cls(
                f"429: {message}",
                status=429,
                code=code,
                trace_id=trace_id,
                retry_after_s=retry_after,
            )
        if status >= 500:
            return ServerError(
                f"{status}: {message or 'server error'}",
                status=status,
                code=code,
                trace_id=trace_id,
            )
        return BadRequestError(
            f"{status}: {message or 'request rejected'}",
            status=status,
            code=code,
            trace_id=trace_id,
        )


def _error_fields(body: bytes) -> tuple[int | str | None, str]:
    """``(code, message)`` from an error body: JSON object, JSON string, or plain text."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, body.decode("utf-8", "replace").strip()[:500]
    if isinstance(doc, dict):
        code = doc.get("code")
        message = doc.get("message") or doc.get("error") or ""
        return (code if isinstance(code, int | str) else None), str(message)[:500]
    return None, str(doc)[:500]


def _retry_after_s(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare here, and the adaptive limiter copes without it
