"""The SiliconFlow emulator: an aiohttp server that speaks ``/v1/images/generations``.

What each route answers, in the order the checks run (the real service is described
in ``shared/api/service-2026.md``)::

    POST /v1/images/generations
        401 "Invalid token"                    missing or unknown Bearer key
        400 {"code": 20012, ...}               body not a JSON object
        400 {"code": 20012, "message": "Model does not exist. Please check it carefully.",
             "data": null}                     a model this endpoint does not offer
        403 {"code": 30001, ...}               account blocked: balance insufficient
        403 {"code": 30002, ...}               account blocked: real-name verification (U)
        403 {"code": 30003, "message": "Model disabled."}   a model disabled for the account
        400 {"code": 20012, ...}               validate_request() errors; an image_size over
                                               the model's soft pixel cap; a bad input image
        5xx / reset / key-echo 400             a fault drawn from FaultConfig (no quota used)
        429 {"code": 50604, "message": "Request was rejected due to rate limiting.
             Details: IPM limit reached.", "data": null}    RPM, IPM, RPD, IPD per (key, model)
        200 {"images": [{"url"}...], "timings": {"inference"}, "seed"}    after the latency
    GET  /v1/models[?type=image][&sub_type=text-to-image|image-to-image]
                                               {"object": "list", "data": [{"id", "object":
                                               "model", ...}]}: the offered models (404
                                               "404 page not found" with models_endpoint off)
    GET  /files/<token>.png                    the image; 404 once the URL expired; image faults
    GET  /_stats                               what the server saw (see Stats.snapshot)
    GET  /_received_inputs                     the input images received (ReceivedImage dicts)
    GET  /_admissions                          each limit decision: [ms, key, images, outcome]
    POST /_control                             runtime switches, see _EmulatorApp.apply_control
    anything else                              404 "404 page not found"

The offered models: ``EmulatorConfig.offer`` if given, else the registry's models whose
``endpoints`` include the ``profile`` (``cn`` by default: today's api.siliconflow.cn
list, which no longer has the original reference's models). Limits apply per (key,
model) pair; ``model_limits`` gives a model its own. In an outage every route but the
test endpoints (``/_stats``, ``/_received_inputs``, ``/_admissions``, ``/_control``) closes
the connection at once (the client sees a reset); the port stays bound, so the API comes
back where it was.

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
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final, Literal, cast

import orjson
from aiohttp import web

from sfbatch.aio import AsyncResource
from sfbatch.emulator.images import ImageRef, TokenCodec, prompt_digest, render_png
from sfbatch.emulator.inputs import ReceivedImage, decode_input
from sfbatch.emulator.limits import WINDOW_MS, Clock, Limits, RateLimits, SlidingWindow
from sfbatch.models import DEFAULT_MODEL, IMAGE_FIELDS, SEED_MAX, ModelRegistry, validate_request

__all__ = [
    "ACCOUNT_BLOCKS",
    "TRACE_HEADER",
    "AccountBlock",
    "Emulator",
    "EmulatorConfig",
    "FaultConfig",
    "Profile",
]

TRACE_HEADER: Final = "x-siliconcloud-trace-id"
RATE_LIMIT_MESSAGE: Final = "Request was rejected due to rate limiting. Details: "
RATE_LIMIT_CODE: Final = 50604
OVERLOADED_MESSAGE: Final = "Model service overloaded. Please try again later."
NO_SUCH_MODEL_MESSAGE: Final = "Model does not exist. Please check it carefully."

Profile = Literal["cn", "com"]
AccountBlock = Literal["balance", "verification"]
#: The 403 body of each account block. ``balance`` is as reported (U);
#: ``verification`` is a plausible guess (U): the service is documented to refuse an
#: account without real-name verification with a 403, its exact body is not.
ACCOUNT_BLOCKS: Final[dict[str, dict[str, Any]]] = {
    "balance": {"code": 30001, "message": "Sorry, your account balance is insufficient"},
    "verification": {
        "code": 30002,
        "message": "Sorry, your account has not completed real-name authentication. "
        "Please complete real-name authentication and try again.",
    },
}
MODEL_DISABLED: Final = {"code": 30003, "message": "Model disabled."}
_INPUTS_KEPT = 10_000  # received_inputs keeps the most recent ones
_SUB_TYPES = ("text-to-image", "image-to-image")
_CONTROL_KEYS = frozenset(
    {
        "advance_s",
        "faults",
        "limits",
        "model_limits",
        "key_limits",
        "key_blocks",
        "offer",
        "models_endpoint",
        "account_block",
        "disabled_models",
        "outage",
        "reset_stats",
    }
)
_TEST_PATHS = frozenset({"/_stats", "/_received_inputs", "/_admissions", "/_control"})
_HISTOGRAM_SECONDS = 3600  # per-second histograms keep the last hour
_ADMISSIONS_KEPT = 100_000  # the admissions log keeps the most recent decisions


# --------------------------------------------------------------------------- config


def _check_probability(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in 0..1, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class FaultConfig:
    """Probabilities of injected faults, drawn from an RNG seeded with ``seed``.

    Generation faults (``p_503``, ``p_504``, ``p_500``, ``p_reset``, ``p_echo_key``)
    are drawn once per generation request and image faults (``p_truncated_image``,
    ``p_stalled_image``, ``p_expired_url``, ``p_not_image``) once per download, so
    each group must sum to at most 1. ``p_reset`` closes the connection without an
    answer; ``p_echo_key`` answers 400 with the caller's API key as the body's ``code``
    and inside a long message, where a 500-character cut leaves all but its last 4
    characters (for secret-redaction tests); a truncated image promises the full
    ``Content-Length`` and sends half; a stalled image sends half, waits ``stall_s``,
    then the rest; an expired URL answers 404 as a really expired one does; "not an
    image" is a 200 ``image/png`` whose body is HTML.
    """

    seed: int = 0
    p_503: float = 0.0
    p_504: float = 0.0
    p_500: float = 0.0
    p_reset: float = 0.0
    p_echo_key: float = 0.0
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
            raise ValueError("p_503 + p_504 + p_500 + p_reset + p_echo_key must be at most 1")
        if sum(self.image_faults) > 1.0 + 1e-9:
            raise ValueError(
                "p_truncated_image + p_stalled_image + p_expired_url + p_not_image "
                "must be at most 1"
            )
        if not self.stall_s >= 0:
            raise ValueError(f"stall_s must be >= 0, got {self.stall_s!r}")

    @property
    def generation_faults(self) -> tuple[float, float, float, float, float]:
        return (self.p_503, self.p_504, self.p_500, self.p_reset, self.p_echo_key)

    @property
    def image_faults(self) -> tuple[float, float, float, float]:
        return (self.p_truncated_image, self.p_stalled_image, self.p_expired_url, self.p_not_image)


@dataclass(frozen=True, kw_only=True)
class EmulatorConfig:
    """How an :class:`Emulator` behaves. Everything but the network, latency and image
    settings can also change at runtime (the Python API or ``POST /_control``).

    ``api_keys``: the Bearer keys accepted; empty accepts any non-empty key. Each key
    is its own account. ``rpm``/``ipm``/``rpd``/``ipd`` apply to each (key, model)
    pair; ``model_limits`` replaces them whole for the models it names, else
    ``key_limits`` for the keys it names.
    ``profile``: which endpoint family's model list is offered (``cn`` or ``com``, from
    the registry's ``endpoints``); ``offer``: the offered models instead (any names,
    known to the registry or not). ``models_endpoint=False``: ``GET /v1/models``
    answers 404 (an endpoint without the list). ``account_block``: every generation
    answers that 403; ``key_blocks``: the generations of one key do (a key's entry
    wins over ``account_block``); ``disabled_models``: generations for these answer 403/30003.
    ``outage``: start with every API route dropping connections. ``retry_after_s``:
    ``None`` sends no ``Retry-After`` on 429 (the default, as the service documents
    none); ``0`` sends the whole seconds until the refused request would be admitted
    (at least 1); a positive value is sent as is (rounded up to whole seconds).
    ``day_utc_offset_h``: the time zone of the IPD day (SiliconFlow's is UTC+8).
    Latency: each generation sleeps ``latency_s`` plus a uniform draw in
    ``±latency_jitter_s`` (never below 0) and reports it as ``timings.inference``.
    ``image_px``: serve square images of this side instead of the requested
    ``image_size`` (``None`` serves the requested size; an edit model's, 512 px).
    Image URLs expire ``url_ttl_s`` after generation. ``seed`` seeds the server-picked
    seeds and the latency draws; faults have their own seed.
    """

    host: str = "127.0.0.1"
    port: int = 0
    api_keys: frozenset[str] = frozenset({"sk-emulator"})
    rpm: int | None = None
    ipm: int | None = None
    ipd: int | None = None
    rpd: int | None = None
    model_limits: Mapping[str, Limits] = field(default_factory=dict)
    key_limits: Mapping[str, Limits] = field(default_factory=dict)
    profile: Profile = "cn"
    offer: tuple[str, ...] | None = None
    models_endpoint: bool = True
    account_block: AccountBlock | None = None
    key_blocks: Mapping[str, AccountBlock] = field(default_factory=dict)
    disabled_models: frozenset[str] = frozenset()
    outage: bool = False
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
        self.limits  # noqa: B018 - validates
        if not isinstance(self.api_keys, frozenset):
            object.__setattr__(self, "api_keys", frozenset(self.api_keys))
        if not isinstance(self.disabled_models, frozenset):
            object.__setattr__(self, "disabled_models", frozenset(self.disabled_models))
        if self.offer is not None and not isinstance(self.offer, tuple):
            object.__setattr__(self, "offer", tuple(self.offer))
        for name, table in (("model_limits", self.model_limits), ("key_limits", self.key_limits)):
            for entry, limits in table.items():
                if not isinstance(limits, Limits):
                    raise ValueError(f"{name}[{entry!r}] must be a Limits, got {limits!r}")
        if self.profile not in ("cn", "com"):
            raise ValueError(f"profile must be cn or com, got {self.profile!r}")
        for block in (self.account_block, *self.key_blocks.values()):
            if block is not None and block not in ACCOUNT_BLOCKS:
                raise ValueError(
                    f"account_block and key_blocks take balance, verification or None, "
                    f"got {block!r}"
                )
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
        """The limits of every (key, model) pair without a ``model_limits`` entry."""
        return Limits(rpm=self.rpm, ipm=self.ipm, ipd=self.ipd, rpd=self.rpd)


# --------------------------------------------------------------------------- stats


class Stats:
    """Counters of what the server saw; :meth:`snapshot` is ``GET /_stats``."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        self.generation_requests = 0
        self.models_requests = 0
        self.outage_drops = 0
        self.status_counts: dict[str, int] = {}
        self.images_generated = 0
        self.images_by_model: dict[str, int] = {}
        self.images_by_key: dict[str, int] = {}
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
        # [ms since the reset, key, images, "ok" or the limit that refused]: the server's
        # own account of when it admitted what, which benchmarks measure rates from
        self.admissions: deque[tuple[int, str, int, str]] = deque(maxlen=_ADMISSIONS_KEPT)

    def refused(self, now_ms: int, images: int, *, key: str, limit: str) -> None:
        """Record a request refused at ``now_ms`` by ``limit`` (answered 429)."""
        self.admissions.append((now_ms - self._start_ms, key, images, limit))

    def accepted(self, now_ms: int, images: int, *, key: str = "", model: str = "") -> None:
        """Record a request admitted at ``now_ms`` (it is answered 200 after its latency)."""
        self.admissions.append((now_ms - self._start_ms, key, images, "ok"))
        self.images_generated += images
        self.images_by_model[model] = self.images_by_model.get(model, 0) + images
        self.images_by_key[key] = self.images_by_key.get(key, 0) + images
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
            "models_requests": self.models_requests,
            "outage_drops": self.outage_drops,
            "status_counts": dict(self.status_counts),
            "images_generated": self.images_generated,
            "images_by_model": dict(self.images_by_model),
            "images_by_key": dict(self.images_by_key),
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


def _updated_limits(current: Mapping[str, Limits], changes: Any) -> dict[str, Limits]:
    """``current`` with a control body's ``{name: limits object or null}`` applied."""
    updated = dict(current)
    for name, spec in dict(changes).items():
        if spec is None:
            updated.pop(name, None)
        else:
            updated[name] = Limits(**spec)
    return updated


def _echo_key_body(key: str) -> dict[str, Any]:
    """A 400 body that leaks ``key``: as the code, and across a message's 500th character."""
    start = max(0, 504 - len(key))  # a cut at 500 characters keeps all but the last 4
    filler = ("The request could not be processed for the account of this token. " * 10)[:start]
    message = f"{filler}{key} is not allowed to use this parameter combination."
    return {"code": key, "message": message, "data": None}


_EDIT_OUTPUT_PX = 512
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
            config.limits,
            clock=self.clock,
            day_utc_offset_h=config.day_utc_offset_h,
            model_limits=config.model_limits,
            key_limits=config.key_limits,
        )
        self.offer: tuple[str, ...] = (
            config.offer
            if config.offer is not None
            else tuple(rule.name for rule in self.registry if config.profile in rule.endpoints)
        )
        self.models_endpoint = config.models_endpoint
        self.account_block: AccountBlock | None = config.account_block
        self.key_blocks: dict[str, AccountBlock] = dict(config.key_blocks)
        self.disabled_models: set[str] = set(config.disabled_models)
        self.outage = config.outage
        self.received_inputs: deque[dict[str, ReceivedImage]] = deque(maxlen=_INPUTS_KEPT)
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
        # Data URIs make edit requests large: allow what MAX_INPUT_BYTES × 3 needs in base64.
        app = web.Application(middlewares=[self._outage_gate], client_max_size=96 * 1024 * 1024)
        routes: list[tuple[str, _Handler]] = [
            ("/v1/images/generations", self.generations),
            ("/v1/models", self.models),
            ("/files/{name}", self.image),
            ("/_stats", self.stats_route),
            ("/_received_inputs", self.received_route),
            ("/_admissions", self.admissions_route),
            ("/_control", self.control),
            ("/{tail:.*}", self.unknown),
        ]
        # Every method is routed to the handler (which answers 404 for a wrong one), so
        # no aiohttp default 404/405 page is ever sent without a trace header.
        for path, handler in routes:
            app.router.add_route("*", path, handler)
        return app

    @web.middleware
    async def _outage_gate(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """In an outage, drop every connection except the test endpoints'."""
        if self.outage and request.path not in _TEST_PATHS:
            self.stats.outage_drops += 1
            return _close_connection(request)
        return await handler(request)

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
        model = body.get("model", DEFAULT_MODEL)
        if not isinstance(model, str) or model not in self.offer:
            payload = {"code": 20012, "message": NO_SUCH_MODEL_MESSAGE, "data": None}
            return "400", _json(400, payload, trace_id)
        block = self.key_blocks.get(key, self.account_block)
        if block is not None:
            return "403", _json(403, ACCOUNT_BLOCKS[block], trace_id)
        if model in self.disabled_models:
            return "403", _json(403, MODEL_DISABLED, trace_id)

        # Offered models the registry does not know are checked with the generic rules.
        validation = validate_request(body, self.registry)
        if validation.request is None:
            return "400", _bad_request("; ".join(validation.errors), trace_id)
        params = validation.request
        problem = self._pixel_cap_problem(params)
        inputs: dict[str, ReceivedImage] = {}
        try:
            for name in IMAGE_FIELDS:
                if name in params:
                    inputs[name] = decode_input(name, params[name])
        except ValueError as exc:
            problem = str(exc)
        if problem is not None:
            return "400", _bad_request(problem, trace_id)

        faults = self.faults
        if any(faults.generation_faults):
            fault = self._draw(faults.generation_faults)
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
            if fault == 4:
                return "echo_key", _json(400, _echo_key_body(key), trace_id)

        batch_size: int = params.get("batch_size", 1)
        now_ms = self.clock.mono_ms()
        refusal = self.limits.admit(key, batch_size, model=model, now_ms=now_ms)
        if refusal is not None:
            self.stats.refused(now_ms, batch_size, key=key, limit=refusal.limit)
            payload = {
                "code": RATE_LIMIT_CODE,
                "message": RATE_LIMIT_MESSAGE + refusal.details,
                "data": None,
            }
            response = _json(429, payload, trace_id)
            retry_after = self.config.retry_after_s
            if retry_after is not None:
                seconds = retry_after or refusal.wait_s
                response.headers["Retry-After"] = str(max(1, math.ceil(seconds)))
            return "429", response
        # Counted when admitted, like the limiter, so the two always agree on any window.
        self.stats.accepted(now_ms, batch_size, key=key, model=model)
        if inputs:
            self.received_inputs.append(inputs)

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
        if size is None:  # an edit model: a fixed small size stands in for the input's
            return _EDIT_OUTPUT_PX, _EDIT_OUTPUT_PX
        width, _, height = str(size).partition("x")
        return int(width), int(height)

    def _pixel_cap_problem(self, params: dict[str, Any]) -> str | None:
        """The service's (reported) 400 for a size above the model's soft pixel cap."""
        cap = self.registry.rule_for(params["model"]).soft_max_pixels
        size = params.get("image_size")
        if cap is None or size is None:
            return None
        width, _, height = str(size).partition("x")
        if int(width) * int(height) > cap:
            return f"width * height should not exceed {cap}"
        return None

    # ----------------------------------------------------------- GET /v1/models

    async def models(self, request: web.Request) -> web.StreamResponse:
        trace_id = self.trace_id()
        if request.method != "GET" or not self.models_endpoint:
            return _not_found(trace_id)
        self.stats.models_requests += 1
        if self._api_key(request) is None:
            return _json(401, "Invalid token", trace_id)
        kind = request.query.get("type")
        sub_type = request.query.get("sub_type")
        data = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": name.partition("/")[0],
                "type": "image",
                "sub_type": self._sub_type(name),
            }
            for name in self.offer
            if kind in (None, "image") and sub_type in (None, self._sub_type(name))
        ]
        return _json(200, {"object": "list", "data": data}, trace_id)

    def _sub_type(self, model: str) -> str:
        rule = self.registry.get(model)
        return _SUB_TYPES[1] if rule is not None and rule.takes_image else _SUB_TYPES[0]

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

    async def received_route(self, request: web.Request) -> web.StreamResponse:
        trace_id = self.trace_id()
        if request.method != "GET":
            return _not_found(trace_id)
        return _json(200, list(self.received_inputs), trace_id)

    async def admissions_route(self, request: web.Request) -> web.StreamResponse:
        trace_id = self.trace_id()
        if request.method != "GET":
            return _not_found(trace_id)
        return _json(200, list(self.stats.admissions), trace_id)

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
        return _json(200, self.control_state(), trace_id)

    def control_state(self) -> dict[str, Any]:
        """What ``POST /_control`` answers: the runtime settings now in force."""
        return {
            "clock_offset_s": self.clock.offset_s,
            "limits": asdict(self.limits.limits),
            "model_limits": {m: asdict(lim) for m, lim in self.limits.model_limits.items()},
            "key_limits": {k: asdict(lim) for k, lim in self.limits.key_limits.items()},
            "faults": asdict(self.faults),
            "offer": list(self.offer),
            "models_endpoint": self.models_endpoint,
            "account_block": self.account_block,
            "key_blocks": dict(self.key_blocks),
            "disabled_models": sorted(self.disabled_models),
            "outage": self.outage,
        }

    def apply_control(self, body: dict[str, Any]) -> None:
        """Apply a ``POST /_control`` body; all of it is checked before any of it is applied.

        Keys (all optional): ``advance_s`` (seconds, moves the clock), ``faults`` (a
        :class:`FaultConfig` as an object), ``limits`` (``rpm``/``ipm``/``rpd``/``ipd``
        to change; null lifts one), ``model_limits`` / ``key_limits`` (model or key →
        limits object, or null to drop its own limits), ``key_blocks`` (key → block or
        null), ``offer`` (list of model names), ``models_endpoint``
        (bool), ``account_block`` (``"balance"``, ``"verification"`` or null),
        ``disabled_models`` (list, replaces the set), ``outage`` (bool), ``reset_stats``
        (bool: zero the counters and forget the received inputs).
        """
        unknown = set(body) - _CONTROL_KEYS
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        faults = FaultConfig(**body["faults"]) if "faults" in body else None
        limits = replace(self.limits.limits, **body["limits"]) if "limits" in body else None
        model_limits = _updated_limits(self.limits.model_limits, body.get("model_limits", {}))
        key_limits = _updated_limits(self.limits.key_limits, body.get("key_limits", {}))
        key_blocks = dict(self.key_blocks)
        for key, kind in dict(body.get("key_blocks", {})).items():
            if kind is None:
                key_blocks.pop(key, None)
            elif kind in ACCOUNT_BLOCKS:
                key_blocks[key] = kind
            else:
                raise ValueError(f"key_blocks take balance, verification or null, got {kind!r}")
        advance = body.get("advance_s", 0)
        if isinstance(advance, bool) or not isinstance(advance, int | float) or advance < 0:
            raise ValueError(f"advance_s must be a number >= 0, got {advance!r}")
        offer = body.get("offer", self.offer)
        disabled = body.get("disabled_models", self.disabled_models)
        for name, names in (("offer", offer), ("disabled_models", disabled)):
            if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{name} must be a list of model names")
        block = body.get("account_block", self.account_block)
        if block is not None and block not in ACCOUNT_BLOCKS:
            raise ValueError(f"account_block must be balance, verification or null, got {block!r}")
        switches = {k: body.get(k, getattr(self, k)) for k in ("models_endpoint", "outage")}
        for name, value in switches.items():
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")

        if faults is not None:
            self.set_faults(faults)
        if limits is not None:
            self.limits.limits = limits
        self.limits.model_limits = model_limits
        self.limits.key_limits = key_limits
        self.key_blocks = key_blocks
        self.offer = tuple(offer)
        self.disabled_models = set(disabled)
        self.account_block = cast(AccountBlock | None, block)
        self.models_endpoint, self.outage = switches["models_endpoint"], switches["outage"]
        self.clock.advance(advance)
        if body.get("reset_stats"):
            self.stats.reset()
            self.received_inputs.clear()

    async def unknown(self, request: web.Request) -> web.StreamResponse:
        return _not_found(self.trace_id())


# --------------------------------------------------------------------------- public


_UNCHANGED: Any = object()


class Emulator(AsyncResource):
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
        """The configuration, with the runtime settings in force now."""
        app = self._app
        limits = app.limits.limits
        return replace(
            self._config,
            rpm=limits.rpm,
            ipm=limits.ipm,
            ipd=limits.ipd,
            rpd=limits.rpd,
            model_limits=dict(app.limits.model_limits),
            key_limits=dict(app.limits.key_limits),
            faults=app.faults,
            offer=app.offer,
            models_endpoint=app.models_endpoint,
            account_block=app.account_block,
            key_blocks=dict(app.key_blocks),
            disabled_models=frozenset(app.disabled_models),
            outage=app.outage,
        )

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

    async def _open(self) -> None:
        await self.start()

    async def aclose(self) -> None:
        await self.stop()

    def stats(self) -> dict[str, Any]:
        """What the server saw; the same as ``GET /_stats``.

        Keys: ``generation_requests``; ``models_requests`` (``GET /v1/models``, counted
        apart); ``outage_drops`` (connections closed by an outage); ``status_counts``
        (``"200"``, ``"400"``, ``"403"``, ``"429"``, ..., ``"reset"``, ``"echo_key"``);
        ``images_generated`` (billed), ``images_by_model``, ``images_by_key``; ``in_flight`` and
        ``peak_in_flight`` generation requests; ``downloads``, ``download_status_counts``
        (``"200"``, ``"404"``, ``"truncated"``, ``"stalled"``, ``"not_image"``),
        ``images_served`` (complete PNGs), ``download_bytes``; ``accepted_per_s`` and
        ``images_per_s`` (second since the last reset → count, the last hour, by
        the time each request was admitted);
        ``max_requests_60s`` and ``max_images_60s`` (most accepted in any 60 s window);
        ``clock_offset_s``.
        """
        return self._app.stats.snapshot()

    def admissions(self) -> list[tuple[int, str, int, str]]:
        """Each limit decision, oldest first: ``(ms since the last reset, key, images,
        outcome)``, outcome ``"ok"`` or the limit that refused (``"IPM"``, ``"IPD"``, ...);
        the same as ``GET /_admissions`` (the last 100,000)."""
        return list(self._app.stats.admissions)

    def reset_stats(self) -> None:
        """Zero the counters and forget the received inputs (the limits' windows are kept)."""
        self._app.stats.reset()
        self._app.received_inputs.clear()

    def advance_clock(self, seconds: float) -> None:
        """Move the emulator's clock ``seconds`` forward: windows slide, URLs age, days pass."""
        self._app.clock.advance(seconds)

    def set_faults(self, faults: FaultConfig) -> None:
        """Replace the fault configuration (its RNG restarts from ``faults.seed``)."""
        self._app.set_faults(faults)

    def set_limits(
        self,
        *,
        rpm: Any = _UNCHANGED,
        ipm: Any = _UNCHANGED,
        ipd: Any = _UNCHANGED,
        rpd: Any = _UNCHANGED,
    ) -> None:
        """Change the limits of every (key, model) pair; ``None`` lifts one, an omitted one
        is kept. Models with their own limits (:meth:`set_model_limits`) keep them.

        Requests admitted while a limit was in force count against the new limits
        (with no limit at all, nothing is recorded).
        """
        current = self._app.limits.limits
        limits = Limits(
            rpm=current.rpm if rpm is _UNCHANGED else rpm,
            ipm=current.ipm if ipm is _UNCHANGED else ipm,
            ipd=current.ipd if ipd is _UNCHANGED else ipd,
            rpd=current.rpd if rpd is _UNCHANGED else rpd,
        )
        self._app.limits.limits = limits

    def set_model_limits(self, model: str, limits: Limits | None) -> None:
        """Give ``model`` its own limits (per key), or ``None``: back to the global ones."""
        if limits is None:
            self._app.limits.model_limits.pop(model, None)
        else:
            self._app.limits.model_limits[model] = limits

    def set_key_limits(self, key: str, limits: Limits | None) -> None:
        """Give ``key`` its own limits (per model; a model's own still win), or ``None``."""
        if limits is None:
            self._app.limits.key_limits.pop(key, None)
        else:
            self._app.limits.key_limits[key] = limits

    def usage(self, api_key: str | None = None, model: str | None = None) -> dict[str, int]:
        """What ``api_key`` (default :attr:`api_key`) has used of ``model``'s limits now.

        ``model=None`` sums over all models. Keys: ``requests_60s``, ``images_60s``,
        ``requests_today``, ``images_today``; only (key, model) pairs that have a limit
        are counted.
        """
        return self._app.limits.usage(api_key or self.api_key, model)

    @property
    def offered_models(self) -> tuple[str, ...]:
        """The models this endpoint offers (``GET /v1/models`` lists them)."""
        return self._app.offer

    def set_offer(self, models: Iterable[str] | None) -> None:
        """Offer exactly ``models``; ``None``: the profile's list from the registry again."""
        app = self._app
        if models is None:
            profile = self._config.profile
            models = (rule.name for rule in app.registry if profile in rule.endpoints)
        app.offer = tuple(models)

    def set_models_endpoint(self, available: bool) -> None:
        """``False``: ``GET /v1/models`` answers 404, as an endpoint without the list does."""
        self._app.models_endpoint = available

    def set_account_block(self, kind: AccountBlock | None, *, key: str | None = None) -> None:
        """Answer generations with the 403 of ``kind`` (``None``: unblocked): every key's,
        or only ``key``'s (another account's balance runs out; the others go on)."""
        if kind is not None and kind not in ACCOUNT_BLOCKS:
            raise ValueError(f"kind must be balance, verification or None, got {kind!r}")
        app = self._app
        if key is None:
            app.account_block = kind
        elif kind is None:
            app.key_blocks.pop(key, None)
        else:
            app.key_blocks[key] = kind

    def disable_model(self, model: str) -> None:
        """Answer generations for ``model`` with 403 ``{"code": 30003, ...}``."""
        self._app.disabled_models.add(model)

    def enable_model(self, model: str) -> None:
        """Undo :meth:`disable_model`."""
        self._app.disabled_models.discard(model)

    def set_outage(self, down: bool) -> None:
        """``True``: every API and image request has its connection closed at once (the
        client sees a reset); ``False``: the API answers again, on the same port.
        The test endpoints (``/_stats``, ``/_admissions``, ...) answer throughout."""
        self._app.outage = down

    @property
    def received_inputs(self) -> list[dict[str, ReceivedImage]]:
        """Input images of admitted generations, oldest first (the last 10,000 requests):
        one dict per request, field (``image``, ``image2``, ``image3``) → what arrived."""
        return list(self._app.received_inputs)

    def expected_png(self, *, seed: int, prompt: str, index: int, width: int, height: int) -> bytes:
        """The exact bytes the emulator serves for this image."""
        return render_png(seed, prompt_digest(prompt), index, width, height)
