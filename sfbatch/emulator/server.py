"""The SiliconFlow emulator: an aiohttp server that speaks ``/v1/images/generations``.

What each route answers, in the order the checks run (the real API is SiliconFlow's
"create image generation request")::

    POST /v1/images/generations
        401 "Invalid token"                    missing or unknown Bearer key
        400 {"code": 20012, ...}               body not a JSON object, or validate_request() errors
        5xx / connection reset                 a fault drawn from FaultConfig (consumes no quota)
        429 {"message": "...Details:RPM limit reached.", "data": trace}   RPM, then IPM, then IPD
        200 {"images": [{"url"}...], "timings": {"inference"}, "seed"}    after the latency sleep
    GET  /v1/models[?type=image]               the models of the registry (Bearer key required)
    GET  /files/<token>.png                    the image; 404 once the URL expired; image faults
    GET  /_stats                               what the server saw (see Stats.snapshot)
    POST /_control                             {"advance_s", "faults", "limits", "reset_stats"}
    anything else                              404 "404 page not found"

Every response carries an ``x-siliconcloud-trace-id`` header. Only 200 responses
consume quota or count as billed images. The emulator keeps no per-image state:
image URLs are signed tokens (:mod:`sfbatch.emulator.images`).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import orjson
from aiohttp import web

from sfbatch.emulator.images import ImageRef, TokenCodec, prompt_digest, render_png
from sfbatch.emulator.limits import WINDOW_MS, Clock, Limits, RateLimits, SlidingWindow
from sfbatch.models import SEED_MAX, ModelRegistry, validate_request

__all__ = ["TRACE_HEADER", "Emulator", "EmulatorConfig", "FaultConfig"]

TRACE_HEADER: Final = "x-siliconcloud-trace-id"
RATE_LIMIT_MESSAGE: Final = (
    "Request was rejected due to rate limiting. If you want more, please contact "
    "contact@siliconflow.cn. Details:"
)
OVERLOADED_MESSAGE: Final = "Model service overloaded. Please try again later."
_HISTOGRAM_SECONDS = 3600  # per-second histograms keep the last hour


# --------------------------------------------------------------------------- config


def _check_probability(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in 0..1, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class FaultConfig:
    """Probabilities of injected faults, drawn from an RNG seeded with ``seed``.

    Generation faults (``p_503``, ``p_504``, ``p_500``, ``p_reset``) are drawn once
    per generation request and image faults (``p_truncated_image``,
    ``p_stalled_image``, ``p_expired_url``, ``p_not_image``) once per download, so
    each group must sum to at most 1. ``p_reset`` closes the connection without an
    answer; a truncated image promises the full ``Content-Length`` and sends half;
    a stalled image sends half, waits ``stall_s``, then the rest; an expired URL
    answers 404 as a really expired one does; "not an image" is a 200 ``image/png``
    whose body is HTML.
    """

    seed: int = 0
    p_503: float = 0.0
    p_504: float = 0.0
    p_500: float = 0.0
    p_reset: float = 0.0
    p_truncated_image: float = 0.0
    p_stalled_image: float = 0.0
    p_expired_url: float = 0.0
    p_not_image: float = 0.0
    stall_s: float = 30.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name.startswith("p_"):
                _check_probability(f.name, getattr(self, f.name))
        if sum(self.generation_faults) > 1.0 + 1e-9:
            raise ValueError("p_503 + p_504 + p_500 + p_reset must be at most 1")
        if sum(self.image_faults) > 1.0 + 1e-9:
            raise ValueError(
                "p_truncated_image + p_stalled_image + p_expired_url + p_not_image "
                "must be at most 1"
            )
        if not self.stall_s >= 0:
            raise ValueError(f"stall_s must be >= 0, got {self.stall_s!r}")

    @property
    def generation_faults(self) -> tuple[float, float, float, float]:
        return (self.p_503, self.p_504, self.p_500, self.p_reset)

    @property
    def image_faults(self) -> tuple[float, float, float, float]:
        return (self.p_truncated_image, self.p_stalled_image, self.p_expired_url, self.p_not_image)


@dataclass(frozen=True, kw_only=True)
class EmulatorConfig:
    """How an :class:`Emulator` behaves. Limits and faults can also change at runtime.

    ``api_keys``: the Bearer keys accepted; empty accepts any non-empty key. Limits
    are per key. ``retry_after_s``: ``None`` sends no ``Retry-After`` on 429; ``0``
    sends the whole seconds until the refused request would be admitted (at least 1);
    a positive value is sent as is (rounded up to whole seconds). ``day_utc_offset_h``:
    the time zone of the IPD day (SiliconFlow's is UTC+8). Latency: each generation
    sleeps ``latency_s`` plus a uniform draw in ``±latency_jitter_s`` (never below 0)
    and reports it as ``timings.inference``. ``image_px``: serve square images of this
    side instead of the requested ``image_size`` (``None`` serves the requested size).
    Image URLs expire ``url_ttl_s`` after generation. ``seed`` seeds the server-picked
    seeds and the latency draws; faults have their own seed.
    """

    host: str = "127.0.0.1"
    port: int = 0
    api_keys: frozenset[str] = frozenset({"sk-emulator"})
    rpm: int | None = None
    ipm: int | None = None
    ipd: int | None = None
    retry_after_s: float | None = None
    day_utc_offset_h: float = 8.0
    latency_s: float = 0.0
    latency_jitter_s: float = 0.0
    image_px: int | None = 64
    url_ttl_s: float = 3600.0
    faults: FaultConfig = field(default_factory=FaultConfig)
    seed: int = 0
    models_file: Path | None = None

    def __post_init__(self) -> None:
        Limits(rpm=self.rpm, ipm=self.ipm, ipd=self.ipd)  # validates
        if not isinstance(self.api_keys, frozenset):
            object.__setattr__(self, "api_keys", frozenset(self.api_keys))
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.retry_after_s is not None and not self.retry_after_s >= 0:
            raise ValueError(f"retry_after_s must be >= 0 or None, got {self.retry_after_s!r}")
        if not -24 < self.day_utc_offset_h < 24:
            raise ValueError(f"day_utc_offset_h must be within ±24, got {self.day_utc_offset_h}")
        if not (self.latency_s >= 0 and self.latency_jitter_s >= 0):
            raise ValueError("latency_s and latency_jitter_s must be >= 0")
        if self.image_px is not None and not 1 <= self.image_px <= 4096:
            raise ValueError(f"image_px must be 1..4096 or None, got {self.image_px}")
        if not self.url_ttl_s > 0:
            raise ValueError(f"url_ttl_s must be > 0, got {self.url_ttl_s!r}")

    @property
    def limits(self) -> Limits:
        return Limits(rpm=self.rpm, ipm=self.ipm, ipd=self.ipd)


# --------------------------------------------------------------------------- stats


class Stats:
    """Counters of what the server saw; :meth:`snapshot` is ``GET /_stats``."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        self.generation_requests = 0
        self.status_counts: dict[str, int] = {}
        self.images_generated = 0
        self.downloads = 0
        self.download_status_counts: dict[str, int] = {}
        self.images_served = 0
        self.download_bytes = 0
        self.peak_in_flight = self.in_flight
        self._start_ms = self._clock.mono_ms()
        self.accepted_per_s: dict[int, int] = {}
        self.images_per_s: dict[int, int] = {}
        self._window = SlidingWindow()
        self.max_requests_60s = 0
        self.max_images_60s = 0

    def accepted(self, now_ms: int, images: int) -> None:
        """Record a request admitted at ``now_ms`` (it is answered 200 after its latency)."""
        self.images_generated += images
        second = (now_ms - self._start_ms) // 1000
        per_s = self.accepted_per_s
        if second not in per_s:
            per_s[second] = 0
            self.images_per_s[second] = 0
            while len(per_s) > _HISTOGRAM_SECONDS:
                del self.images_per_s[next(iter(per_s))]
                del per_s[next(iter(per_s))]
        per_s[second] += 1
        self.images_per_s[second] += images
        window = self._window
        window.prune(now_ms)
        window.add(now_ms, images)
        self.max_requests_60s = max(self.max_requests_60s, window.requests)
        self.max_images_60s = max(self.max_images_60s, window.images)

    def snapshot(self) -> dict[str, Any]:
        return {
            "generation_requests": self.generation_requests,
            "status_counts": dict(self.status_counts),
            "images_generated": self.images_generated,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "downloads": self.downloads,
            "download_status_counts": dict(self.download_status_counts),
            "images_served": self.images_served,
            "download_bytes": self.download_bytes,
            "accepted_per_s": dict(self.accepted_per_s),
            "images_per_s": dict(self.images_per_s),
            "max_requests_60s": self.max_requests_60s,
            "max_images_60s": self.max_images_60s,
            "window_s": WINDOW_MS // 1000,
            "clock_offset_s": self._clock.offset_s,
        }


# --------------------------------------------------------------------------- responses


def _json(status: int, payload: Any, trace_id: str) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS),
        content_type="application/json",
        headers={TRACE_HEADER: trace_id},
    )


def _not_found(trace_id: str) -> web.Response:
    return web.Response(
        status=404,
        text="404 page not found",
        content_type="text/plain",
        headers={TRACE_HEADER: trace_id},
    )


def _bad_request(message: str, trace_id: str) -> web.Response:
    return _json(400, {"code": 20012, "message": message, "data": trace_id}, trace_id)


def _png_response(body: bytes, trace_id: str) -> web.Response:
    return web.Response(body=body, content_type="image/png", headers={TRACE_HEADER: trace_id})


_NOT_AN_IMAGE = b"<html><body><h1>502 Bad Gateway</h1></body></html>\n"


def _close_connection(request: web.Request) -> web.Response:
    """Drop the connection (after flushing what was written) without an answer.

    The returned response is never sent: aiohttp finds the transport closing and
    treats it as a client disconnect, so the client sees the connection close.
    """
    transport = request.transport
    if transport is not None:
        transport.close()
    return web.Response(status=499)


# --------------------------------------------------------------------------- the app

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _EmulatorApp:
    """The emulator's state and its request handlers."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.registry = ModelRegistry.load(config.models_file)
        self.clock = Clock()
        self.limits = RateLimits(
            config.limits, clock=self.clock, day_utc_offset_h=config.day_utc_offset_h
        )
        self.faults = config.faults
        self._fault_rng = random.Random(config.faults.seed)
        self._rng = random.Random(config.seed)
        self.stats = Stats(self.clock)
        self.tokens = TokenCodec(secrets.token_bytes(16))
        self._trace_prefix = f"ti_{secrets.token_hex(6)}"
        self._trace_counter = itertools.count()
        self.stopping = asyncio.Event()  # replaced by Emulator.start, in the running loop
        self.root_url = ""  # set by Emulator.start

    def set_faults(self, faults: FaultConfig) -> None:
        self.faults = faults
        self._fault_rng = random.Random(faults.seed)

    def trace_id(self) -> str:
        return f"{self._trace_prefix}{next(self._trace_counter):010x}"

    async def pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if the server is stopping."""
        if seconds <= 0:
            return
        try:
            async with asyncio.timeout(seconds):
                await self.stopping.wait()
        except TimeoutError:
            pass

    def _draw(self, probabilities: tuple[float, ...]) -> int | None:
        """Which fault (index into ``probabilities``) happens, if any."""
        r = self._fault_rng.random()
        for i, p in enumerate(probabilities):
            if r < p:
                return i
            r -= p
        return None

    def build_app(self) -> web.Application:
        app = web.Application()
        routes: list[tuple[str, _Handler]] = [
            ("/v1/images/generations", self.generations),
            ("/v1/models", self.models),
            ("/files/{name}", self.image),
            ("/_stats", self.stats_route),
            ("/_control", self.control),
            ("/{tail:.*}", self.unknown),
        ]
        # Every method is routed to the handler (which answers 404 for a wrong one), so
        # no aiohttp default 404/405 page is ever sent without a trace header.
        for path, handler in routes:
            app.router.add_route("*", path, handler)
        return app

    # ----------------------------------------------------------- POST /v1/images/generations

    def _api_key(self, request: web.Request) -> str | None:
        """The Bearer key if it is accepted, else ``None``."""
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return None
        keys = self.config.api_keys
        return key if not keys or key in keys else None

    async def generations(self, request: web.Request) -> web.StreamResponse:
        trace_id = self.trace_id()
        if request.method != "POST":
            return _not_found(trace_id)
        stats = self.stats
        stats.generation_requests += 1
        stats.in_flight += 1
        stats.peak_in_flight = max(stats.peak_in_flight, stats.in_flight)
        try:
            status, response = await self._generate(request, trace_id)
        finally:
            stats.in_flight -= 1
        stats.status_counts[status] = stats.status_counts.get(status, 0) + 1
        return response

    async def _generate(self, request: web.Request, trace_id: str) -> tuple[str, web.Response]:
        key = self._api_key(request)
        if key is None:
            return "401", _json(401, "Invalid token", trace_id)

        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return "400", _bad_request("request body must be JSON", trace_id)
        if not isinstance(body, dict):
            return "400", _bad_request("request body must be a JSON object", trace_id)
        validation = validate_request(body, self.registry, unknown_model="error")
        if validation.request is None:
            return "400", _bad_request("; ".join(validation.errors), trace_id)
        params = validation.request

        if self.faults.p_503 or self.faults.p_504 or self.faults.p_500 or self.faults.p_reset:
            fault = self._draw(self.faults.generation_faults)
            if fault == 0:
                payload = {"code": 50505, "message": OVERLOADED_MESSAGE, "data": trace_id}
                return "503", _json(503, payload, trace_id)
            if fault == 1:
                return "504", _json(504, "Gateway Timeout", trace_id)
            if fault == 2:
                payload = {"code": 50000, "message": "Internal server error", "data": trace_id}
                return "500", _json(500, payload, trace_id)
            if fault == 3:
                return "reset", _close_connection(request)

        batch_size: int = params.get("batch_size", 1)
        now_ms = self.clock.mono_ms()
        refusal = self.limits.admit(key, batch_size, now_ms=now_ms)
        if refusal is not None:
            payload = {"message": RATE_LIMIT_MESSAGE + refusal.details, "data": trace_id}
            response = _json(429, payload, trace_id)
            retry_after = self.config.retry_after_s
            if retry_after is not None:
                seconds = retry_after or refusal.wait_s
                response.headers["Retry-After"] = str(max(1, math.ceil(seconds)))
            return "429", response
        # Counted when admitted, like the limiter, so the two always agree on any window.
        self.stats.accepted(now_ms, batch_size)

        seed: int = params["seed"] if "seed" in params else self._rng.randint(0, SEED_MAX)
        inference_s = self.config.latency_s
        if self.config.latency_jitter_s:
            jitter = self.config.latency_jitter_s
            inference_s = max(0.0, inference_s + self._rng.uniform(-jitter, jitter))
        await self.pause(inference_s)

        width, height = self._image_dimensions(params)
        created_ms = int(self.clock.wall() * 1000)
        digest = prompt_digest(params["prompt"])
        host = request.headers.get("Host")  # request.host would fall back to a DNS lookup
        root = (f"http://{host}" if host else self.root_url) + "/files/"
        images = [
            {
                "url": root
                + self.tokens.encode(ImageRef(seed, digest, index, width, height, created_ms))
                + ".png"
            }
            for index in range(batch_size)
        ]
        payload = {"images": images, "timings": {"inference": round(inference_s, 3)}, "seed": seed}
        return "200", _json(200, payload, trace_id)

    def _image_dimensions(self, params: dict[str, Any]) -> tuple[int, int]:
        if self.config.image_px is not None:
            return self.config.image_px, self.config.image_px
        size = params.get("image_size") or self.registry.rule_for(params["model"]).default_size
        width, _, height = str(size).partition("x")
        return int(width), int(height)

    # ----------------------------------------------------------- GET /v1/models

    async def models(self, request: web.Request) -> web.StreamResponse:
        trace_id = self.trace_id()
        if request.method != "GET":
            return _not_found(trace_id)
        if self._api_key(request) is None:
            return _json(401, "Invalid token", trace_id)
        kind = request.query.get("type", "image")
        data = [
            {
                "id": rule.name,
                "object": "model",
                "created": 0,
                "owned_by": rule.name.partition("/")[0],
            }
            for rule in self.registry
            if kind == "image"
        ]
        return _json(200, {"object": "list", "data": data}, trace_id)

    # ----------------------------------------------------------- GET /files/<token>.png

    async def image(self, request: web.Request) -> web.StreamResponse:
        trace_id = self.trace_id()
        if request.method not in ("GET", "HEAD"):
            return _not_found(trace_id)
        stats = self.stats
        stats.downloads += 1
        name = request.match_info["name"]
        ref = self.tokens.decode(name[:-4]) if name.endswith(".png") else None
        expired = ref is not None and (
            self.clock.wall() * 1000 - ref.created_ms >= self.config.url_ttl_s * 1000
        )
        if ref is None or expired:
            self._count_download("404")
            return _not_found(trace_id)

        fault = self._draw(self.faults.image_faults) if any(self.faults.image_faults) else None
        if fault == 2:  # expired before its time
            self._count_download("404")
            return _not_found(trace_id)
        if fault == 3:
            self._count_download("not_image")
            stats.download_bytes += len(_NOT_AN_IMAGE)
            return _png_response(_NOT_AN_IMAGE, trace_id)

        png = render_png(ref.seed, ref.digest, ref.index, ref.width, ref.height)
        if fault is None:
            self._count_download("200")
            stats.images_served += 1
            stats.download_bytes += len(png)
            return _png_response(png, trace_id)
        return await self._faulty_image(request, png, trace_id, stalled=fault == 1)

    async def _faulty_image(
        self, request: web.Request, png: bytes, trace_id: str, *, stalled: bool
    ) -> web.StreamResponse:
        """Send the headers and half the body; then either stop dead or stall first."""
        response = web.StreamResponse(headers={TRACE_HEADER: trace_id})
        response.content_type = "image/png"
        response.content_length = len(png)
        half = len(png) // 2
        self._count_download("stalled" if stalled else "truncated")
        try:
            await response.prepare(request)
            await response.write(png[:half])
            self.stats.download_bytes += half
            if not stalled:
                _close_connection(request)
                return response
            await self.pause(self.faults.stall_s)
            await response.write(png[half:])
            self.stats.download_bytes += len(png) - half
            await response.write_eof()
        except ConnectionError:
            pass  # the client gave up during the stall
        return response

    def _count_download(self, outcome: str) -> None:
        counts = self.stats.download_status_counts
        counts[outcome] = counts.get(outcome, 0) + 1

    # ----------------------------------------------------------- test endpoints

    async def stats_route(self, request: web.Request) -> web.StreamResponse:
        trace_id = self.trace_id()
        if request.method != "GET":
            return _not_found(trace_id)
        return _json(200, self.stats.snapshot(), trace_id)

    async def control(self, request: web.Request) -> web.StreamResponse:
        trace_id = self.trace_id()
        if request.method != "POST":
            return _not_found(trace_id)
        try:
            body = orjson.loads(await request.read())
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
            self.apply_control(body)
        except (ValueError, TypeError) as exc:
            return _bad_request(f"bad control request: {exc}", trace_id)
        state = {
            "clock_offset_s": self.clock.offset_s,
            "limits": asdict(self.limits.limits),
            "faults": asdict(self.faults),
        }
        return _json(200, state, trace_id)

    def apply_control(self, body: dict[str, Any]) -> None:
        """Apply a ``POST /_control`` body (see the module docstring)."""
        unknown = set(body) - {"advance_s", "faults", "limits", "reset_stats"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        faults = FaultConfig(**body["faults"]) if "faults" in body else None
        limits = replace(self.limits.limits, **body["limits"]) if "limits" in body else None
        advance = body.get("advance_s", 0)
        if isinstance(advance, bool) or not isinstance(advance, int | float) or advance < 0:
            raise ValueError(f"advance_s must be a number >= 0, got {advance!r}")
        if faults is not None:
            self.set_faults(faults)
        if limits is not None:
            self.limits.limits = limits
        self.clock.advance(advance)
        if body.get("reset_stats"):
            self.stats.reset()

    async def unknown(self, request: web.Request) -> web.StreamResponse:
        return _not_found(self.trace_id())


# --------------------------------------------------------------------------- public


_UNCHANGED: Any = object()


class Emulator:
    """A running SiliconFlow emulator on a loopback port.

    >>> async with Emulator(rpm=2, latency_s=0.1) as emu:       # doctest: +SKIP
    ...     client = SiliconFlowClient(base_url=emu.base_url, api_key=emu.api_key)

    Keyword ``overrides`` replace fields of ``config`` (or of the default config).
    """

    def __init__(self, config: EmulatorConfig | None = None, **overrides: Any) -> None:
        self._config = replace(config or EmulatorConfig(), **overrides)
        self._app = _EmulatorApp(self._config)
        self._runner: web.AppRunner | None = None
        self.port = self._config.port

    @property
    def config(self) -> EmulatorConfig:
        """The configuration, with the limits and faults in force now."""
        limits, faults = self._app.limits.limits, self._app.faults
        return replace(self._config, rpm=limits.rpm, ipm=limits.ipm, ipd=limits.ipd, faults=faults)

    @property
    def root_url(self) -> str:
        """``http://HOST:PORT``: where the server answers."""
        host = self._config.host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1``: the API base URL to give a client."""
        return self.root_url + "/v1"

    @property
    def api_key(self) -> str:
        """A key the emulator accepts."""
        keys = self._config.api_keys
        return min(keys) if keys else "sk-emulator"

    async def start(self) -> None:
        """Bind the port and start answering."""
        if self._runner is not None:
            raise RuntimeError("the emulator is already running")
        self._app.stopping = asyncio.Event()
        runner = web.AppRunner(self._app.build_app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._config.host, self._config.port, backlog=1024)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        self._app.root_url = self.root_url

    async def stop(self) -> None:
        """Stop answering; stalled and sleeping handlers finish at once."""
        runner, self._runner = self._runner, None
        if runner is not None:
            self._app.stopping.set()
            await runner.cleanup()

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def stats(self) -> dict[str, Any]:
        """What the server saw; the same as ``GET /_stats``.

        Keys: ``generation_requests``; ``status_counts`` (``"200"``, ``"429"``, ...,
        ``"reset"``); ``images_generated`` (billed); ``in_flight`` and
        ``peak_in_flight`` generation requests; ``downloads``, ``download_status_counts``
        (``"200"``, ``"404"``, ``"truncated"``, ``"stalled"``, ``"not_image"``),
        ``images_served`` (complete PNGs), ``download_bytes``; ``accepted_per_s`` and
        ``images_per_s`` (second since the last reset → count, the last hour, by
        the time each request was admitted);
        ``max_requests_60s`` and ``max_images_60s`` (most accepted in any 60 s window);
        ``clock_offset_s``.
        """
        return self._app.stats.snapshot()

    def reset_stats(self) -> None:
        """Zero the counters (the limits' windows are kept)."""
        self._app.stats.reset()

    def advance_clock(self, seconds: float) -> None:
        """Move the emulator's clock ``seconds`` forward: windows slide, URLs age, days pass."""
        self._app.clock.advance(seconds)

    def set_faults(self, faults: FaultConfig) -> None:
        """Replace the fault configuration (its RNG restarts from ``faults.seed``)."""
        self._app.set_faults(faults)

    def set_limits(
        self, *, rpm: Any = _UNCHANGED, ipm: Any = _UNCHANGED, ipd: Any = _UNCHANGED
    ) -> None:
        """Change the per-key limits; ``None`` lifts one, an omitted one is kept.

        Requests admitted while a limit was in force count against the new limits
        (with no limit at all, nothing is recorded).
        """
        current = self._app.limits.limits
        limits = Limits(
            rpm=current.rpm if rpm is _UNCHANGED else rpm,
            ipm=current.ipm if ipm is _UNCHANGED else ipm,
            ipd=current.ipd if ipd is _UNCHANGED else ipd,
        )
        self._app.limits.limits = limits

    def usage(self, api_key: str | None = None) -> dict[str, int]:
        """What ``api_key`` (default :attr:`api_key`) has used of its limits right now."""
        return self._app.limits.usage(api_key or self.api_key)

    def expected_png(self, *, seed: int, prompt: str, index: int, width: int, height: int) -> bytes:
        """The exact bytes the emulator serves for this image."""
        return render_png(seed, prompt_digest(prompt), index, width, height)
