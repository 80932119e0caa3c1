"""The real engine against the emulator over loopback: the issue's "done when" list."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import orjson
import pytest

from sfbatch.config import RequestDefaults, RunConfig
from sfbatch.emulator import Emulator, FaultConfig
from sfbatch.errors import ConfigError
from sfbatch.loader import PromptSource, image_shard_dir
from sfbatch.manifest import latest_records
from sfbatch.models import ModelRegistry
from sfbatch.pipeline import Pipeline, RunResult

REG = ModelRegistry.builtin()


def write_prompts(path: Path, n: int) -> Path:
    path.write_text("".join(f"prompt number {i}, a lighthouse at dusk\n" for i in range(n)))
    return path


def config_for(emulator: Emulator, out: Path, **overrides: Any) -> RunConfig:
    settings: dict[str, Any] = {
        "out_dir": out,
        "api_key": emulator.api_key,
        "base_url": emulator.base_url,
        "concurrency": 8,
        "download_concurrency": 8,
        "backoff_base_s": 0.01,
        "backoff_cap_s": 0.05,
        "download_timeout_s": 5.0,
        "request_timeout_s": 5.0,
        **overrides,
    }
    return RunConfig(**settings)


async def run(config: RunConfig, prompts: Path) -> RunResult:
    source = PromptSource(
        prompts,
        defaults=config.defaults,
        registry=REG,
        base_seed=config.base_seed,
        variations=config.variations,
        limit=config.limit,
    )
    return await Pipeline(config, source, registry=REG).run()


def final(out: Path) -> dict[str, dict[str, Any]]:
    return latest_records([out / "manifest.jsonl"])


def at_line(records: dict[str, dict[str, Any]], line: int) -> dict[str, Any]:
    """The record of the row on ``line`` (ids come from content, not line numbers)."""
    (record,) = (r for r in records.values() if r["line"] == line)
    return record


def assert_images_match_server(emulator: Emulator, out: Path, record: dict[str, Any]) -> None:
    for index, image in enumerate(record["images"]):
        data = (out / image["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == image["sha256"]
        assert len(data) == image["bytes"]
        expected = emulator.expected_png(
            seed=record["seed"], prompt=record["prompt"], index=index, width=64, height=64
        )
        assert data == expected


async def requests_reach(emulator: Emulator, count: int) -> None:
    """Wait until the server has seen ``count`` generation requests."""
    async with asyncio.timeout(10):
        while emulator.stats()["generation_requests"] < count:  # noqa: ASYNC110  (polling the server)
            await asyncio.sleep(0.01)


def no_leftovers(out: Path) -> None:
    tmp = out / ".tmp"
    assert not tmp.exists() or not any(tmp.iterdir())


async def test_a_few_hundred_prompts_all_ok_with_matching_bytes(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 300)
    async with Emulator(latency_s=0.02, latency_jitter_s=0.01) as emu:
        cfg = config_for(emu, tmp_path / "out", defaults=RequestDefaults(batch_size=2))
        result = await run(cfg, prompts)
        records = final(tmp_path / "out")
        assert result.exit_code == 0, result.summary
        assert len(records) == 300
        for record in records.values():
            assert record["status"] == "ok"
            assert record["seed"] == record["requested_seed"]
            assert record["timings"]["inference"] > 0
            assert len(record["images"]) == 2
            assert record["images"][0]["path"].startswith(
                f"images/{image_shard_dir(record['id'])}/"
            )
            assert_images_match_server(emu, tmp_path / "out", record)
        assert emu.stats()["generation_requests"] == 300
    summary = orjson.loads((tmp_path / "out" / "summary.json").read_bytes())
    assert summary["manifest"] == {"ok": 300}
    assert summary["run"]["images"] == 600
    no_leftovers(tmp_path / "out")


async def test_rerun_skips_what_is_done_and_pays_nothing_twice(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 40)
    async with Emulator() as emu:
        cfg = config_for(emu, tmp_path / "out")
        assert (await run(cfg, prompts)).exit_code == 0
        again = await run(cfg, prompts)
        assert again.exit_code == 0
        assert again.summary["run"]["skipped"] == 40
        assert emu.stats()["generation_requests"] == 40


@pytest.mark.parametrize(
    "fault",
    ["p_503", "p_504", "p_500", "p_reset", "p_truncated_image", "p_expired_url", "p_not_image"],
)
async def test_each_fault_class_is_survived(tmp_path: Path, fault: str) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 60)
    faults = FaultConfig(seed=7, **{fault: 0.3})
    async with Emulator(faults=faults) as emu:
        cfg = config_for(emu, tmp_path / "out", max_retries=12)
        result = await run(cfg, prompts)
        records = final(tmp_path / "out")
        assert result.exit_code == 0, result.summary
        assert {r["status"] for r in records.values()} == {"ok"}
        for record in records.values():
            assert_images_match_server(emu, tmp_path / "out", record)
    no_leftovers(tmp_path / "out")


async def test_stalled_download_hits_its_deadline_and_is_retried(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 10)
    async with Emulator(faults=FaultConfig(seed=3, p_stalled_image=0.3, stall_s=30)) as emu:
        cfg = config_for(emu, tmp_path / "out", download_timeout_s=0.5)
        result = await run(cfg, prompts)
    assert result.exit_code == 0, result.summary
    assert {r["status"] for r in final(tmp_path / "out").values()} == {"ok"}
    no_leftovers(tmp_path / "out")


async def test_server_400_fails_the_item_without_retry_and_the_run_goes_on(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(
        b'{"prompt": "fine"}\n{"prompt": "unknown to the server", "model": "acme/new-model"}\n'
    )
    async with Emulator() as emu:
        result = await run(config_for(emu, tmp_path / "out"), prompts)
        assert emu.stats()["generation_requests"] == 2
    records = final(tmp_path / "out")
    assert result.exit_code == 1
    bad = at_line(records, 2)
    assert bad["status"] == "failed" and bad["attempts"] == 1
    assert bad["error"]["status"] == 400 and bad["error"]["code"] == 20012
    assert at_line(records, 1)["status"] == "ok"


async def test_bad_rows_are_reported_with_file_and_line(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(
        b'{"prompt": "ok one"}\nnot json\n{"prompt": "x", "batch_size": 9}\n{"seed": 1}\n'
        b'{"prompt": "ok two"}\n'
    )
    async with Emulator() as emu:
        result = await run(config_for(emu, tmp_path / "out"), prompts)
        assert emu.stats()["generation_requests"] == 2
    records = final(tmp_path / "out")
    assert result.exit_code == 1
    assert at_line(records, 2)["status"] == "invalid"
    assert at_line(records, 2)["error"]["message"].startswith(f"{prompts}:2:")
    assert "batch_size must be 1..4, got 9" in at_line(records, 3)["error"]["message"]
    assert at_line(records, 4)["status"] == "invalid"
    assert at_line(records, 5)["status"] == "ok"


async def test_stated_limit_is_used_without_429s(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 40)
    async with Emulator(rpm=600) as emu:
        cfg = config_for(emu, tmp_path / "out", rpm=600)
        result = await run(cfg, prompts)
        stats = emu.stats()
    assert result.exit_code == 0
    assert stats["status_counts"].get("429", 0) == 0
    assert result.summary["run"]["rate_limited_429"] == 0


async def test_overestimated_limit_converges_instead_of_hammering(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 40)
    async with Emulator(rpm=600, retry_after_s=0.2) as emu:
        cfg = config_for(emu, tmp_path / "out", rpm=6000)
        result = await run(cfg, prompts)
        stats = emu.stats()
    assert result.exit_code == 0
    refused = stats["status_counts"].get("429", 0)
    assert refused < 40, stats  # without the shared slow-down it would be several per item


async def test_expired_urls_are_generated_again_with_the_same_seed(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 20)
    async with Emulator(faults=FaultConfig(seed=1, p_expired_url=0.5)) as emu:
        result = await run(config_for(emu, tmp_path / "out", max_retries=20), prompts)
        records = final(tmp_path / "out")
        assert result.exit_code == 0
        assert result.summary["run"]["regenerated_expired"] > 0
        for record in records.values():
            assert record["seed"] == record["requested_seed"]
            assert_images_match_server(emu, tmp_path / "out", record)


async def test_bad_key_stops_the_job_with_exit_3_and_no_key_anywhere(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 50)
    secret = "sk-this-is-the-secret-key-123"
    async with Emulator() as emu:
        cfg = config_for(emu, tmp_path / "out", api_key=secret)
        result = await run(cfg, prompts)
        assert emu.stats()["generation_requests"] <= cfg.concurrency
    assert result.exit_code == 3
    assert "401" in result.message
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="replace")
    assert secret not in result.message and secret not in orjson.dumps(result.summary).decode()
    assert secret not in repr(cfg)


async def test_wrong_base_url_path_stops_with_exit_3(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 5)
    async with Emulator() as emu:
        cfg = config_for(emu, tmp_path / "out", base_url=emu.root_url + "/wrong")
        result = await run(cfg, prompts)
    assert result.exit_code == 3
    assert "base URL" in result.message


async def test_interrupt_keeps_paid_generations_and_resume_downloads_them(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 12)
    out = tmp_path / "out"
    stall = FaultConfig(seed=2, p_stalled_image=1.0, stall_s=30)
    async with Emulator(faults=stall) as emu:
        cfg = config_for(emu, out, grace_s=0.3, download_timeout_s=60, concurrency=4)
        source = PromptSource(prompts, registry=REG)
        pipeline = Pipeline(cfg, source, registry=REG)
        task = asyncio.create_task(pipeline.run())
        await requests_reach(emu, 4)
        pipeline.interrupt()
        result = await task
        assert result.exit_code == 130
        paid = emu.stats()["generation_requests"]
        saved = final(out)
        assert {r["status"] for r in saved.values()} == {"generated"}
        assert len(saved) == paid  # every paid generation is kept, with its URLs
        assert all(r["urls"] and r["generated_at"] for r in saved.values())

        emu.set_faults(FaultConfig())
        resumed = await run(cfg, prompts)
        assert resumed.exit_code == 0
        # The saved URLs were downloaded, not paid for again.
        assert emu.stats()["generation_requests"] == 12
        for record in final(out).values():
            assert_images_match_server(emu, out, record)
    no_leftovers(out)


async def test_saved_generations_past_the_url_lifetime_are_made_again(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 3)
    out = tmp_path / "out"
    async with Emulator(faults=FaultConfig(p_stalled_image=1.0, stall_s=30)) as emu:
        cfg = config_for(emu, out, grace_s=0.2, download_timeout_s=60)
        pipeline = Pipeline(cfg, PromptSource(prompts, registry=REG), registry=REG)
        task = asyncio.create_task(pipeline.run())
        await requests_reach(emu, 3)
        pipeline.interrupt()
        assert (await task).exit_code == 130
        emu.set_faults(FaultConfig())
        emu.advance_clock(3600)  # the URLs have expired on the server
        later = config_for(emu, out, url_ttl_s=60)  # and by our clock too
        assert (await run(later, prompts)).exit_code == 0
        assert emu.stats()["generation_requests"] == 6
        for record in final(out).values():
            assert record["status"] == "ok" and record["seed"] == record["requested_seed"]


async def test_a_row_batch_that_can_never_fit_the_ipm_limit_is_invalid(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b'{"prompt": "small"}\n{"prompt": "big", "batch_size": 4}\n')
    async with Emulator() as emu:
        result = await run(config_for(emu, tmp_path / "out", ipm=3), prompts)
    records = final(tmp_path / "out")
    assert result.exit_code == 1
    assert at_line(records, 1)["status"] == "ok"
    big = at_line(records, 2)
    assert big["status"] == "invalid" and big["error"]["message"].startswith(f"{prompts}:2:")


async def test_a_file_breaking_while_the_queue_is_full_ends_the_run_cleanly(
    tmp_path: Path,
) -> None:
    import gzip

    lines = "".join(f"prompt {i} {hashlib.sha256(bytes(i)).hexdigest()}\n" for i in range(3000))
    prompts = tmp_path / "p.txt.gz"
    prompts.write_bytes(gzip.compress(lines.encode())[:3000])  # cut short: a read error early
    async with Emulator(latency_s=0.2) as emu:
        cfg = config_for(emu, tmp_path / "out", queue_size=2, concurrency=2)
        async with asyncio.timeout(30):
            result = await run(cfg, prompts)
    assert result.outcome == "input_error" and result.exit_code == 2
    assert "p.txt.gz" in result.message
    no_leftovers(tmp_path / "out")


async def test_grace_expiry_with_a_full_queue_and_slow_requests_still_ends(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 50)
    async with Emulator(latency_s=5.0) as emu:
        cfg = config_for(emu, tmp_path / "out", queue_size=2, concurrency=2, grace_s=0.3)
        pipeline = Pipeline(cfg, PromptSource(prompts, registry=REG), registry=REG)
        task = asyncio.create_task(pipeline.run())
        await requests_reach(emu, 2)
        pipeline.interrupt()
        async with asyncio.timeout(10):
            result = await task
    assert result.exit_code == 130


async def test_failed_items_are_skipped_on_rerun_unless_retry_failed(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 6)
    out = tmp_path / "out"
    async with Emulator(faults=FaultConfig(seed=5, p_503=1.0)) as emu:
        first = await run(config_for(emu, out, max_retries=0), prompts)
        assert first.exit_code == 1
        assert {r["status"] for r in final(out).values()} == {"failed"}
        emu.set_faults(FaultConfig())
        made = emu.stats()["generation_requests"]
        again = await run(config_for(emu, out), prompts)
        assert again.summary["run"]["skipped"] == 6
        assert emu.stats()["generation_requests"] == made  # failed items are not retried...
        retried = await run(config_for(emu, out, retry_failed=True), prompts)
        assert retried.exit_code == 0  # ...unless asked
    assert {r["status"] for r in final(out).values()} == {"ok"}


async def test_dedupe_makes_identical_requests_once(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(
        b'{"prompt": "a fox"}\n{"prompt": "a cat"}\n{"prompt": "a fox"}\n'
        b'{"prompt": "a fox", "image_size": "768x512"}\n'
    )
    async with Emulator() as emu:
        cfg = config_for(emu, tmp_path / "out", dedupe=True)
        source = PromptSource(prompts, registry=REG, dedupe=True)
        result = await Pipeline(cfg, source, registry=REG).run()
        assert emu.stats()["generation_requests"] == 3
    records = final(tmp_path / "out")
    assert result.exit_code == 0
    assert at_line(records, 3)["status"] == "duplicate"
    assert at_line(records, 3)["duplicate_of"] == at_line(records, 1)["id"]
    assert at_line(records, 4)["status"] == "ok"  # other parameters: not a duplicate


async def test_file_naming_template_names_the_images(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.txt", 2)
    async with Emulator() as emu:
        cfg = config_for(
            emu,
            tmp_path / "out",
            name_template="img-{id}-{index}",
            defaults=RequestDefaults(batch_size=2),
        )
        assert (await run(cfg, prompts)).exit_code == 0
    first = at_line(final(tmp_path / "out"), 1)
    shard = image_shard_dir(first["id"])
    assert [i["path"] for i in first["images"]] == [
        f"images/{shard}/img-{first['id']}-0.png",
        f"images/{shard}/img-{first['id']}-1.png",
    ]
    for bad in ("{id}_{index}_{seed}", "{id}/{index}", "{id}_{index}_{"):
        with pytest.raises(ConfigError):
            RunConfig(out_dir=tmp_path, api_key="k", name_template=bad)
