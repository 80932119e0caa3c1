"""Checks before paying: the model list, request defaults checked as flags, inputs in records.

Runs ``sfbatch`` as a user would (a subprocess) against the emulator over loopback; the
small parts (:class:`ModelOffer`, :func:`fetch_offer`, :func:`check_defaults`) also
directly.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from conftest import REPO, run_sfbatch, sfbatch_env
from PIL import Image

from sfbatch.client import SiliconFlowClient
from sfbatch.config import RequestDefaults
from sfbatch.emulator import Emulator
from sfbatch.errors import AuthenticationError, ConfigError
from sfbatch.jobfile import Overrides, load, merge
from sfbatch.manifest import latest_records
from sfbatch.modelcheck import ModelOffer, check_defaults, fetch_offer
from sfbatch.models import ModelRegistry, ModelRule

TODAY_CN = (
    "Kwai-Kolors/Kolors",
    "Qwen/Qwen-Image",
    "Qwen/Qwen-Image-Edit",
    "Qwen/Qwen-Image-Edit-2509",
)
SD35 = "stabilityai/stable-diffusion-3-5-large"
EDIT3 = "Qwen/Qwen-Image-Edit-2509"


async def sfbatch(*args: str, key: str | None = "sk-emulator", cwd: Path = REPO) -> tuple[int, str]:
    code, out, err = await run_sfbatch(*args, env=sfbatch_env(key), cwd=cwd, deadline_s=90)
    return code, out + err


def prompts(path: Path, n: int) -> Path:
    path.write_text("".join(f"a lighthouse, study {i}\n" for i in range(n)))
    return path


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, "PNG")
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the model list, before the first generation ---------------------------------------------


async def test_no_model_against_todays_cn_list_completes(tmp_path: Path) -> None:
    src = prompts(tmp_path / "p.txt", 5)
    async with Emulator(offer=TODAY_CN) as emu:
        code, output = await sfbatch(
            "run", str(src), "--out", str(tmp_path / "out"), "--base-url", emu.base_url
        )
        stats = emu.stats()
    assert code == 0, output
    assert stats["models_requests"] == 1 and stats["generation_requests"] == 5


async def test_a_withdrawn_model_is_exit_2_with_nothing_sent_and_the_offer_listed(
    tmp_path: Path,
) -> None:
    src = prompts(tmp_path / "p.txt", 5)
    out = tmp_path / "out"
    async with Emulator(offer=TODAY_CN) as emu:
        code, output = await sfbatch(
            "run", str(src), "--out", str(out), "--base-url", emu.base_url, "--model", SD35
        )
        stats = emu.stats()
    assert code == 2, output
    assert stats["generation_requests"] == 0 and stats["models_requests"] == 1
    assert f"model {SD35} is not offered by {emu.base_url}" in output
    assert f"(it offers: {', '.join(TODAY_CN)})" in output
    assert "withdrawn" in output and "--no-model-check" in output
    assert not out.exists()


async def test_the_embedded_emulator_is_checked_too(tmp_path: Path) -> None:
    src = prompts(tmp_path / "p.txt", 2)
    code, output = await sfbatch(
        "run", str(src), "--out", str(tmp_path / "o"), "--emulator", "--model", SD35, key=None
    )
    assert code == 2, output
    assert f"model {SD35} is not offered" in output and "Kwai-Kolors/Kolors" in output


async def test_no_model_check_sends_anyway_and_the_server_has_the_last_word(
    tmp_path: Path,
) -> None:
    src = prompts(tmp_path / "p.txt", 2)
    out = tmp_path / "out"
    async with Emulator(offer=TODAY_CN) as emu:
        args = ("run", str(src), "--out", str(out), "--base-url", emu.base_url)
        code, output = await sfbatch(*args, "--model", SD35, "--no-model-check")
        stats = emu.stats()
    assert code == 1, output
    assert stats["models_requests"] == 0 and stats["generation_requests"] == 2
    records = latest_records([out / "manifest.jsonl"]).values()
    assert {(r["status"], r["error"]["code"]) for r in records} == {("failed", 20012)}  # type: ignore[index]


async def test_an_unlisted_endpoint_is_a_warning_and_the_run_goes_on(tmp_path: Path) -> None:
    src = prompts(tmp_path / "p.txt", 3)
    async with Emulator(models_endpoint=False) as emu:
        code, output = await sfbatch(
            "run", str(src), "--out", str(tmp_path / "out"), "--base-url", emu.base_url
        )
        stats = emu.stats()
    assert code == 0, output
    assert "could not list the endpoint's models" in output and "404" in output
    assert stats["generation_requests"] == 3


async def test_a_row_naming_a_model_not_offered_is_invalid_and_never_sent(tmp_path: Path) -> None:
    src = tmp_path / "p.jsonl"
    src.write_bytes(
        b'{"prompt": "a cat"}\n'
        + orjson.dumps({"prompt": "a dog", "model": SD35})
        + b"\n"
        + orjson.dumps({"prompt": "a fox", "model": "Qwen/Qwen-Image"})
        + b"\n"
    )
    out = tmp_path / "out"
    async with Emulator(offer=TODAY_CN) as emu:
        code, output = await sfbatch("run", str(src), "--out", str(out), "--base-url", emu.base_url)
        stats = emu.stats()
    assert code == 1, output
    assert stats["generation_requests"] == 2
    by_line = {r["line"]: r for r in latest_records([out / "manifest.jsonl"]).values()}
    assert [by_line[n]["status"] for n in (1, 2, 3)] == ["ok", "invalid", "ok"]
    message = by_line[2]["error"]["message"]  # type: ignore[index]
    assert message.startswith(f"{src}:2: model {SD35} is not offered by")
    assert "Qwen/Qwen-Image-Edit-2509" in message


class _SlowModels:
    """An endpoint whose model list answers only after ``delay_s`` (never, for a test)."""

    def __init__(self, status: int = 200, delay_s: float = 0.0) -> None:
        self.status, self.delay_s = status, delay_s

    async def handle(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.delay_s)
        if self.status != 200:
            return web.json_response({"code": 1, "message": "nope"}, status=self.status)
        return web.json_response({"data": [{"id": "A/one"}, {"id": "B/two"}]})


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[_SlowModels, str]]:
    models = _SlowModels()
    app = web.Application()
    app.router.add_get("/v1/models", models.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield models, f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


async def test_fetch_offer_lists_warns_or_stops_on_a_bad_key(
    endpoint: tuple[_SlowModels, str], caplog: pytest.LogCaptureFixture
) -> None:
    models, url = endpoint
    async with SiliconFlowClient(base_url=url, api_key="sk-x") as client:
        offer = await fetch_offer(client)
        assert offer == ModelOffer(url, ("A/one", "B/two"))
        for status in (404, 500, 503):
            models.status = status
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="sfbatch"):
                assert await fetch_offer(client) is None
            assert f"could not list the endpoint's models ({status}" in caplog.text
        models.status, models.delay_s = 200, 3600.0
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sfbatch"):
            assert await fetch_offer(client, timeout_s=0.2) is None
        assert "no answer within" in caplog.text
        models.status, models.delay_s = 401, 0.0
        with pytest.raises(AuthenticationError):
            await fetch_offer(client)


def test_the_message_names_the_other_platform_and_near_misses() -> None:
    only_com = ModelRule(name="Intl/Only-Com", max_pixels=1 << 22, endpoints=("com",))
    registry = ModelRegistry.builtin().merged({only_com.name: only_com})
    offer = ModelOffer("https://api.siliconflow.cn/v1", TODAY_CN)
    assert offer.problem("Kwai-Kolors/Kolors", registry) is None
    other = offer.problem("Intl/Only-Com", registry)
    assert other is not None
    assert "api.siliconflow.com, a separate platform with its own keys (--profile com)" in other
    typo = offer.problem("Kwai-Kolors/kolors", registry)
    assert typo is not None and "did you mean Kwai-Kolors/Kolors?" in typo
    unknown = offer.problem("Nobody/Nothing", registry)
    assert unknown == (
        "model Nobody/Nothing is not offered by https://api.siliconflow.cn/v1 "
        f"(it offers: {', '.join(TODAY_CN)})"
    )


# -- flags are checked as flags ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--model", SD35, "--image-size", "1280x720"],
            "--image-size 1280x720: image_size 1280x720 is not offered by "
            f"{SD35} (one of: 1024x1024, 512x1024, 768x512, 768x1024, 1024x576, 576x1024)",
        ),
        (["--steps", "101"], "--steps 101: num_inference_steps must be 1..100, got 101"),
        (["--batch-size", "5"], "--batch-size 5: batch_size must be 1..4, got 5"),
        (
            ["--model", "Qwen/Qwen-Image", "--guidance-scale", "3"],
            "--guidance-scale 3.0: guidance_scale is not accepted by Qwen/Qwen-Image "
            "(it takes cfg)",
        ),
        (["--model", EDIT3, "--image", "gone.png"], "--image gone.png: image: no such file"),
    ],
)
async def test_a_flag_no_row_could_use_is_exit_2_with_nothing_created(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    src = prompts(tmp_path / "p.txt", 1000)
    out = tmp_path / "out"
    for command in ("run", "validate"):
        code, output = await sfbatch(command, str(src), "--out", str(out), *flags, key=None)
        assert code == 2, output
        assert message in output
        assert "Traceback" not in output
    assert not out.exists()


def test_what_rows_may_supply_or_the_server_may_take_is_not_a_flag_error() -> None:
    registry = ModelRegistry.builtin()
    # An edit model without a default image: the rows may give theirs.
    assert check_defaults(RequestDefaults(model=EDIT3), registry) == []
    # Kolors only recommends its sizes: a warning, sent anyway.
    (warning,) = check_defaults(RequestDefaults(image_size="1280x720"), registry)
    assert "not one of Kwai-Kolors/Kolors's recommended sizes" in warning
    # An edit model takes no image_size: dropped with a warning, not refused.
    (dropped,) = check_defaults(RequestDefaults(model=EDIT3, image_size="1024x1024"), registry)
    assert "image_size is not taken by" in dropped


def test_a_job_files_wrong_default_names_its_key_and_file(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text(
        '[job]\ninputs = ["p.txt"]\nout = "o"\n'
        f'[request]\nmodel = "{SD35}"\nimage_size = "1280x720"\nnum_inference_steps = 30\n'
    )
    with pytest.raises(ConfigError) as caught:
        merge(load(job), Overrides())
    assert str(caught.value).startswith(f"{job}: request.image_size 1280x720: image_size 1280x720")
    # The flag that overrides the key is the one named.
    flags = {"request.num_inference_steps": 80, "request.image_size": "512x1024"}
    with pytest.raises(ConfigError, match=r"^--steps 80: num_inference_steps must be 1\.\.50"):
        merge(load(job), Overrides(settings=flags))


# -- input images: an edit job with three local images per row --------------------------------


async def test_edit_job_sends_the_files_records_their_digests_and_refuses_bad_ones(
    tmp_path: Path,
) -> None:
    pics = {f"{n}.png": png((n * 50, 90, 10)) for n in range(4)}
    for name, data in pics.items():
        (tmp_path / "data" / "pics").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "pics" / name).write_bytes(data)
    (tmp_path / "data" / "pics" / "notes.txt").write_text("not an image")
    rows = [
        {"prompt": f"edit {k}", "image": f"pics/{k}.png", "image2": f"pics/{k + 1}.png"}
        | {"image3": f"pics/{(k + 2) % 4}.png"}
        for k in range(3)
    ]
    bad = [
        {"prompt": "gone", "image": "pics/0.png", "image2": "pics/gone.png"},
        {"prompt": "text", "image": "pics/notes.txt"},
    ]
    (tmp_path / "data" / "edits.jsonl").write_bytes(
        b"".join(orjson.dumps(r) + b"\n" for r in [*rows, *bad, {"prompt": "default image"}])
    )
    # The job's default image is relative to the job file, like every path in a job.
    (tmp_path / "jobs").mkdir()
    job = tmp_path / "jobs" / "edit.toml"
    job.write_text(
        '[job]\ninputs = ["../data/edits.jsonl"]\nout = "../out"\n'
        f'[request]\nmodel = "{EDIT3}"\nimage = "../data/pics/3.png"\n'
    )
    async with Emulator(offer=TODAY_CN) as emu:
        code, output = await sfbatch("run", str(job), "--base-url", emu.base_url, cwd=tmp_path)
        received = emu.received_inputs
        assert emu.stats()["generation_requests"] == 4
    assert code == 1, output
    records = {r["line"]: r for r in latest_records([tmp_path / "out" / "manifest.jsonl"]).values()}
    assert [records[n]["status"] for n in range(1, 7)] == ["ok"] * 3 + ["invalid"] * 2 + ["ok"]
    assert "image2: no such file pics/gone.png" in records[4]["error"]["message"]  # type: ignore[index]
    assert "pics/notes.txt is not a PNG, JPEG or WebP" in records[5]["error"]["message"]  # type: ignore[index]
    sent = sorted([(f, got["kind"], got["sha256"]) for f, got in body.items()] for body in received)
    expected = [
        [
            (f, "data", sha256(pics[row[f].removeprefix("pics/")]))
            for f in ("image", "image2", "image3")
        ]
        for row in rows
    ] + [[("image", "data", sha256(pics["3.png"]))]]
    assert sent == sorted(expected)
    for k, row in enumerate(rows):
        assert records[k + 1]["inputs"] == [
            {"field": f, "source": row[f], "sha256": sha256(pics[row[f].removeprefix("pics/")])}
            for f in ("image", "image2", "image3")
        ]
    assert records[6]["inputs"] == [
        {
            "field": "image",
            "source": str(tmp_path / "data/pics/3.png"),
            "sha256": sha256(pics["3.png"]),
        }
    ]
    assert "inputs" not in records[4]


async def test_several_keys_and_the_jobs_per_model_limits_are_checked(tmp_path: Path) -> None:
    prompts(tmp_path / "p.txt", 4)
    async with Emulator(offer=TODAY_CN, api_keys={"sk-a", "sk-b"}) as emu:
        out = tmp_path / "out"
        code, output = await sfbatch(
            "run",
            str(tmp_path / "p.txt"),
            "--out",
            str(out),
            "--base-url",
            emu.base_url,
            key="sk-a,sk-b",
        )
        assert code == 0, output
        assert emu.stats()["models_requests"] == 1
        job = tmp_path / "job.toml"
        job.write_text(
            f'[job]\ninputs = ["p.txt"]\nout = "o2"\n[limits.models."{SD35}"]\nipm = 60\n'
        )
        code, output = await sfbatch("run", str(job), "--base-url", emu.base_url, key="sk-a")
        assert emu.stats()["generation_requests"] == 4
    assert code == 2, output
    assert f"model {SD35} is not offered" in output and "[limits.models]" in output
    assert not (tmp_path / "o2").exists()


async def test_the_library_checks_the_models_like_the_command(tmp_path: Path) -> None:
    """``sfbatch.generate`` lists the models first: an unoffered default raises before
    anything is sent, a row naming one is ``invalid``; ``model_check=False`` sends."""
    import sfbatch

    async with Emulator(offer=TODAY_CN) as emu:

        def config(out: str, **options: object) -> sfbatch.RunConfig:
            return sfbatch.RunConfig(
                out_dir=tmp_path / out, api_key=emu.api_key, base_url=emu.base_url, **options
            )

        with pytest.raises(ConfigError, match=f"model {SD35} is not offered"):
            async for _ in sfbatch.generate(
                ["a cat"], config("a", defaults=RequestDefaults(model=SD35))
            ):
                pass
        assert emu.stats()["generation_requests"] == 0

        rows = ["a cat", {"prompt": "a dog", "model": SD35}]
        records = [r async for r in sfbatch.generate(rows, config("b"))]
        assert emu.stats()["generation_requests"] == 1
        by_prompt = {r["prompt"]: r for r in records}
        assert by_prompt["a cat"]["status"] == "ok"
        assert by_prompt["a dog"]["status"] == "invalid"
        assert f"{SD35} is not offered" in by_prompt["a dog"]["error"]["message"]  # type: ignore[index]

        records = [r async for r in sfbatch.generate(rows[1:], config("c", model_check=False))]
        assert emu.stats()["generation_requests"] == 2  # sent: the server says no
        assert records[0]["status"] == "failed"
        assert emu.stats()["models_requests"] == 2
