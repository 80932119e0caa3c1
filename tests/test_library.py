"""``sfbatch.generate`` and the one-request client, used as a library would be."""

from __future__ import annotations

from pathlib import Path

import pytest

import sfbatch
from sfbatch.emulator import Emulator
from sfbatch.errors import AuthenticationError, BadRequestError, QuotaReachedError


async def test_generate_yields_every_record_and_resumes(tmp_path: Path) -> None:
    async with Emulator() as emu:
        config = sfbatch.RunConfig(out_dir=tmp_path, api_key=emu.api_key, base_url=emu.base_url)
        rows = ["a cat", {"prompt": "a dog", "seed": 7, "batch_size": 2}, {"prompt": ""}]
        records = [r async for r in sfbatch.generate(rows, config)]
        by_line = {r["line"]: r for r in records}  # the item's position stands in for its line
        assert by_line[1]["status"] == "ok"
        assert by_line[2]["seed"] == 7 and len(by_line[2]["images"]) == 2
        assert by_line[3]["status"] == "invalid"
        assert (tmp_path / by_line[2]["images"][1]["path"]).is_file()
        again = [r async for r in sfbatch.generate(rows, config)]
        assert again == []  # all done or recorded invalid already
        assert emu.stats()["generation_requests"] == 2


async def test_generate_raises_the_fatal_error(tmp_path: Path) -> None:
    async with Emulator() as emu:
        config = sfbatch.RunConfig(out_dir=tmp_path, api_key="sk-wrong", base_url=emu.base_url)
        with pytest.raises(AuthenticationError, match="401"):
            async for _ in sfbatch.generate(["a cat"] * 5, config):
                pass


async def test_generate_raises_when_the_daily_quota_ends_it(tmp_path: Path) -> None:
    async with Emulator() as emu:
        config = sfbatch.RunConfig(
            out_dir=tmp_path, api_key=emu.api_key, base_url=emu.base_url, ipd=3, concurrency=1
        )
        seen = []
        with pytest.raises(QuotaReachedError):
            async for record in sfbatch.generate([f"prompt {i}" for i in range(10)], config):
                seen.append(record)
        assert len(seen) == 3


async def test_breaking_out_early_stops_the_pipeline(tmp_path: Path) -> None:
    async with Emulator(latency_s=0.01) as emu:
        config = sfbatch.RunConfig(out_dir=tmp_path, api_key=emu.api_key, base_url=emu.base_url)
        agen = sfbatch.generate([f"p {i}" for i in range(200)], config)
        async for _ in agen:
            break
        await agen.aclose()
        made = emu.stats()["generation_requests"]
    assert made < 200


async def test_client_single_request_and_error_mapping() -> None:
    async with Emulator() as emu:
        async with sfbatch.SiliconFlowClient(base_url=emu.base_url, api_key=emu.api_key) as client:
            generation = await client.generate({"prompt": "a cat", "seed": 42, "batch_size": 3})
            assert generation.seed == 42 and len(generation.urls) == 3
            assert generation.trace_id
            assert "stabilityai/stable-diffusion-3-5-large" in await client.list_models()
            with pytest.raises(BadRequestError) as info:
                await client.generate({"prompt": "a cat", "batch_size": 9})
            assert info.value.status == 400 and info.value.code == 20012
        async with sfbatch.SiliconFlowClient(base_url=emu.base_url, api_key="sk-nope") as client:
            with pytest.raises(AuthenticationError) as auth:
                await client.generate({"prompt": "a cat"})
            assert "sk-nope" not in str(auth.value)
