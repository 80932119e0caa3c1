"""The emulator over real HTTP on 127.0.0.1: every answer the API reference lists.

Time-dependent behaviour (sliding windows, the IPD day, URL expiry) is driven with
``Emulator.advance_clock``; nothing here sleeps for long.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import math
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from PIL import Image

from sfbatch.cli import build_parser
from sfbatch.emulator import Emulator, EmulatorConfig, FaultConfig
from sfbatch.emulator.cli import config_from_args
from sfbatch.emulator.limits import Limits
from sfbatch.models import SEED_MAX, ModelRegistry

EmulatorFactory = Callable[..., AbstractAsyncContextManager[Emulator]]

TRACE = "x-siliconcloud-trace-id"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TURBO = "stabilityai/stable-diffusion-3-5-large-turbo"
SD = "stabilityai/stable-diffusion-3-5-large"
KOLORS = "Kwai-Kolors/Kolors"
QWEN = "Qwen/Qwen-Image"
EDIT = "Qwen/Qwen-Image-Edit"
EDIT_2509 = "Qwen/Qwen-Image-Edit-2509"
CN_MODELS = {KOLORS, QWEN, EDIT, EDIT_2509}
ALL_MODELS = tuple(ModelRegistry.builtin().names())  # the legacy models too
NO_SUCH_MODEL = {
    "code": 20012,
    "message": "Model does not exist. Please check it carefully.",
    "data": None,
}


def rate_limited(limit: str) -> dict[str, Any]:
    message = f"Request was rejected due to rate limiting. Details: {limit} limit reached."
    return {"code": 50604, "message": message, "data": None}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def trace_id(self) -> str:
        return self.headers[TRACE]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def call(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> Reply:
    """One request, read in full; every answer must carry a trace id."""
    async with session.request(method, url, **kwargs) as resp:
        body = await resp.read()
        reply = Reply(resp.status, dict(resp.headers), body)
    assert reply.headers.get(TRACE, "").startswith("ti_"), (reply.status, reply.headers)
    return reply


async def generate(
    session: aiohttp.ClientSession,
    emu: Emulator,
    body: dict[str, Any] | None = None,
    *,
    key: str | None = None,
    **kwargs: Any,
) -> Reply:
    headers = {"Authorization": f"Bearer {key or emu.api_key}"}
    if body is None:
        body = {"prompt": "a lighthouse at night"}
    return await call(
        session, "POST", emu.base_url + "/images/generations", json=body, headers=headers, **kwargs
    )


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == PNG_MAGIC
    assert png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    return width, height


def seconds_to_day_end(emu: Emulator, utc_offset_h: float = 8.0) -> float:
    now = time.time() + float(emu.stats()["clock_offset_s"])
    shifted = now + utc_offset_h * 3600
    return (math.floor(shifted / 86400) + 1) * 86400 - shifted


# --------------------------------------------------------------------------- 200


async def test_generation_answers_the_documented_json(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    body = {
        "model": KOLORS,
        "prompt": "an island near sea",
        "negative_prompt": "blurry",
        "image_size": "1024x1024",
        "batch_size": 3,
        "seed": 4999999999,
        "num_inference_steps": 20,
        "guidance_scale": 7.5,
        "prompt_enhancement": False,
    }
    reply = await generate(session, emulator, body)
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    data = reply.json()
    assert set(data) == {"images", "timings", "seed"}
    assert data["seed"] == 4999999999
    assert isinstance(data["timings"]["inference"], float)
    assert len(data["images"]) == 3
    for index, image in enumerate(data["images"]):
        assert image["url"].startswith(emulator.root_url + "/files/")
        png = await call(session, "GET", image["url"])
        assert png.status == 200
        assert png.headers["Content-Type"] == "image/png"
        expected = emulator.expected_png(
            seed=4999999999, prompt="an island near sea", index=index, width=64, height=64
        )
        assert png.body == expected


async def test_server_picks_a_seed_from_its_seeded_rng(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    picked = []
    for _ in range(2):
        async with emulator_factory(seed=7) as emu:
            seeds = [(await generate(session, emu)).json()["seed"] for _ in range(3)]
            assert all(isinstance(s, int) and 0 <= s <= SEED_MAX for s in seeds)
            assert len(set(seeds)) == 3
            picked.append(seeds)
    assert picked[0] == picked[1]


async def test_any_key_is_accepted_when_api_keys_is_empty(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    async with emulator_factory(api_keys=frozenset()) as emu:
        assert (await generate(session, emu, key="sk-whatever")).status == 200
        reply = await call(
            session, "POST", emu.base_url + "/images/generations",
            json={"prompt": "x"}, headers={"Authorization": "Bearer "},
        )  # fmt: skip
        assert reply.status == 401


async def test_latency_is_slept_and_reported(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    async with emulator_factory(latency_s=0.05, latency_jitter_s=0.02, seed=3) as emu:
        started = time.perf_counter()
        replies = await asyncio.gather(*(generate(session, emu) for _ in range(4)))
        elapsed = time.perf_counter() - started
        inference = [r.json()["timings"]["inference"] for r in replies]
        assert all(0.03 <= s <= 0.07 for s in inference), inference
        assert len(set(inference)) > 1
        assert elapsed >= min(inference)
        stats = emu.stats()
        assert stats["peak_in_flight"] == 4
        assert stats["in_flight"] == 0


# --------------------------------------------------------------------------- 401 / 404


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer sk-wrong", "Basic sk-emulator", "Bearer ", "sk-emulator"],
)
async def test_missing_or_wrong_key_is_401(
    emulator: Emulator, session: aiohttp.ClientSession, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    reply = await call(
        session, "POST", emulator.base_url + "/images/generations",
        json={"prompt": "x"}, headers=headers,
    )  # fmt: skip
    assert reply.status == 401
    assert reply.json() == "Invalid token"
    assert emulator.stats()["status_counts"] == {"401": 1}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/nothing"),
        ("POST", "/v2/images/generations"),
        ("GET", "/v1/images/generations"),
        ("POST", "/v1/models"),
        ("GET", "/"),
        ("DELETE", "/_stats"),
    ],
)
async def test_unknown_path_or_method_is_404_page_not_found(
    emulator: Emulator, session: aiohttp.ClientSession, method: str, path: str
) -> None:
    reply = await call(session, method, emulator.root_url + path)
    assert reply.status == 404
    assert reply.body == b"404 page not found"


# --------------------------------------------------------------------------- 400


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, "prompt must be a non-empty string"),
        ({"prompt": ""}, "prompt must be a non-empty string"),
        ({"prompt": "   "}, "prompt must be a non-empty string"),
        ({"prompt": 5}, "prompt must be a non-empty string"),
        ({"model": SD, "prompt": "x", "image_size": "1000x1000"}, "image_size 1000x1000 is not"),
        ({"prompt": "x", "image_size": "2048x1152"}, "width * height should not exceed 2073600"),
        ({"prompt": "x", "image_size": "big"}, "image_size must look like WIDTHxHEIGHT"),
        ({"prompt": "x", "batch_size": 0}, "batch_size must be 1..4, got 0"),
        ({"prompt": "x", "batch_size": 5}, "batch_size must be 1..4, got 5"),
        ({"prompt": "x", "batch_size": "2"}, "batch_size must be an integer"),
        ({"prompt": "x", "seed": -1}, "seed must be 0..9999999999, got -1"),
        ({"prompt": "x", "seed": 10000000000}, "seed must be 0..9999999999, got 10000000000"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps must be 1..100, got 0"),
        ({"prompt": "x", "num_inference_steps": 101}, "num_inference_steps must be 1..100"),
        ({"model": SD, "prompt": "x", "num_inference_steps": 51}, "must be 1..50, got 51"),
        ({"model": QWEN, "prompt": "x", "cfg": 0}, "cfg must be 0.1..20, got 0"),
        ({"model": EDIT, "prompt": "x"}, "image is required by Qwen/Qwen-Image-Edit"),
        ({"prompt": "x", "image": "https://example.com/a.png"}, "image is not accepted"),
        ({"prompt": "x", "guidance_scale": -1}, "guidance_scale must be 0..20, got -1"),
        ({"prompt": "x", "guidance_scale": 21}, "guidance_scale must be 0..20, got 21"),
        (
            {"model": TURBO, "prompt": "x", "num_inference_steps": 20},
            f"num_inference_steps is fixed at 4 for {TURBO}, got 20",
        ),
        ({"prompt": "x", "prompt_enhancement": "yes"}, "prompt_enhancement must be true or false"),
        ({"prompt": "x", "negative_prompt": 3}, "negative_prompt must be a string"),
    ],
)
async def test_invalid_field_is_400_20012(
    emulator_factory: EmulatorFactory,
    session: aiohttp.ClientSession,
    body: dict[str, Any],
    expected: str,
) -> None:
    async with emulator_factory(offer=ALL_MODELS) as emulator:
        reply = await generate(session, emulator, body)
    assert reply.status == 400
    data = reply.json()
    assert data["code"] == 20012
    assert expected in data["message"]
    assert data["data"] == reply.trace_id


async def test_all_errors_are_joined(emulator: Emulator, session: aiohttp.ClientSession) -> None:
    reply = await generate(session, emulator, {"prompt": "", "batch_size": 9, "seed": -1})
    assert reply.json()["message"] == (
        "prompt must be a non-empty string; batch_size must be 1..4, got 9; "
        "seed must be 0..9999999999, got -1"
    )


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"a prompt"'])
async def test_body_that_is_not_a_json_object_is_400(
    emulator: Emulator, session: aiohttp.ClientSession, raw: bytes
) -> None:
    reply = await call(
        session, "POST", emulator.base_url + "/images/generations", data=raw,
        headers={"Authorization": f"Bearer {emulator.api_key}", "Content-Type": "application/json"},
    )  # fmt: skip
    assert reply.status == 400
    assert reply.json()["code"] == 20012


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x", "batch_size": 4, "seed": 0},
        {"prompt": "x", "seed": SEED_MAX, "num_inference_steps": 1, "guidance_scale": 0},
        {
            "prompt": "x",
            "num_inference_steps": 100,
            "guidance_scale": 20,
            "prompt_enhancement": True,
        },
        {"prompt": "x", "image_size": "1920x1080"},  # not recommended, under the pixel cap
        {"model": QWEN, "prompt": "x", "cfg": 0.1, "num_inference_steps": 100},
        {"model": TURBO, "prompt": "x", "num_inference_steps": 4},
        {"model": "black-forest-labs/FLUX.1-schnell", "prompt": "x", "image_size": "576x1024"},
        {"model": EDIT, "prompt": "x", "image": "https://example.com/a.png", "image_size": "1x1"},
    ],
)
async def test_boundary_values_are_accepted(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession, body: dict[str, Any]
) -> None:
    async with emulator_factory(offer=ALL_MODELS) as emulator:
        reply = await generate(session, emulator, body)
    assert reply.status == 200, reply.body
    assert len(reply.json()["images"]) == body.get("batch_size", 1)


# --------------------------------------------------------------------------- /v1/models


async def list_models(
    session: aiohttp.ClientSession, emu: Emulator, query: str = "?type=image"
) -> Reply:
    auth = {"Authorization": f"Bearer {emu.api_key}"}
    return await call(session, "GET", emu.base_url + "/models" + query, headers=auth)


async def test_models_lists_todays_cn_models_by_default(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    reply = await list_models(session, emulator)
    assert reply.status == 200
    data = reply.json()
    assert data["object"] == "list"
    assert {m["id"] for m in data["data"]} == CN_MODELS
    assert all(m["object"] == "model" for m in data["data"])
    t2i = await list_models(session, emulator, "?type=image&sub_type=text-to-image")
    assert {m["id"] for m in t2i.json()["data"]} == {KOLORS, QWEN}
    i2i = await list_models(session, emulator, "?type=image&sub_type=image-to-image")
    assert {m["id"] for m in i2i.json()["data"]} == {EDIT, EDIT_2509}
    assert (await list_models(session, emulator, "?type=text")).json()["data"] == []
    anonymous = await call(session, "GET", emulator.base_url + "/models")
    assert anonymous.status == 401
    stats = emulator.stats()
    assert stats["models_requests"] == 5
    assert stats["generation_requests"] == 0


async def test_a_model_not_offered_is_400_model_does_not_exist(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    for model in (SD, TURBO, "black-forest-labs/FLUX.1-schnell", "acme/never-was"):
        reply = await generate(session, emulator, {"model": model, "prompt": "x"})
        assert (reply.status, reply.json()) == (400, NO_SUCH_MODEL)
    assert (await generate(session, emulator, {"model": QWEN, "prompt": "x"})).status == 200
    assert emulator.stats()["images_generated"] == 1


async def test_offer_and_profile_set_the_list(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    async with emulator_factory(offer=(SD, "acme/new-model")) as emu:
        ids = [m["id"] for m in (await list_models(session, emu)).json()["data"]]
        assert ids == [SD, "acme/new-model"]
        assert (await generate(session, emu, {"model": SD, "prompt": "x"})).status == 200
        # A model the registry does not know is checked with the generic rules.
        unknown = {"model": "acme/new-model", "prompt": "x", "image_size": "640x640"}
        assert (await generate(session, emu, unknown)).status == 200
        assert (await generate(session, emu, {"prompt": "x"})).json() == NO_SUCH_MODEL
        emu.set_offer([KOLORS])
        assert emu.offered_models == (KOLORS,)
        assert (await generate(session, emu, {"prompt": "x"})).status == 200
        emu.set_offer(None)
        assert set(emu.offered_models) == CN_MODELS
    async with emulator_factory(profile="com") as emu:
        ids = {m["id"] for m in (await list_models(session, emu)).json()["data"]}
        assert ids == {r.name for r in ModelRegistry.builtin() if "com" in r.endpoints}


async def test_models_endpoint_can_be_absent(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    async with emulator_factory(models_endpoint=False) as emu:
        reply = await list_models(session, emu)
        assert (reply.status, reply.body) == (404, b"404 page not found")
        assert (await generate(session, emu)).status == 200
        emu.set_models_endpoint(True)
        assert (await list_models(session, emu)).status == 200


# --------------------------------------------------------------------------- image inputs


def image_bytes(kind: str, size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 40)).save(buffer, format=kind)
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


async def test_edit_inputs_are_decoded_checked_and_recorded(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    png, jpeg, webp = image_bytes("PNG"), image_bytes("JPEG"), image_bytes("WEBP")
    async with emulator_factory(image_px=None) as emu:
        body = {
            "model": EDIT_2509,
            "prompt": "make it blue",
            "image": data_uri(png),
            "image2": data_uri(jpeg, "image/jpeg"),
            "image3": "https://example.com/ref.webp",
        }
        reply = await generate(session, emu, body)
        assert reply.status == 200, reply.body
        one = {"model": EDIT, "prompt": "x", "image": data_uri(webp, "image/webp")}
        assert (await generate(session, emu, one)).status == 200
        expected = [
            {
                "image": {
                    "kind": "data",
                    "format": "png",
                    "sha256": hashlib.sha256(png).hexdigest(),
                    "bytes": len(png),
                    "url": None,
                },
                "image2": {
                    "kind": "data",
                    "format": "jpeg",
                    "sha256": hashlib.sha256(jpeg).hexdigest(),
                    "bytes": len(jpeg),
                    "url": None,
                },
                "image3": {
                    "kind": "url",
                    "format": None,
                    "sha256": None,
                    "bytes": None,
                    "url": "https://example.com/ref.webp",
                },
            },
            {
                "image": {
                    "kind": "data",
                    "format": "webp",
                    "sha256": hashlib.sha256(webp).hexdigest(),
                    "bytes": len(webp),
                    "url": None,
                }
            },
        ]
        assert emu.received_inputs == expected
        remote = await call(session, "GET", emu.root_url + "/_received_inputs")
        assert remote.json() == expected
        # An edit model's output does not follow an image_size (it takes none).
        image = await call(session, "GET", reply.json()["images"][0]["url"])
        assert png_size(image.body) == (512, 512)
        emu.reset_stats()
        assert emu.received_inputs == []


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"image": data_uri(b"GIF89a" + bytes(20), "image/gif")}, "not a PNG, JPEG or WebP"),
        ({"image": data_uri(b"<html></html>")}, "not a PNG, JPEG or WebP"),
        ({"image": "data:image/png;base64,@@@"}, "not valid base64"),
        ({"image": "data:image/png,rawbytes"}, "must be base64"),
        ({"image": "/home/me/cat.png"}, "image must be a URL or a data URI"),
        ({"image": "https://e.com/a.png", "image2": "cat.png"}, "image2 must be a URL"),
        ({"image2": "https://e.com/a.png"}, "image is required"),
    ],
)
async def test_bad_input_images_are_400_and_not_recorded(
    emulator: Emulator, session: aiohttp.ClientSession, fields: dict[str, str], expected: str
) -> None:
    reply = await generate(session, emulator, {"model": EDIT_2509, "prompt": "x", **fields})
    assert reply.status == 400
    assert reply.json()["code"] == 20012
    assert expected in reply.json()["message"]
    assert emulator.received_inputs == []
    assert emulator.stats()["images_generated"] == 0


async def test_image2_is_refused_by_a_one_image_model(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    url = "https://example.com/a.png"
    body = {"model": EDIT, "prompt": "x", "image": url, "image2": url}
    reply = await generate(session, emulator, body)
    assert reply.status == 400
    assert "image2 is not accepted by Qwen/Qwen-Image-Edit" in reply.json()["message"]


# --------------------------------------------------------------------------- 429


async def test_rpm_window_slides(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    async with emulator_factory(rpm=2) as emu:
        assert (await generate(session, emu)).status == 200  # A at t=0
        emu.advance_clock(30)
        assert (await generate(session, emu)).status == 200  # B at t=30
        refused = await generate(session, emu)
        assert refused.status == 429
        assert refused.json() == rate_limited("RPM")
        assert "Retry-After" not in refused.headers
        emu.advance_clock(30.01)  # A has left the window, B has not
        assert (await generate(session, emu)).status == 200
        assert (await generate(session, emu)).status == 429
        stats = emu.stats()
        assert stats["status_counts"] == {"200": 3, "429": 2}
        assert stats["max_requests_60s"] == 2


async def test_refused_requests_consume_nothing(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    async with emulator_factory(rpm=2) as emu:
        for _ in range(2):
            assert (await generate(session, emu)).status == 200
        for _ in range(5):
            assert (await generate(session, emu)).status == 429
        emu.advance_clock(60)
        for _ in range(2):
            assert (await generate(session, emu)).status == 200
        assert emu.usage() == {
            "requests_60s": 2,
            "images_60s": 2,
            "requests_today": 4,
            "images_today": 4,
        }


async def test_ipm_weighs_requests_by_batch_size(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    async with emulator_factory(ipm=5) as emu:
        assert (await generate(session, emu, {"prompt": "x", "batch_size": 4})).status == 200
        refused = await generate(session, emu, {"prompt": "x", "batch_size": 2})
        assert refused.status == 429
        assert refused.json() == rate_limited("IPM")
        assert (await generate(session, emu, {"prompt": "x", "batch_size": 1})).status == 200
        assert (await generate(session, emu, {"prompt": "x", "batch_size": 1})).status == 429
        emu.advance_clock(60)
        assert (await generate(session, emu, {"prompt": "x", "batch_size": 4})).status == 200
        stats = emu.stats()
        assert stats["images_generated"] == 9
        assert stats["max_images_60s"] == 5


async def test_ipd_resets_at_the_day_boundary_in_utc_plus_8(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    async with emulator_factory(ipd=3, retry_after_s=0) as emu:
        emu.advance_clock(seconds_to_day_end(emu) - 120)  # two minutes before midnight
        assert (await generate(session, emu, {"prompt": "x", "batch_size": 3})).status == 200
        refused = await generate(session, emu)
        assert refused.status == 429
        assert refused.json() == rate_limited("IPD")
        assert 110 <= int(refused.headers["Retry-After"]) <= 121
        emu.advance_clock(61)  # the minute windows have slid, the day has not
        assert (await generate(session, emu)).status == 429
        emu.advance_clock(60)  # past midnight UTC+8
        assert (await generate(session, emu, {"prompt": "x", "batch_size": 3})).status == 200
        assert (await generate(session, emu)).status == 429


async def test_day_offset_is_configurable(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    async with emulator_factory(ipd=1, day_utc_offset_h=0) as emu:
        emu.advance_clock(seconds_to_day_end(emu, 0) - 30)
        assert (await generate(session, emu)).status == 200
        assert (await generate(session, emu)).status == 429
        emu.advance_clock(31)  # past midnight UTC
        assert (await generate(session, emu)).status == 200


async def test_retry_after_is_the_computed_wait_or_the_configured_value(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    async with emulator_factory(rpm=1, retry_after_s=0) as emu:
        await generate(session, emu)
        assert (await generate(session, emu)).headers["Retry-After"] == "60"
        emu.advance_clock(45)
        assert (await generate(session, emu)).headers["Retry-After"] == "15"
    async with emulator_factory(ipm=1, retry_after_s=7.5) as emu:
        await generate(session, emu)
        assert (await generate(session, emu)).headers["Retry-After"] == "8"


async def test_a_concurrent_burst_admits_exactly_the_limit(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    async with emulator_factory(rpm=10, latency_s=0.02) as emu:
        replies = await asyncio.gather(*(generate(session, emu) for _ in range(30)))
        assert sorted(r.status for r in replies) == [200] * 10 + [429] * 20
        stats = emu.stats()
        assert stats["max_requests_60s"] == 10
        assert sum(stats["accepted_per_s"].values()) == 10


async def test_limits_are_per_key(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    async with emulator_factory(api_keys=frozenset({"sk-a", "sk-b"}), rpm=1) as emu:
        assert (await generate(session, emu, key="sk-a")).status == 200
        assert (await generate(session, emu, key="sk-a")).status == 429
        assert (await generate(session, emu, key="sk-b")).status == 200


async def test_limits_change_at_runtime(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    async with emulator_factory(rpm=5) as emu:
        for _ in range(2):
            assert (await generate(session, emu)).status == 200
        emu.set_limits(rpm=2)
        assert emu.config.rpm == 2
        assert (await generate(session, emu)).status == 429
        emu.set_limits(rpm=None, ipm=3)
        assert (await generate(session, emu)).status == 200
        assert (await generate(session, emu)).status == 429  # 4 images in the window
        emu.set_limits(ipm=None)
        assert (await generate(session, emu)).status == 200


async def test_limits_are_per_key_and_per_model(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    keys = frozenset({"sk-a", "sk-b"})
    async with emulator_factory(api_keys=keys, ipm=2) as emu:
        for model in (KOLORS, QWEN):
            for _ in range(2):
                assert (
                    await generate(session, emu, {"model": model, "prompt": "x"}, key="sk-a")
                ).status == 200
            refused = await generate(session, emu, {"model": model, "prompt": "x"}, key="sk-a")
            assert (refused.status, refused.json()) == (429, rate_limited("IPM"))
        assert (
            await generate(session, emu, {"model": QWEN, "prompt": "x"}, key="sk-b")
        ).status == 200
        assert emu.usage("sk-a", KOLORS)["images_60s"] == 2
        assert emu.usage("sk-a")["images_60s"] == 4
        assert emu.usage("sk-b") == {
            "requests_60s": 1,
            "images_60s": 1,
            "requests_today": 1,
            "images_today": 1,
        }
        stats = emu.stats()
        assert stats["images_by_model"] == {KOLORS: 2, QWEN: 3}
        assert stats["images_by_key"] == {"sk-a": 4, "sk-b": 1}


async def test_a_model_can_have_its_own_limits(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    async with emulator_factory(rpm=3, model_limits={QWEN: Limits(ipm=1)}) as emu:
        assert (await generate(session, emu, {"model": QWEN, "prompt": "x"})).status == 200
        refused = await generate(session, emu, {"model": QWEN, "prompt": "x"})
        assert refused.json() == rate_limited("IPM")
        for _ in range(3):  # the global limits apply to Kolors
            assert (await generate(session, emu)).status == 200
        assert (await generate(session, emu)).json() == rate_limited("RPM")
        emu.set_model_limits(QWEN, None)  # back to rpm=3: one request in the window
        assert (await generate(session, emu, {"model": QWEN, "prompt": "x"})).status == 200
        emu.set_model_limits(KOLORS, Limits(rpm=10))
        assert (await generate(session, emu)).status == 200
        assert emu.config.model_limits == {KOLORS: Limits(rpm=10)}


async def test_rpd_is_a_daily_request_limit(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    async with emulator_factory(rpd=2) as emu:
        for _ in range(2):
            assert (await generate(session, emu, {"prompt": "x", "batch_size": 4})).status == 200
        emu.advance_clock(120)
        assert (await generate(session, emu)).json() == rate_limited("RPD")
        emu.advance_clock(seconds_to_day_end(emu) + 1)
        assert (await generate(session, emu)).status == 200


# --------------------------------------------------------------------------- 403


async def test_account_blocks_are_403_and_can_be_flipped(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    emulator.set_account_block("balance")
    reply = await generate(session, emulator)
    assert (reply.status, reply.json()) == (
        403,
        {"code": 30001, "message": "Sorry, your account balance is insufficient"},
    )
    emulator.set_account_block("verification")
    reply = await generate(session, emulator)
    assert reply.status == 403
    assert reply.json()["code"] == 30002
    assert "real-name authentication" in reply.json()["message"]
    assert (await list_models(session, emulator)).status == 200  # listing still works
    emulator.set_account_block(None)
    assert (await generate(session, emulator)).status == 200
    stats = emulator.stats()
    assert stats["status_counts"] == {"403": 2, "200": 1}
    assert stats["images_generated"] == 1
    with pytest.raises(ValueError, match="kind"):
        emulator.set_account_block("broke")  # type: ignore[arg-type]


async def test_a_disabled_model_is_403_30003_for_that_model_only(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    async with emulator_factory(disabled_models=frozenset({QWEN})) as emu:
        reply = await generate(session, emu, {"model": QWEN, "prompt": "x"})
        assert (reply.status, reply.json()) == (403, {"code": 30003, "message": "Model disabled."})
        assert (await generate(session, emu, {"model": KOLORS, "prompt": "x"})).status == 200
        emu.enable_model(QWEN)
        assert (await generate(session, emu, {"model": QWEN, "prompt": "x"})).status == 200
        emu.disable_model(KOLORS)
        assert (await generate(session, emu)).json()["code"] == 30003
        assert emu.config.disabled_models == frozenset({KOLORS})


async def test_403s_are_switched_by_the_control_endpoint(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    control = emulator.root_url + "/_control"
    state = (await call(session, "POST", control, json={"disabled_models": [QWEN]})).json()
    assert state["disabled_models"] == [QWEN]
    assert (await generate(session, emulator, {"model": QWEN, "prompt": "x"})).status == 403
    await call(session, "POST", control, json={"account_block": "balance"})
    assert (await generate(session, emulator)).json()["code"] == 30001
    await call(session, "POST", control, json={"account_block": None, "disabled_models": []})
    assert (await generate(session, emulator, {"model": QWEN, "prompt": "x"})).status == 200
    bad = await call(session, "POST", control, json={"account_block": "broke"})
    assert bad.status == 400


async def test_one_key_can_run_out_while_the_others_go_on(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    keys = frozenset({"sk-a", "sk-b"})
    async with emulator_factory(api_keys=keys, ipm=5, key_limits={"sk-b": Limits(ipd=1)}) as emu:
        assert (await generate(session, emu, key="sk-b")).status == 200
        assert (await generate(session, emu, key="sk-b")).json() == rate_limited("IPD")
        for _ in range(5):
            assert (await generate(session, emu, key="sk-a")).status == 200
        assert (await generate(session, emu, key="sk-a")).json() == rate_limited("IPM")
        emu.set_key_limits("sk-b", None)  # back to ipm=5, no daily limit
        assert (await generate(session, emu, key="sk-b")).status == 200

        emu.set_account_block("balance", key="sk-a")
        assert (await generate(session, emu, key="sk-a")).json()["code"] == 30001
        assert (await generate(session, emu, key="sk-b")).status == 200
        control = emu.root_url + "/_control"
        body = {"key_blocks": {"sk-a": None, "sk-b": "verification"}, "key_limits": {"sk-a": {}}}
        state = (await call(session, "POST", control, json=body)).json()
        assert state["key_blocks"] == {"sk-b": "verification"}
        assert state["key_limits"] == {"sk-a": {"rpm": None, "ipm": None, "ipd": None, "rpd": None}}
        assert (await generate(session, emu, key="sk-a")).status == 200  # its own: unlimited
        assert (await generate(session, emu, key="sk-b")).json()["code"] == 30002
        assert emu.config.key_blocks == {"sk-b": "verification"}
        bad = await call(session, "POST", control, json={"key_blocks": {"sk-a": "broke"}})
        assert bad.status == 400


# --------------------------------------------------------------------------- outage


async def test_an_outage_drops_connections_and_ends_on_the_same_port(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    base_url = emulator.base_url
    ok = await generate(session, emulator)
    emulator.set_outage(True)
    for attempt in (generate(session, emulator), list_models(session, emulator)):
        with pytest.raises(aiohttp.ClientConnectionError):
            await attempt
    with pytest.raises(aiohttp.ClientConnectionError):
        await call(session, "GET", ok.json()["images"][0]["url"])
    stats = await call(session, "GET", emulator.root_url + "/_stats")  # still answers
    assert stats.json()["outage_drops"] >= 3  # aiohttp retries once on a reused connection
    emulator.set_outage(False)
    assert emulator.base_url == base_url
    assert (await generate(session, emulator)).status == 200
    control = emulator.root_url + "/_control"
    assert (await call(session, "POST", control, json={"outage": True})).json()["outage"]
    with pytest.raises(aiohttp.ClientConnectionError):
        await generate(session, emulator)
    await call(session, "POST", control, json={"outage": False})
    assert (await generate(session, emulator)).status == 200
    assert emulator.stats()["status_counts"] == {"200": 3}


# --------------------------------------------------------------------------- several keys


async def test_each_key_is_an_account_with_its_own_counters(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    keys = frozenset({"sk-1", "sk-2", "sk-3"})
    async with emulator_factory(api_keys=keys, ipd=4) as emu:
        assert (
            await generate(session, emu, {"prompt": "x", "batch_size": 4}, key="sk-1")
        ).status == 200
        assert (await generate(session, emu, key="sk-1")).json() == rate_limited("IPD")
        for key in ("sk-2", "sk-3"):
            assert (await generate(session, emu, key=key)).status == 200
        assert (await generate(session, emu, key="sk-4")).status == 401
        assert [emu.usage(k)["images_today"] for k in sorted(keys)] == [4, 1, 1]
        assert emu.stats()["images_by_key"] == {"sk-1": 4, "sk-2": 1, "sk-3": 1}


# --------------------------------------------------------------------------- images


async def test_images_are_deterministic_valid_pngs(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    async def fetch(emu: Emulator, seed: int, prompt: str, batch: int = 1) -> list[bytes]:
        reply = await generate(session, emu, {"prompt": prompt, "seed": seed, "batch_size": batch})
        return [(await call(session, "GET", i["url"])).body for i in reply.json()["images"]]

    async with emulator_factory() as one, emulator_factory() as other:
        first = await fetch(one, 11, "a cat", batch=2)
        assert await fetch(one, 11, "a cat", batch=2) == first
        assert await fetch(other, 11, "a cat", batch=2) == first  # a different URL secret
        assert first[0] != first[1]  # index matters
        assert (await fetch(one, 12, "a cat"))[0] != first[0]
        assert (await fetch(one, 11, "a dog"))[0] != first[0]
    assert png_size(first[0]) == (64, 64)
    image = Image.open(io.BytesIO(first[0]))
    image.load()
    assert image.size == (64, 64)
    assert image.mode == "RGB"
    pixels = image.tobytes()
    assert len({pixels[i : i + 3] for i in range(0, len(pixels), 3)}) > 100  # not a flat colour


async def test_image_px_none_serves_the_requested_size(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    async with emulator_factory(image_px=None) as emu:
        reply = await generate(session, emu, {"prompt": "x", "image_size": "768x512", "seed": 1})
        png = (await call(session, "GET", reply.json()["images"][0]["url"])).body
        assert png_size(png) == (768, 512)
        assert png == emu.expected_png(seed=1, prompt="x", index=0, width=768, height=512)
        default = await generate(session, emu, {"prompt": "x", "model": QWEN})
        png = (await call(session, "GET", default.json()["images"][0]["url"])).body
        assert png_size(png) == (1328, 1328)


async def test_urls_expire_and_cannot_be_forged(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    async with emulator_factory(url_ttl_s=100) as emu:
        url = (await generate(session, emu)).json()["images"][0]["url"]
        emu.advance_clock(99)
        assert (await call(session, "GET", url)).status == 200
        token = url.rsplit("/", 1)[1].removesuffix(".png")
        forged = token[:-3] + ("AAA" if token[-3:] != "AAA" else "BBB")
        for bad in (forged, "not-a-token", ""):
            reply = await call(session, "GET", f"{emu.root_url}/files/{bad}.png")
            assert reply.status == 404
        assert (await call(session, "GET", url.removesuffix(".png"))).status == 404
        emu.advance_clock(2)
        expired = await call(session, "GET", url)
        assert expired.status == 404
        stats = emu.stats()
        assert stats["images_served"] == 1
        assert stats["download_status_counts"] == {"200": 1, "404": 5}


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("fault", "status", "expected"),
    [
        (
            "p_503",
            503,
            {"code": 50505, "message": "Model service overloaded. Please try again later."},
        ),
        ("p_504", 504, "Gateway Timeout"),
        ("p_500", 500, {"code": 50000, "message": "Internal server error"}),
    ],
)
async def test_server_error_faults(
    emulator_factory: EmulatorFactory,
    session: aiohttp.ClientSession,
    fault: str,
    status: int,
    expected: Any,
) -> None:
    faults: dict[str, Any] = {fault: 1.0}
    async with emulator_factory(faults=FaultConfig(**faults), rpm=1) as emu:
        for _ in range(3):  # a fault consumes no quota, so rpm=1 never trips
            reply = await generate(session, emu)
            assert reply.status == status
            if isinstance(expected, dict):
                assert reply.json() == {**expected, "data": reply.trace_id}
            else:
                assert reply.json() == expected
        emu.set_faults(FaultConfig())
        assert (await generate(session, emu)).status == 200
        assert emu.stats()["status_counts"] == {str(status): 3, "200": 1}


async def test_reset_fault_drops_the_connection(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    async with emulator_factory(faults=FaultConfig(p_reset=1.0)) as emu:
        with pytest.raises(aiohttp.ClientConnectionError):
            await generate(session, emu)
        assert emu.stats()["status_counts"] == {"reset": 1}
        emu.set_faults(FaultConfig())
        assert (await generate(session, emu)).status == 200


async def test_faults_follow_their_seed(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    faults = FaultConfig(seed=5, p_503=0.3, p_504=0.2)
    sequences = []
    async with emulator_factory(faults=faults) as emu:
        for _ in range(2):
            emu.set_faults(faults)  # restarts the fault RNG
            sequences.append([(await generate(session, emu)).status for _ in range(30)])
    assert sequences[0] == sequences[1]
    assert {200, 503, 504} == set(sequences[0])


async def _one_image_url(session: aiohttp.ClientSession, emu: Emulator) -> str:
    url: str = (await generate(session, emu, {"prompt": "x", "seed": 3})).json()["images"][0]["url"]
    return url


async def test_truncated_image_fault(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    async with emulator_factory(faults=FaultConfig(p_truncated_image=1.0)) as emu:
        url = await _one_image_url(session, emu)
        with pytest.raises(aiohttp.ClientPayloadError):
            await call(session, "GET", url)
        assert emu.stats()["download_status_counts"] == {"truncated": 1}


async def test_stalled_image_fault(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    async with emulator_factory(faults=FaultConfig(p_stalled_image=1.0, stall_s=60)) as emu:
        url = await _one_image_url(session, emu)
        with pytest.raises(TimeoutError):
            await call(session, "GET", url, timeout=aiohttp.ClientTimeout(total=0.3))
        stopping = time.perf_counter()
    # Stopping does not wait out the stall of the abandoned download.
    assert time.perf_counter() - stopping < 10

    async with emulator_factory(faults=FaultConfig(p_stalled_image=1.0, stall_s=0.1)) as emu:
        url = await _one_image_url(session, emu)
        reply = await call(session, "GET", url)
        assert reply.body == emu.expected_png(seed=3, prompt="x", index=0, width=64, height=64)


async def test_expired_url_and_not_image_faults(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    async with emulator_factory(faults=FaultConfig(p_expired_url=1.0)) as emu:
        url = await _one_image_url(session, emu)
        assert (await call(session, "GET", url)).status == 404
        emu.set_faults(FaultConfig(p_not_image=1.0))
        reply = await call(session, "GET", url)
        assert reply.status == 200
        assert reply.headers["Content-Type"] == "image/png"
        assert not reply.body.startswith(PNG_MAGIC)
        emu.set_faults(FaultConfig())
        assert (await call(session, "GET", url)).body.startswith(PNG_MAGIC)


async def test_an_emulator_can_be_restarted(session: aiohttp.ClientSession) -> None:
    emu = Emulator(host="127.0.0.1", port=0)
    for _ in range(2):
        await emu.start()
        try:
            assert (await generate(session, emu)).status == 200
        finally:
            await emu.stop()
    assert emu.stats()["generation_requests"] == 2


async def test_echo_key_fault_leaks_the_key_in_code_and_across_character_500(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    key = "sk-" + "abcdef0123456789" * 3
    faults = FaultConfig(p_echo_key=1.0)
    async with emulator_factory(api_keys=frozenset({key}), faults=faults) as emu:
        reply = await generate(session, emu, key=key)
        assert reply.status == 400
        body = reply.json()
        assert body["code"] == key
        message = body["message"]
        assert len(message) > 520
        assert message[:500].endswith(key[:-4])  # a cut at 500 keeps all but 4 characters
        assert key in message
        assert emu.stats()["status_counts"] == {"echo_key": 1}
        assert emu.stats()["images_generated"] == 0


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="probability"):
        FaultConfig(p_503=1.5)
    with pytest.raises(ValueError, match="at most 1"):
        FaultConfig(p_503=0.6, p_reset=0.6)
    with pytest.raises(ValueError, match="at most 1"):
        FaultConfig(p_truncated_image=0.5, p_not_image=0.6)
    with pytest.raises(ValueError, match="rpm"):
        EmulatorConfig(rpm=0)
    with pytest.raises(ValueError, match="image_px"):
        EmulatorConfig(image_px=0)
    with pytest.raises(ValueError, match="forward"):
        Emulator().advance_clock(-1)
    with pytest.raises(ValueError, match="profile"):
        EmulatorConfig(profile="eu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="account_block"):
        EmulatorConfig(account_block="broke")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model_limits"):
        EmulatorConfig(model_limits={QWEN: {"ipm": 1}})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="rpd"):
        EmulatorConfig(rpd=0)
    with pytest.raises(ValueError, match="at most 1"):
        FaultConfig(p_503=0.6, p_echo_key=0.6)


# --------------------------------------------------------------------------- /_stats, /_control


async def test_stats_endpoint_counts_what_the_server_saw(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    ok = await generate(session, emulator, {"prompt": "x", "batch_size": 2})
    await generate(session, emulator, {"prompt": ""})
    await generate(session, emulator, key="sk-bad")
    png = await call(session, "GET", ok.json()["images"][0]["url"])
    reply = await call(session, "GET", emulator.root_url + "/_stats")
    assert reply.status == 200
    stats = reply.json()
    assert stats["generation_requests"] == 3
    assert stats["status_counts"] == {"200": 1, "400": 1, "401": 1}
    assert stats["images_generated"] == 2
    assert stats["images_served"] == 1
    assert stats["download_bytes"] == len(png.body)
    assert stats["accepted_per_s"] == {"0": 1}
    assert stats["images_per_s"] == {"0": 2}
    assert stats["max_requests_60s"] == 1
    assert stats["max_images_60s"] == 2
    assert stats["peak_in_flight"] == 1
    assert stats["in_flight"] == 0
    assert emulator.stats()["accepted_per_s"] == {0: 1}


async def test_admissions_log_each_limit_decision(
    emulator_factory: EmulatorFactory, session: aiohttp.ClientSession
) -> None:
    """What the server admitted and refused, when, for which key: what benchmarks read."""
    async with emulator_factory(api_keys=frozenset({"sk-a", "sk-b"}), ipm=2) as emu:
        for key, batch in (("sk-a", 2), ("sk-a", 1), ("sk-b", 1)):
            await generate(session, emu, {"prompt": "x", "batch_size": batch}, key=key)
        await generate(session, emu, {"prompt": ""}, key="sk-b")  # a 400 decides nothing
        emu.advance_clock(61)
        assert (await generate(session, emu, key="sk-a")).status == 200
        reply = await call(session, "GET", emu.root_url + "/_admissions")
        assert reply.status == 200
        log = reply.json()
        assert [entry[1:] for entry in log] == [
            ["sk-a", 2, "ok"],
            ["sk-a", 1, "IPM"],
            ["sk-b", 1, "ok"],
            ["sk-a", 1, "ok"],
        ]
        times = [entry[0] for entry in log]
        assert times == sorted(times) and times[-1] - times[0] >= 61_000
        assert [list(entry) for entry in emu.admissions()] == log
        emu.reset_stats()
        assert emu.admissions() == []


async def test_control_endpoint(emulator: Emulator, session: aiohttp.ClientSession) -> None:
    control = emulator.root_url + "/_control"
    reply = await call(session, "POST", control, json={"limits": {"rpm": 1}})
    assert reply.json()["limits"] == {"rpm": 1, "ipm": None, "ipd": None, "rpd": None}
    assert (await generate(session, emulator)).status == 200
    reply = await call(session, "POST", control, json={"faults": {"p_503": 1.0}, "advance_s": 5})
    assert reply.status == 200
    assert reply.json()["faults"]["p_503"] == 1.0
    assert reply.json()["clock_offset_s"] == 5
    assert (await generate(session, emulator)).status == 503
    await call(session, "POST", control, json={"faults": {}, "reset_stats": True})
    assert (await generate(session, emulator)).status == 429  # the first request is 5 s old
    await call(session, "POST", control, json={"advance_s": 55})
    assert (await generate(session, emulator)).status == 200
    stats = emulator.stats()
    assert stats["status_counts"] == {"429": 1, "200": 1}
    assert stats["clock_offset_s"] == 60

    bad_bodies: list[Any] = [
        {"advance_s": -1},
        {"limits": {"rpm": 0}},
        {"faults": {"p_9": 1}},
        {"nope": 1},
        {"offer": KOLORS},
        {"model_limits": {QWEN: {"ipm": 0}}},
        {"outage": "yes"},
        {"models_endpoint": 1},
        [],
    ]
    for bad in bad_bodies:
        assert (await call(session, "POST", control, json=bad)).status == 400
    assert (await call(session, "POST", control, data=b"{")).status == 400


async def test_control_endpoint_sets_todays_service(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    control = emulator.root_url + "/_control"
    body = {"offer": [QWEN], "model_limits": {QWEN: {"ipm": 1}}, "models_endpoint": False}
    state = (await call(session, "POST", control, json=body)).json()
    assert state["offer"] == [QWEN]
    assert state["model_limits"] == {QWEN: {"rpm": None, "ipm": 1, "ipd": None, "rpd": None}}
    assert state["models_endpoint"] is False
    assert (await list_models(session, emulator)).status == 404
    assert (await generate(session, emulator)).json() == NO_SUCH_MODEL
    assert (await generate(session, emulator, {"model": QWEN, "prompt": "x"})).status == 200
    assert (await generate(session, emulator, {"model": QWEN, "prompt": "x"})).status == 429
    state = (await call(session, "POST", control, json={"model_limits": {QWEN: None}})).json()
    assert state["model_limits"] == {}
    assert (await generate(session, emulator, {"model": QWEN, "prompt": "x"})).status == 200
    edit = {"model": EDIT, "prompt": "x", "image": "https://example.com/a.png"}
    await call(session, "POST", control, json={"offer": [EDIT]})
    assert (await generate(session, emulator, edit)).status == 200
    assert len(emulator.received_inputs) == 1
    await call(session, "POST", control, json={"reset_stats": True})
    assert (await call(session, "GET", emulator.root_url + "/_received_inputs")).json() == []


# --------------------------------------------------------------------------- CLI


def test_cli_flags_build_the_config() -> None:
    args = build_parser().parse_args(
        [
            "emulator", "--port", "0", "--key", "sk-a", "--key", "sk-b", "--rpm", "5",
            "--ipd", "400", "--retry-after", "0", "--latency", "0.5", "--image-px", "0",
            "--fault-503", "0.1", "--fault-truncated", "0.2", "--stall", "2", "--seed", "9",
        ]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.api_keys == frozenset({"sk-a", "sk-b"})
    assert (config.rpm, config.ipm, config.ipd, config.retry_after_s) == (5, None, 400, 0)
    assert config.latency_s == 0.5
    assert config.image_px is None
    assert config.faults == FaultConfig(seed=9, p_503=0.1, p_truncated_image=0.2, stall_s=2)
    default = config_from_args(build_parser().parse_args(["emulator"]))
    assert (default.port, default.image_px) == (8765, 64)
    assert default.api_keys == frozenset({"sk-emulator"})
    assert (default.profile, default.offer, default.models_endpoint) == ("cn", None, True)
    assert (default.account_block, default.disabled_models, default.outage) == (
        None,
        frozenset(),
        False,
    )


def test_cli_flags_for_todays_service() -> None:
    args = build_parser().parse_args(
        [
            "emulator", "--profile", "com", "--offer", KOLORS, "--offer", QWEN,
            "--no-models-list", "--rpd", "100", "--ipm", "2",
            "--model-limit", f"{QWEN}:ipm=60,rpm=10", "--model-limit", f"{KOLORS}:ipd=5",
            "--fault-403", "balance", "--fault-403", f"disabled:{QWEN}",
            "--fault-echo-key", "0.5", "--outage", "--key-limit", "sk-b:ipd=3",
        ]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.profile == "com"
    assert config.offer == (KOLORS, QWEN)
    assert config.models_endpoint is False
    assert (config.rpd, config.ipm) == (100, 2)
    assert config.model_limits == {QWEN: Limits(ipm=60, rpm=10), KOLORS: Limits(ipd=5)}
    assert config.key_limits == {"sk-b": Limits(ipd=3)}
    assert config.account_block == "balance"
    assert config.disabled_models == frozenset({QWEN})
    assert config.faults.p_echo_key == 0.5
    assert config.outage is True


@pytest.mark.parametrize(
    "flags",
    [
        ["--model-limit", "Qwen/Qwen-Image"],
        ["--model-limit", "Qwen/Qwen-Image:ipm"],
        ["--model-limit", "Qwen/Qwen-Image:tpm=5"],
        ["--model-limit", "Qwen/Qwen-Image:ipm=lots"],
        ["--model-limit", ":ipm=5"],
        ["--model-limit", "Qwen/Qwen-Image:ipm=0"],
        ["--key-limit", "sk-b"],
        ["--fault-403", "broke"],
        ["--fault-403", "disabled"],
        ["--fault-403", "balance:Qwen/Qwen-Image"],
    ],
)
def test_bad_cli_flags_are_refused(flags: list[str]) -> None:
    args = build_parser().parse_args(["emulator", *flags])
    with pytest.raises(ValueError):
        config_from_args(args)


def test_cli_serves_until_interrupted() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sfbatch", "emulator", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("sfbatch emulator listening on http://127.0.0.1:")
        assert line.rstrip().endswith("/v1 (key: sk-emulator)")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
