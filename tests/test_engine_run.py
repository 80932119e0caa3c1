"""The run-time building blocks wired into `run`: the DIR lock, exit 5 (403 balance, full
disk, outage), model disabled (30003), several keys and per-model limits. The real engine
against the emulator over loopback; no timed asserts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import sfbatch.downloader as downloader_module
from sfbatch.config import RunConfig
from sfbatch.emulator import Emulator, Limits
from sfbatch.loader import PromptSource
from sfbatch.manifest import ManifestRecord, iter_records, latest_records
from sfbatch.models import ModelRegistry
from sfbatch.pipeline import Pipeline, RunResult
from sfbatch.summary import print_summary

REG = ModelRegistry.builtin()
REPO = Path(__file__).resolve().parent.parent
KOLORS = "Kwai-Kolors/Kolors"
QWEN = "Qwen/Qwen-Image"


def config_for(emu: Emulator, out: Path, **overrides: Any) -> RunConfig:
    settings: dict[str, Any] = {
        "out_dir": out,
        "api_key": emu.api_key,
        "base_url": emu.base_url,
        "concurrency": 4,
        "download_concurrency": 4,
        "backoff_base_s": 0.05,
        "backoff_cap_s": 0.5,
        "download_timeout_s": 5.0,
        "request_timeout_s": 5.0,
        **overrides,
    }
    return RunConfig(**settings)


def rows(config: RunConfig, items: list[dict[str, Any]]) -> PromptSource:
    return PromptSource.from_records(items, defaults=config.defaults, registry=REG)


def prompts(n: int, **fields: Any) -> list[dict[str, Any]]:
    return [{"prompt": f"a lighthouse at dusk, study {i}", **fields} for i in range(n)]


async def run(
    config: RunConfig, items: list[dict[str, Any]], *, after: int = 0, then: Any = None
) -> RunResult:
    """Run ``items``; call ``then()`` once, after ``after`` records are written."""
    written = 0

    async def on_record(record: ManifestRecord) -> None:
        nonlocal written
        written += 1
        if written == after and then is not None:
            then()

    return await Pipeline(config, rows(config, items), registry=REG, on_record=on_record).run()


def every_line(out: Path) -> list[ManifestRecord]:
    return list(iter_records(out / "manifest.jsonl"))


def statuses(out: Path) -> Counter[str]:
    return Counter(r["status"] for r in latest_records([out / "manifest.jsonl"]).values())


# -- exit 5 ----------------------------------------------------------------------------


async def test_403_balance_mid_run_is_exit_5_and_keeps_what_was_paid(tmp_path: Path) -> None:
    async with Emulator(host="127.0.0.1", port=0) as emu:
        cfg = config_for(emu, tmp_path)
        result = await run(cfg, prompts(40), after=5, then=lambda: emu.set_account_block("balance"))
        requests = emu.stats()["generation_requests"]
    assert result.outcome == "blocked" and result.exit_code == 5
    assert "balance" in result.message.lower() or "30001" in result.message
    counts = statuses(tmp_path)
    assert counts["ok"] >= 5 and counts["failed"] == 0  # a 403 is not an item's failure
    assert requests < 40  # it stopped sending
    assert orjson.loads((tmp_path / "summary.json").read_bytes())["outcome"] == "blocked"


async def test_an_outage_longer_than_its_limit_is_exit_5_and_fails_no_item(
    tmp_path: Path,
) -> None:
    async with Emulator(host="127.0.0.1", port=0) as emu:
        emu.set_outage(True)
        cfg = config_for(emu, tmp_path, outage_timeout_s=0.5)
        result = await run(cfg, prompts(10))
    assert result.outcome == "blocked" and result.exit_code == 5
    assert "could not be reached" in result.message
    assert statuses(tmp_path)["failed"] == 0
    assert result.summary["outage"]["outages"] == 1


async def test_an_outage_that_ends_completes_the_run_with_no_item_failed(tmp_path: Path) -> None:
    async with Emulator(host="127.0.0.1", port=0) as emu:
        loop = asyncio.get_running_loop()

        def go_down() -> None:
            emu.set_outage(True)
            loop.call_later(1.5, emu.set_outage, False)

        # downloads caught by the outage retry (they are paid): enough retries to outlast it
        cfg = config_for(emu, tmp_path, max_retries=10, outage_timeout_s=600)
        result = await run(cfg, prompts(20), after=3, then=go_down)
    assert result.outcome == "done" and result.exit_code == 0, result.message
    assert statuses(tmp_path) == Counter(ok=20)


@contextlib.contextmanager
def tmpfs(mountpoint: Path, options: str) -> Iterator[Path]:
    """A tiny tmpfs mounted at ``mountpoint`` with ``options``. Skips where mount is refused."""
    mountpoint.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"{options},size=64k", "tmpfs", str(mountpoint)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def full_tmpfs(mountpoint: Path) -> Iterator[Path]:
    """A tiny tmpfs filled up: every write in it is ENOSPC."""
    with tmpfs(mountpoint, "rw") as mounted:
        with contextlib.suppress(OSError), (mountpoint / "filler").open("wb") as filler:
            while True:
                filler.write(b"\0" * 4096)
                filler.flush()
        yield mounted


@pytest.fixture
def full_dir(tmp_path: Path) -> Iterator[Path]:
    yield from full_tmpfs(tmp_path / "full")


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mounted read-only: every write in it is EROFS, root or not."""
    with tmpfs(tmp_path / "ro", "ro") as mounted:
        yield mounted


def out_dir(out: Path, downloads_in: Path | None) -> Path:
    """``out``, its ``.tmp`` a link to ``downloads_in`` (where downloads land) if given."""
    out.mkdir()
    if downloads_in is not None:
        (out / ".tmp").symlink_to(downloads_in, target_is_directory=True)
    return out


async def blocked_run(
    out: Path, *, downloads_in: Path | None = None
) -> tuple[RunResult, RunConfig, list[ManifestRecord]]:
    """Ten prompts into ``out`` that must stop with exit 5 before any image is in place;
    the run, its config and the records kept as ``generated``."""
    out = out_dir(out, downloads_in)
    async with Emulator(host="127.0.0.1", port=0) as emu:
        config = config_for(emu, out)
        result = await run(config, prompts(10))
    assert result.outcome == "blocked" and result.exit_code == 5
    kept = [r for r in every_line(out) if r["status"] == "generated"]
    assert kept and all(r.get("urls") for r in kept)  # paid for: the next run downloads them
    assert statuses(out)["failed"] == 0 and statuses(out)["ok"] == 0
    return result, config, kept


async def test_a_full_disk_is_exit_5_with_the_paid_items_kept_generated(
    tmp_path: Path, full_dir: Path
) -> None:
    result, _, _ = await blocked_run(tmp_path / "out", downloads_in=full_dir)
    assert "no space left" in result.message


async def test_images_stop_short_of_filling_the_disk_so_the_paid_items_records_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if the disk had just less free than the reserve: images stop, the records of what
    # is paid for and not written still fit (a disk filled by images had no room left for
    # them, and a torn last record was cut by the next run)
    monkeypatch.setattr(downloader_module, "_RESERVE_BYTES", shutil.disk_usage(tmp_path).free + 1)
    result, _, _ = await blocked_run(tmp_path / "out")
    assert "no space left" in result.message
    assert not list((tmp_path / "out").glob("images/*/*"))


async def test_a_directory_refusing_writes_is_exit_5_with_the_paid_items_kept_generated(
    tmp_path: Path,
    read_only_dir: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    result, config, kept = await blocked_run(tmp_path / "out", downloads_in=read_only_dir)
    assert "cannot write into" in result.message and "file system" in result.message
    with caplog.at_level(logging.INFO, logger="sfbatch"):
        print_summary(result, config)  # the closing summary says what is paid and waiting
    assert f"{len(kept)} paid and not downloaded yet" in capsys.readouterr().err


async def test_a_summary_that_cannot_be_written_is_an_error_line_after_the_work(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "summary.json").mkdir()  # in the way
    async with Emulator(host="127.0.0.1", port=0) as emu:
        with caplog.at_level(logging.ERROR, logger="sfbatch"):
            result = await run(config_for(emu, tmp_path), prompts(5))
    assert result.exit_code == 0 and statuses(tmp_path) == Counter(ok=5)
    assert "could not write" in caplog.text and "summary.json" in caplog.text
    assert "summary.json.tmp" not in os.listdir(tmp_path)


# -- 403 30003 ---------------------------------------------------------------------------


async def test_a_disabled_model_fails_its_rows_and_the_other_model_goes_on(tmp_path: Path) -> None:
    async with Emulator(host="127.0.0.1", port=0) as emu:
        emu.disable_model(QWEN)
        cfg = config_for(emu, tmp_path, concurrency=2)
        items = prompts(10, model=QWEN) + [
            {"prompt": f"a harbour at dawn, study {i}", "model": KOLORS} for i in range(10)
        ]
        result = await run(cfg, items)
        requests = emu.stats()["generation_requests"]
    assert result.exit_code == 1
    final = latest_records([tmp_path / "manifest.jsonl"]).values()
    by_model = {m: Counter(r["status"] for r in final if r["model"] == m) for m in (QWEN, KOLORS)}
    assert by_model == {QWEN: Counter(failed=10), KOLORS: Counter(ok=10)}
    assert {(r["error"] or {}).get("code") for r in final if r["model"] == QWEN} == {30003}
    assert requests < 20  # the disabled model's later rows were not sent
    assert any(QWEN in tally.example for tally in result.errors)


# -- keys and limits ---------------------------------------------------------------------

KEYS = ("sk-alpha-0001", "sk-bravo-0002", "sk-charlie-0003")


async def test_keys_out_for_different_reasons_say_which_and_end_in_one_exit_code(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with Emulator(
        host="127.0.0.1", port=0, api_keys=frozenset(KEYS), key_blocks={KEYS[1]: "balance"}
    ) as emu:
        for key in (KEYS[0], KEYS[2]):
            emu.set_key_limits(key, Limits(ipd=2))
        cfg = config_for(emu, tmp_path, api_key=",".join(KEYS))
        with caplog.at_level(logging.WARNING, logger="sfbatch"):
            result = await run(cfg, prompts(20))
    # tomorrow keys 0 and 2 go on: exit 4 whatever order the refusals came in
    assert result.outcome == "quota" and result.exit_code == 4, result.message
    assert "key #1 has reached its balance" in result.message
    assert "key #0 has reached its daily quota" in result.message
    assert "key #2 has reached its daily quota" in result.message
    assert caplog.text.count("key #1 set aside") == 1


async def test_three_keys_one_out_of_quota_the_others_finish(tmp_path: Path) -> None:
    async with Emulator(host="127.0.0.1", port=0, api_keys=frozenset(KEYS)) as emu:
        emu.set_key_limits(KEYS[1], Limits(ipd=2))
        cfg = config_for(emu, tmp_path, api_key=",".join(KEYS))
        result = await run(cfg, prompts(30))
    assert result.outcome == "done" and result.exit_code == 0, result.message
    records = every_line(tmp_path)
    assert Counter(r["status"] for r in records) == Counter(ok=30)
    used = Counter(r.get("key_index") for r in records)
    assert set(used) <= {0, 1, 2} and used[0] and used[2] and used[1] <= 2
    keys = {k["key_index"]: k for k in result.summary["keys"]}
    assert keys[1]["set_aside"] == "daily_quota"
    text = (tmp_path / "manifest.jsonl").read_text() + (tmp_path / "summary.json").read_text()
    assert not any(key in text or key[-8:] in text for key in KEYS)


async def test_one_model_out_of_daily_quota_leaves_its_rows_while_the_others_go_on(
    tmp_path: Path,
) -> None:
    """A daily quota is per model: Qwen's running out sets its rows aside for tomorrow
    (not recorded, not sent again), Kolors' rows all finish, and the run says exit 4."""
    async with Emulator(host="127.0.0.1", port=0) as emu:
        emu.set_model_limits(QWEN, Limits(ipd=2))
        cfg = config_for(emu, tmp_path, concurrency=2)
        items = [
            {"prompt": f"a harbour at dawn, study {i}", "model": (QWEN, KOLORS)[i % 2]}
            for i in range(24)
        ]
        result = await run(cfg, items)
        decisions = Counter(what for *_, what in emu.admissions())
    assert result.outcome == "quota" and result.exit_code == 4, result.message
    assert QWEN in result.message
    final = latest_records([tmp_path / "manifest.jsonl"]).values()
    by_model = {m: Counter(r["status"] for r in final if r["model"] == m) for m in (QWEN, KOLORS)}
    assert by_model == {QWEN: Counter(ok=2), KOLORS: Counter(ok=12)}
    assert decisions["IPD"] <= 2  # Qwen's later rows were not sent


async def test_two_models_each_under_its_own_ipm_both_progress_without_429s(
    tmp_path: Path,
) -> None:
    async with Emulator(host="127.0.0.1", port=0) as emu:
        for model in (KOLORS, QWEN):
            emu.set_model_limits(model, Limits(ipm=120))
        cfg = config_for(emu, tmp_path, ipm=120)
        items = prompts(4, model=QWEN) + [
            {"prompt": f"a harbour at dawn, study {i}", "model": KOLORS} for i in range(4)
        ]
        result = await run(cfg, items)
        refused = emu.stats()["status_counts"].get("429", 0)
    assert result.exit_code == 0, result.message
    final = latest_records([tmp_path / "manifest.jsonl"]).values()
    assert Counter(r["model"] for r in final if r["status"] == "ok") == {QWEN: 4, KOLORS: 4}
    assert result.summary["run"]["rate_limited_429"] == 0 and not refused
    assert {k["model"] for k in result.summary["keys"]} == {QWEN, KOLORS}


# -- one run per DIR ---------------------------------------------------------------------


def _env(key: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SILICONFLOW_")}
    return {**env, "SILICONFLOW_API_KEY": key, "PYTHONPATH": str(REPO)}


async def test_a_second_run_on_a_busy_dir_exits_2_naming_the_first(tmp_path: Path) -> None:
    out = tmp_path / "out"
    async with Emulator(host="127.0.0.1", port=0) as emu:
        command = [sys.executable, "-m", "sfbatch", "run", "-", "--out", str(out)]
        command += ["--base-url", emu.base_url, "--no-progress"]
        # The first run reads its prompts from stdin, which stays open: it holds the DIR.
        first = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_env(emu.api_key),
            cwd=REPO,
        )
        assert first.stdin is not None
        lock = out / ".sfbatch.lock"
        async with asyncio.timeout(60):
            while str(first.pid).encode() not in (lock.read_bytes() if lock.exists() else b""):
                assert first.returncode is None
                await asyncio.sleep(0.05)
        second = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_env(emu.api_key),
            cwd=REPO,
        )
        _, err = await asyncio.wait_for(second.communicate(), 60)
        assert second.returncode == 2
        assert f"pid {first.pid}" in err.decode() and "in use" in err.decode()
        first.stdin.write(b"a lighthouse at dusk\n")
        first.stdin.close()
        await asyncio.wait_for(first.communicate(), 60)
    assert first.returncode == 0  # the first run untouched
    assert statuses(out) == Counter(ok=1)


# -- settings: concurrency, several keys, per-model limits -------------------------------


def test_concurrency_is_auto_or_n_on_the_command_line_and_in_a_job(tmp_path: Path) -> None:
    from sfbatch.cli import build_parser, job_from_args

    def config(*flags: str, job: str = "") -> RunConfig:
        (tmp_path / "p.txt").write_text("a lighthouse\n")
        source = tmp_path / "p.txt"
        if job:
            source = tmp_path / "job.toml"
            source.write_text(f'[job]\ninputs = ["p.txt"]\nout = "out"\n{job}')
        args = build_parser().parse_args(["run", str(source), "--out", "o", *flags])
        return job_from_args(args).config

    assert config().workers.concurrency is None  # auto by default
    assert config("--concurrency", "auto").workers.generation_workers == 256
    assert config("--concurrency", "8").workers.concurrency == 8
    assert config("--max-concurrency", "32").workers.generation_workers == 32
    assert config(job="[limits]\nconcurrency = 6\n").workers.concurrency == 6
    assert config(job='[limits]\nconcurrency = "auto"\n').workers.concurrency is None
    with pytest.raises(SystemExit):
        config("--concurrency", "lots")


def test_job_file_per_model_limits_and_several_key_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sfbatch import jobfile

    (tmp_path / "p.txt").write_text("a lighthouse\n")
    job = tmp_path / "job.toml"
    job.write_text(
        '[job]\ninputs = ["p.txt"]\nout = "out"\n[api]\nkey_envs = ["KEY_A", "KEY_B"]\n'
        f'[limits]\nipm = 10\n[limits.models."{QWEN}"]\nipm = 2\nipd = 50\n'
    )
    monkeypatch.setenv("KEY_A", "sk-a")
    monkeypatch.setenv("KEY_B", "sk-b")
    merged = jobfile.merge(jobfile.load(job), jobfile.Overrides())
    cfg = merged.config
    assert cfg.api_keys == ("sk-a", "sk-b")
    assert (cfg.limits.for_model(QWEN).ipm, cfg.limits.for_model(QWEN).ipd) == (2, 50)
    assert cfg.limits.for_model(KOLORS).ipm == 10
    job.write_text(f'[limits.models."{QWEN}"]\nrpx = 2\n')
    with pytest.raises(Exception, match="rpx"):
        jobfile.load(job)


def test_siliconflow_api_keys_gives_several_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    from sfbatch.config import Environment

    monkeypatch.delenv("SILICONFLOW_API_KEY", raising=False)
    monkeypatch.setenv("SILICONFLOW_API_KEYS", "sk-one, sk-two,sk-three")
    env = Environment.read()
    cfg = RunConfig(out_dir="o", api_key=env.api_key)
    assert cfg.api_keys == ("sk-one", "sk-two", "sk-three")


async def test_a_stop_ends_the_waits_for_the_limiter_at_once(tmp_path: Path) -> None:
    """Ctrl-C at 60 requests a minute with 8 requests waiting their turn: what is in flight
    lands, and no waiting request is given a lease afterwards (it would not be sent, and
    the run would wait for the limiter's pace before it could end)."""
    async with Emulator(host="127.0.0.1", port=0, latency_s=0.2) as emu:
        cfg = config_for(emu, tmp_path, concurrency=8, rpm=60, grace_s=600)
        pipeline: Pipeline

        async def on_record(record: ManifestRecord) -> None:
            if not pipeline.stopping:
                pipeline.interrupt()
                leases_at_stop.append(sum(k["acquires"] for k in pipeline.statistics()["keys"]))

        leases_at_stop: list[int] = []
        pipeline = Pipeline(cfg, rows(cfg, prompts(40)), registry=REG, on_record=on_record)
        result = await pipeline.run()
        sent = emu.stats()["generation_requests"]
    assert result.outcome == "interrupted"
    leases = sum(key["acquires"] for key in result.summary["keys"])
    assert leases == leases_at_stop[0] == sent  # every lease was sent; none given after
    assert statuses(tmp_path)["ok"] == sent < 40
