"""One request to ``POST {base_url}/images/generations``, with errors mapped once.

This module is the only place aiohttp's exceptions and the API's error statuses are
turned into :mod:`sfbatch.errors`; everything above it reasons in those terms::

    async with SiliconFlowClient(base_url=url, api_key=key) as client:
        generation = await client.generate({"prompt": "a lighthouse", "seed": 7})
        print(generation.urls, generation.seed)

Statuses: 400 and other 4xx → :class:`BadRequestError`; 401 → :class:`AuthenticationError`;
403 code 30003 / "Model disabled" → :class:`ModelDisabledError`; any other 403 (balance
30001, real-name verification, permission) → :class:`AccountBlockedError`; 404 →
:class:`EndpointNotFoundError`; 429 → :class:`RateLimitError` with the limit it names
(:class:`DailyQuotaError` for IPD/RPD/TPD); 5xx → :class:`ServerError`; a 200 without
image URLs → :class:`MalformedResponseError`. Exceptions: see :data:`TRANSPORT_ERRORS`.

The API key is sent in the ``Authorization`` header and nowhere else; every string that
came from the server (message, code, trace id, text body) or from the environment (base
URL) is cut to length and passed through :func:`redact`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from sfbatch.aio import AsyncResource
from sfbatch.deadlines import Deadlines
from sfbatch.errors import (
    DAILY_LIMITS,
    AccountBlockedError,
    ApiError,
    AuthenticationError,
    BadRequestError,
    DailyQuotaError,
    EndpointNotFoundError,
    MalformedResponseError,
    ModelDisabledError,
    RateLimitError,
    RequestTimeoutError,
    ServerError,
    TransportError,
    redact,
)

__all__ = [
    "TRACE_HEADER",
    "TRANSPORT_ERRORS",
    "Generation",
    "SiliconFlowClient",
    "map_transport_error",
]

TRACE_HEADER = "x-siliconcloud-trace-id"
_MAX_ERROR_BODY = 64 * 1024
_MAX_MESSAGE_CHARS = 500
_MAX_CODE_CHARS = 100
_DAILY_MARKERS = ("per day", "daily")
_NAMED_LIMIT = re.compile(r"\b(RPM|RPD|TPM|TPD|IPM|IPD)\b")
_VERIFICATION_MARKERS = ("real-name", "real name", "realname", "verif", "实名")

# Every exception the client can see while talking to the API, most specific first:
# (class, what it becomes, whether the endpoint could not be reached at all).
TRANSPORT_ERRORS: tuple[tuple[type[BaseException], type[TransportError], bool], ...] = (
    (aiohttp.ConnectionTimeoutError, RequestTimeoutError, True),  # connect timeout
    (aiohttp.ServerTimeoutError, RequestTimeoutError, False),  # a read stalled
    (aiohttp.ClientHttpProxyError, TransportError, True),  # the proxy would not connect
    (aiohttp.ServerFingerprintMismatch, TransportError, False),
    # refused, DNS, TLS, reset, closed before any response:
    (aiohttp.ClientConnectionError, TransportError, True),
    # truncated body, redirects, bad content type, aborted upload:
    (aiohttp.ClientError, TransportError, False),
    (TimeoutError, RequestTimeoutError, False),  # the request's total deadline
    (ConnectionError, TransportError, True),  # an OS error aiohttp did not wrap
)


@dataclass(frozen=True, slots=True)
class Generation:
    """A successful generation: temporary image URLs and what the server reports."""

    urls: tuple[str, ...]
    seed: int | None
    inference_s: float | None
    trace_id: str | None
    latency_s: float


class SiliconFlowClient(AsyncResource):
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
        deadlines: Deadlines | None = None,
        key_name: str = "SILICONFLOW_API_KEY",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._key_name = key_name  # what a 401 tells the user to check
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
        }
        self._session = session
        self._owns_session = session is None
        # The request's deadline is kept by ``deadlines`` (no timer per request); aiohttp
        # keeps only the connect timeout, which costs a timer per new connection.
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s)
        self._request_timeout_s = request_timeout_s
        self._deadlines = deadlines or Deadlines()
        self._max_connections = max_connections

    def __repr__(self) -> str:
        return f"SiliconFlowClient(base_url={self.base_url!r})"

    async def _open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=self._timeout,
            )

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    close = aclose  # the name callers used before the shared AsyncResource

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use the client as `async with SiliconFlowClient(...)`")
        return self._session

    async def generate(self, request: Mapping[str, Any]) -> Generation:
        """Send one generation request; raise a :class:`~sfbatch.errors.SfbatchError` on failure."""
        url = f"{self.base_url}/images/generations"
        clock = asyncio.get_running_loop().time  # the limiter's and the window's clock
        started = clock()
        try:
            with self._deadlines.within(self._request_timeout_s):
                async with self.session.post(
                    url, data=orjson.dumps(request), headers=self._headers, timeout=self._timeout
                ) as resp:
                    trace_id = self._trace_id(resp)
                    if resp.status != 200:
                        body = await _read_capped(resp, _MAX_ERROR_BODY)
                        raise self._api_error(resp, body, trace_id, model=request.get("model"))
                    body = await resp.read()
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            raise map_transport_error(exc, url, secret=self._api_key) from exc
        return self._parse_success(body, trace_id, clock() - started)

    async def list_models(self) -> list[str]:
        """The image models the endpoint lists (``GET /models?type=image``)."""
        url = f"{self.base_url}/models"
        try:
            with self._deadlines.within(self._request_timeout_s):
                async with self.session.get(
                    url, params={"type": "image"}, headers=self._headers, timeout=self._timeout
                ) as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        raise self._api_error(resp, body, self._trace_id(resp))
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            raise map_transport_error(exc, url, secret=self._api_key) from exc
        try:
            data = orjson.loads(body)["data"]
            return [self._server_text(str(item["id"])) for item in data]  # shown to users
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise MalformedResponseError(f"{url}: unexpected models listing") from exc

    async def probe(self, *, timeout_s: float = 30.0) -> None:
        """Return once the endpoint gives any HTTP answer (even an error status).

        Raises the mapped :class:`TransportError` when it cannot be reached: the
        outage detector's probe (``GET {base_url}/models``, which costs nothing).
        """
        url = f"{self.base_url}/models"
        try:
            with self._deadlines.within(timeout_s):
                async with self.session.get(url, headers=self._headers, timeout=self._timeout):
                    pass
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            raise map_transport_error(exc, url, secret=self._api_key) from exc

    def _trace_id(self, resp: aiohttp.ClientResponse) -> str | None:
        trace_id = resp.headers.get(TRACE_HEADER)
        return None if trace_id is None else redact(trace_id, self._api_key, max_chars=200)

    def _server_text(self, text: str) -> str:
        return redact(text, self._api_key, max_chars=_MAX_MESSAGE_CHARS)

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
        self,
        resp: aiohttp.ClientResponse,
        body: bytes,
        trace_id: str | None,
        *,
        model: object = None,
    ) -> ApiError:
        status = resp.status
        raw_code, raw_message = _error_fields(body)
        message = self._server_text(raw_message)
        code = (
            redact(raw_code, self._api_key, max_chars=_MAX_CODE_CHARS)
            if isinstance(raw_code, str)
            else raw_code
        )
        where = f"{resp.method} {self._server_text(resp.url.path)}"
        fields: dict[str, Any] = {"status": status, "code": code, "trace_id": trace_id}
        if status == 401:
            return AuthenticationError(
                f"401 from {where}: {message or 'invalid token'}; check {self._key_name} "
                "and that the key belongs to this endpoint (.cn and .com keys differ)",
                **fields,
            )
        if status == 403:
            return _forbidden(where, message, code, model=model, fields=fields)
        if status == 404:
            base_url = self._server_text(self.base_url)
            return EndpointNotFoundError(
                f"404 from {where}: the base URL {base_url} does not serve the images API "
                "(it should end in /v1)",
                **fields,
            )
        if status == 429:
            # Read from the whole message: the limit is named at its end, past the cut.
            limit = _named_limit(raw_message)
            daily = limit in DAILY_LIMITS or (
                limit is None and any(m in raw_message.lower() for m in _DAILY_MARKERS)
            )
            cls = DailyQuotaError if daily else RateLimitError
            return cls(
                f"429: {message}",
                **fields,
                retry_after_s=_retry_after_s(resp.headers.get("Retry-After")),
                limit=limit,
            )
        if status >= 500:
            return ServerError(f"{status}: {message or 'server error'}", **fields)
        return BadRequestError(f"{status}: {message or 'request rejected'}", **fields)


def map_transport_error(exc: BaseException, url: str, *, secret: str | None) -> TransportError:
    """The :class:`TransportError` for an exception raised while talking to ``url``."""
    mapped, connection_level = next(
        ((to, level) for cls, to, level in TRANSPORT_ERRORS if isinstance(exc, cls)),
        (TransportError, False),
    )
    try:
        detail = str(exc)
    except Exception:  # a __str__ reading attributes its constructor did not set
        detail = " ".join(map(str, exc.args))
    detail = detail or ("no answer in time" if isinstance(exc, TimeoutError) else "")
    text = redact(f"{type(exc).__name__} talking to {url}: {detail}", secret, max_chars=600)
    return mapped(text, connection_level=connection_level)


def _forbidden(
    where: str, message: str, code: int | str | None, *, model: object, fields: dict[str, Any]
) -> ApiError:
    """403: a model disabled for the account fails its rows; anything else blocks the account."""
    said = f'the server said "{message or "forbidden"}"' + (
        f" (code {code})" if code is not None else ""
    )
    lowered = message.lower()
    if str(code) == "30003" or "model disabled" in lowered:
        name = model if isinstance(model, str) else None
        return ModelDisabledError(
            f"403 from {where}: {said}: the model {name or '(default)'} is disabled for this "
            "account; its rows fail, the other models go on",
            model=name,
            **fields,
        )
    if str(code) == "30001" or "balance" in lowered:
        todo = "top up the account's balance in the SiliconFlow console"
    elif any(marker in lowered for marker in _VERIFICATION_MARKERS):
        todo = "complete the account's real-name verification in the SiliconFlow console"
    else:
        todo = "check the account's balance, real-name verification and permissions"
    return AccountBlockedError(
        f"403 from {where}: {said}: {todo}, then run the same command again to resume",
        **fields,
    )


async def _read_capped(resp: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """Up to ``max_bytes`` of the body (``content.read(n)`` alone stops at the first chunk)."""
    chunks: list[bytes] = []
    size = 0
    while size < max_bytes:
        chunk = await resp.content.read(max_bytes - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _error_fields(body: bytes) -> tuple[int | str | None, str]:
    """``(code, message)`` from an error body: JSON object, JSON string, or plain text.

    Nothing is cut or redacted here: the caller does both, in that order.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, body.decode("utf-8", "replace").strip()
    if isinstance(doc, dict):
        code = doc.get("code")
        message = doc.get("message") or doc.get("error") or ""
        if isinstance(code, bool) or not isinstance(code, int | str):
            code = None
        return code, str(message)
    return None, str(doc)


def _named_limit(message: str) -> str | None:
    """The limit a 429 names (``... Details:IPM limit reached.`` → ``"IPM"``), if any."""
    found = _NAMED_LIMIT.findall(message)
    return str(found[-1]) if found else None


def _retry_after_s(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare here, and the adaptive limiter copes without it
