"""``sfbatch.generate`` and the one-request client, used as a library would be."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import sfbatch
from sfbatch import errors
from sfbatch.emulator import Emulator
from sfbatch.errors import AuthenticationError, BadRequestError, QuotaReachedError
from sfbatch.loader import PromptSource, Row


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
            assert "Kwai-Kolors/Kolors" in await client.list_models()
            with pytest.raises(BadRequestError) as info:
                await client.generate({"prompt": "a cat", "batch_size": 9})
            assert info.value.status == 400 and info.value.code == 20012
        async with sfbatch.SiliconFlowClient(base_url=emu.base_url, api_key="sk-nope") as client:
            with pytest.raises(AuthenticationError) as auth:
                await client.generate({"prompt": "a cat"})
            assert "sk-nope" not in str(auth.value)


def test_the_public_surface_is_pinned() -> None:
    assert sorted(sfbatch.__all__) == [
        "AccountBlockedError",
        "ApiError",
        "AuthenticationError",
        "BadRequestError",
        "ConfigError",
        "DailyQuotaError",
        "DiskFullError",
        "DownloadError",
        "Emulator",
        "EndpointNotFoundError",
        "ExpiredUrlError",
        "FatalApiError",
        "Generation",
        "ImageEntry",
        "ImageTooLargeError",
        "InputFileError",
        "MalformedResponseError",
        "ManifestRecord",
        "ModelDisabledError",
        "NotAnImageError",
        "OutDirInUseError",
        "OutageError",
        "OutputWriteError",
        "QuotaReachedError",
        "RateLimitError",
        "RecordError",
        "RequestDefaults",
        "RequestTimeoutError",
        "RunBlockedError",
        "RunConfig",
        "RunResult",
        "ServerError",
        "SfbatchError",
        "SiliconFlowClient",
        "Status",
        "TransportError",
        "__version__",
        "generate",
    ]
    for name in sfbatch.__all__:
        assert hasattr(sfbatch, name), name
    # every exception of the tree is public; the stages are not
    exceptions = {
        n for n in errors.__all__ if isinstance(getattr(errors, n), type) and n.endswith("Error")
    }
    assert exceptions <= set(sfbatch.__all__)
    for internal in ("Pipeline", "Row", "ModelRule", "PromptSource", "ModelRegistry"):
        assert internal not in sfbatch.__all__


async def test_generate_takes_an_async_iterable_and_hands_back_the_result(
    tmp_path: Path,
) -> None:
    async def rows() -> AsyncIterator[str | dict[str, Any]]:
        for i in range(300):  # more than the bridge holds at once
            await asyncio.sleep(0)
            yield f"prompt {i}" if i % 2 else {"prompt": f"prompt {i}", "seed": i}
        yield {"prompt": "too big", "batch_size": 9}

    results: list[sfbatch.RunResult] = []
    async with Emulator() as emu:
        config = sfbatch.RunConfig(out_dir=tmp_path, api_key=emu.api_key, base_url=emu.base_url)
        records = [r async for r in sfbatch.generate(rows(), config, on_result=results.append)]
    by_line = {r["line"]: r for r in records}
    assert len(by_line) == 301 == len({r["id"] for r in records})
    assert by_line[1]["seed"] == 0 and by_line[1]["status"] == "ok"
    assert by_line[301]["status"] == "invalid"
    (result,) = results
    assert result.outcome == "done" and result.exit_code == 1
    assert result.summary["run"]["ok"] == 300
    assert [(t.reason.key, t.count) for t in result.errors] == [("invalid: invalid", 1)]


async def test_generate_takes_an_async_iterable_of_rows(tmp_path: Path) -> None:
    source = PromptSource.from_records(["a cat", "a dog"])

    async def rows() -> AsyncIterator[Row]:
        for row in source:
            yield row

    async with Emulator() as emu:
        config = sfbatch.RunConfig(out_dir=tmp_path, api_key=emu.api_key, base_url=emu.base_url)
        ids = sorted([r["id"] async for r in sfbatch.generate(rows(), config)])
    assert ids == sorted(row.id for row in source) and len(set(ids)) == 2


async def test_an_async_iterable_that_fails_stops_the_run_with_its_error(tmp_path: Path) -> None:
    async def rows() -> AsyncIterator[str]:
        for i in range(5):
            yield f"prompt {i}"
        await asyncio.sleep(0.3)  # the five are in flight
        raise RuntimeError("the source broke")

    async with Emulator(latency_s=0.5) as emu:
        config = sfbatch.RunConfig(out_dir=tmp_path, api_key=emu.api_key, base_url=emu.base_url)
        results: list[sfbatch.RunResult] = []
        seen = []
        with pytest.raises(RuntimeError, match="the source broke"):  # its own, not a group
            async for record in sfbatch.generate(rows(), config, on_result=results.append):
                seen.append(record)
        sent = emu.stats()["generation_requests"]
    # what was in flight landed and was recorded: nothing paid for is lost (rows not yet
    # sent are left for the next run)
    assert sent >= 1 and [r["status"] for r in seen] == ["ok"] * sent
    assert results[0].outcome == "input_error"


async def test_a_sync_iterable_that_fails_midway_lands_what_is_in_flight(tmp_path: Path) -> None:
    def rows() -> Iterator[str]:
        yield "a cat"
        yield "a dog"
        raise ValueError("the caller's rows broke")

    async with Emulator(latency_s=0.2) as emu:
        config = sfbatch.RunConfig(out_dir=tmp_path, api_key=emu.api_key, base_url=emu.base_url)
        seen = []
        with pytest.raises(ValueError, match="the caller's rows broke"):
            async for record in sfbatch.generate(rows(), config):
                seen.append(record)
        sent = emu.stats()["generation_requests"]
    assert len(seen) == sent and all(r["status"] == "ok" for r in seen)


async def test_none_first_is_an_invalid_row_not_an_empty_input(tmp_path: Path) -> None:
    async def arows() -> AsyncIterator[Any]:
        for row in (None, "a dog"):
            yield row

    async with Emulator() as emu:
        for n, rows in enumerate(([None, "a cat"], arows())):
            config = sfbatch.RunConfig(
                out_dir=tmp_path / str(n), api_key=emu.api_key, base_url=emu.base_url
            )
            records = [r async for r in sfbatch.generate(rows, config)]
            assert sorted(r["status"] for r in records) == ["invalid", "ok"]


@pytest.mark.parametrize("rows", ["a cat", b"a cat", {"prompt": "a cat"}])
async def test_one_prompt_or_row_for_rows_is_a_type_error(tmp_path: Path, rows: Any) -> None:
    config = sfbatch.RunConfig(out_dir=tmp_path, api_key="sk-x", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(TypeError, match=r"pass \[rows\]"):
        async for _ in sfbatch.generate(rows, config):
            pass
    assert not tmp_path.joinpath("manifest.jsonl").exists()


async def test_request_defaults_no_row_can_cure_are_refused_before_anything(
    tmp_path: Path,
) -> None:
    config = sfbatch.RunConfig(
        out_dir=tmp_path / "out",
        api_key="sk-x",
        base_url="http://127.0.0.1:9/v1",  # nothing listens: nothing may be sent
        defaults=sfbatch.RequestDefaults(batch_size=9),
    )
    with pytest.raises(errors.ConfigError, match=r"RequestDefaults\.batch_size 9"):
        async for _ in sfbatch.generate(["a cat"], config):
            pass
    assert not (tmp_path / "out").exists()


async def test_breaking_out_of_an_async_source_early_stops_its_worker(tmp_path: Path) -> None:
    async def rows() -> AsyncIterator[str]:
        for i in range(10_000):
            yield f"p {i}"

    async with Emulator(latency_s=0.01) as emu:
        config = sfbatch.RunConfig(out_dir=tmp_path, api_key=emu.api_key, base_url=emu.base_url)
        agen = sfbatch.generate(rows(), config)
        async for _ in agen:
            break
        await agen.aclose()
        assert emu.stats()["generation_requests"] < 100
