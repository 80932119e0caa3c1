"""The ``sfbatch`` command run as a user would: a subprocess against the emulator."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import REPO, run_sfbatch, sfbatch_env, start_sfbatch

from sfbatch.emulator import Emulator
from sfbatch.manifest import iter_records, latest_records, manifest_paths


async def sfbatch(
    *args: str, env: dict[str, str] | None = None, deadline_s: float = 90
) -> tuple[int, str]:
    code, out, err = await run_sfbatch(*args, env=env, deadline_s=deadline_s)
    return code, out + err


def prompts(path: Path, n: int) -> Path:
    path.write_text("".join(f"a lighthouse, study {i}\n" for i in range(n)))
    return path


def lines_in(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


async def wait_for_lines(
    proc: asyncio.subprocess.Process, manifest: Path, n: int, deadline_s: float = 60
) -> None:
    """Poll until ``manifest`` has ``n`` lines: the run is well under way, and still running."""
    async with asyncio.timeout(deadline_s):
        while lines_in(manifest) < n:
            assert proc.returncode is None, "the run ended before it could be stopped"
            await asyncio.sleep(0.05)
    assert proc.returncode is None, "the run ended before it could be stopped"


def ok_counts(out: Path) -> Counter[str]:
    """How many ok records each id has, over every line of every manifest."""
    counts: Counter[str] = Counter()
    for path in manifest_paths(out):
        for record in iter_records(path):
            if record["status"] == "ok":
                counts[record["id"]] += 1
    return counts


async def test_kill_9_twice_then_resume_makes_every_item_once(tmp_path: Path) -> None:
    src = prompts(tmp_path / "p.txt", 150)
    out = tmp_path / "out"
    async with Emulator(latency_s=0.15, latency_jitter_s=0.05) as emu:
        args = (
            "run",
            str(src),
            "--out",
            str(out),
            "--base-url",
            emu.base_url,
            "--concurrency",
            "6",
            "--download-concurrency",
            "4",
            "--no-progress",
        )
        for _ in range(2):
            proc = await start_sfbatch(*args)
            await wait_for_lines(
                proc, out / "manifest.jsonl", lines_in(out / "manifest.jsonl") + 10
            )
            proc.kill()
            await proc.wait()
        code, output = await sfbatch(*args)
        requests = emu.stats()["generation_requests"]
    assert code == 0, output
    counts = ok_counts(out)
    assert len(counts) == 150 and set(counts.values()) == {1}
    # Extra generations are bounded by what was in flight at each kill:
    # generation slots + the download queue (2 x downloaders) + downloaders.
    assert requests - 150 <= 2 * (6 + 8 + 4)
    assert not list((out / ".tmp").glob("*")) if (out / ".tmp").exists() else True


async def test_ctrl_c_finishes_in_flight_work_exits_130_and_resumes(tmp_path: Path) -> None:
    src = prompts(tmp_path / "p.txt", 300)
    out = tmp_path / "out"
    async with Emulator(latency_s=0.1) as emu:
        args = ("run", str(src), "--out", str(out), "--base-url", emu.base_url, "--no-progress")
        proc = await start_sfbatch(*args)
        await wait_for_lines(proc, out / "manifest.jsonl", 10)
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 130, err.decode()
        first = emu.stats()["generation_requests"]
        done = latest_records([out / "manifest.jsonl"])
        assert 0 < len(done) < 300
        # Every request that was paid for landed: nothing generated was dropped.
        assert sum(r["billed_images"] for r in done.values()) == first
        code, output = await sfbatch(*args)
        assert code == 0, output
        assert emu.stats()["generation_requests"] == 300
    assert "run the same command again" in err.decode()


async def test_daily_quota_nights_then_union_equals_one_unlimited_run(tmp_path: Path) -> None:
    src = prompts(tmp_path / "p.txt", 50)
    job = tmp_path / "nightly.toml"
    job.write_text(
        '[job]\ninputs = ["p.txt"]\nout = "out"\n[build]\nbase_seed = 99\n'
        "[limits]\nconcurrency = 3\n"
    )
    nights = []
    async with Emulator(ipd=20) as emu:
        for _ in range(4):
            code, output = await sfbatch(
                "run", str(job), "--base-url", emu.base_url, "--no-progress"
            )
            nights.append(code)
            if code == 0:
                break
            assert code == 4, output
            assert "quota" in output
            emu.advance_clock(86_400)
    assert nights == [4, 4, 0]
    built = {
        k: (r["status"], r["seed"])
        for k, r in latest_records([tmp_path / "out/manifest.jsonl"]).items()
    }
    async with Emulator() as emu:
        code, output = await sfbatch(
            "run", str(job), "--out", str(tmp_path / "once"), "--base-url", emu.base_url
        )
    assert code == 0, output
    once = {
        k: (r["status"], r["seed"])
        for k, r in latest_records([tmp_path / "once/manifest.jsonl"]).items()
    }
    assert built == once and len(once) == 50
    assert src.exists()


async def test_our_own_ipd_stops_before_the_server_refuses(tmp_path: Path) -> None:
    src = prompts(tmp_path / "p.txt", 30)
    out = tmp_path / "out"
    async with Emulator() as emu:
        args = (
            "run",
            str(src),
            "--out",
            str(out),
            "--base-url",
            emu.base_url,
            "--ipd",
            "12",
            "--batch-size",
            "2",
            "--concurrency",
            "4",
        )
        code, output = await sfbatch(*args)
        assert code == 4, output
        assert emu.stats()["images_generated"] == 12
        code, output = await sfbatch(*args)  # same day: nothing more
        assert code == 4
        assert emu.stats()["images_generated"] == 12
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["outcome"] == "quota" and summary["quota"]["billed_today"] == 12


async def test_two_builds_of_one_job_make_the_same_seeds_and_bytes(tmp_path: Path) -> None:
    src = tmp_path / "p.jsonl"
    src.write_bytes(b'{"id": "a", "prompt": "a fox"}\n{"id": "b", "prompt": "a cat", "seed": 5}\n')
    results = []
    for name in ("one", "two"):
        async with Emulator(seed=hash(name) % 1000) as emu:
            code, output = await sfbatch(
                "run",
                str(src),
                "--out",
                str(tmp_path / name),
                "--base-url",
                emu.base_url,
                "--variations",
                "2",
                "--base-seed",
                "7",
            )
        assert code == 0, output
        records = latest_records([tmp_path / name / "manifest.jsonl"])
        results.append({k: (r["seed"], r["images"][0]["sha256"]) for k, r in records.items()})
    assert results[0] == results[1]
    assert set(results[0]) == {"a-v0", "a-v1", "b-v0", "b-v1"}
    assert results[0]["b-v0"][0] == 5 and results[0]["a-v0"][0] != results[0]["a-v1"][0]


async def test_shards_split_one_file_and_status_understands_the_set(tmp_path: Path) -> None:
    src = prompts(tmp_path / "p.txt", 40)
    out = tmp_path / "out"
    async with Emulator() as emu:
        for shard in ("0/3", "1/3", "2/3"):
            code, output = await sfbatch(
                "run", str(src), "--out", str(out), "--base-url", emu.base_url, "--shard", shard
            )
            assert code == 0, output
    assert sorted(p.name for p in manifest_paths(out)) == [
        "manifest-0-of-3.jsonl",
        "manifest-1-of-3.jsonl",
        "manifest-2-of-3.jsonl",
    ]
    counts = ok_counts(out)
    assert len(counts) == 40 and set(counts.values()) == {1}
    code, output = await sfbatch("status", str(out), "--json")
    assert code == 0
    report: dict[str, Any] = orjson.loads(output[output.index("{") :])
    assert report["counts"]["ok"] == 40
    code, output = await sfbatch("verify", str(out))
    assert code == 0, output


async def test_each_shard_cleans_only_its_own_temporary_files(tmp_path: Path) -> None:
    """A killed run's ``.part`` files go with its next run: a shard's under
    ``.tmp/I-of-N`` (its parallel siblings' stay), an unsharded run's under ``.tmp``."""
    src = prompts(tmp_path / "p.txt", 6)
    out = tmp_path / "out"
    leftovers = {shard: out / ".tmp" / shard / "dead.part" for shard in ("0-of-2", "1-of-2", "")}
    for part in leftovers.values():
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_bytes(b"half an image")

    def left() -> set[str]:
        return {shard for shard, part in leftovers.items() if part.exists()}

    async with Emulator() as emu:
        base = ("run", str(src), "--out", str(out), "--base-url", emu.base_url)
        code, output = await sfbatch(*base, "--shard", "0/2")
        assert code == 0, output
        assert left() == {"1-of-2", ""}
        code, output = await sfbatch(*base)  # the whole file, beside the shards
        assert code == 0, output
        assert left() == {"1-of-2"}  # shard 1's may be running: only shard 1 cleans it
        code, output = await sfbatch("verify", str(out))
        assert "1-of-2/dead.part" in output
        code, output = await sfbatch(*base, "--shard", "1/2")
        assert code == 0, output
    assert left() == set() and not (out / ".tmp").exists()


async def test_bad_key_exits_3_fast_and_never_prints_the_key(tmp_path: Path) -> None:
    secret = "sk-top-secret-value-0042"
    src = prompts(tmp_path / "p.txt", 100)
    async with Emulator() as emu:
        code, output = await sfbatch(
            "run",
            str(src),
            "--out",
            str(tmp_path / "out"),
            "--base-url",
            emu.base_url,
            "-v",
            env=sfbatch_env(secret),
            deadline_s=20,
        )
        assert emu.stats()["generation_requests"] <= 4
    assert code == 3
    assert "401" in output and secret not in output
    for path in (tmp_path / "out").rglob("*"):
        assert secret not in path.read_text(errors="replace")


async def test_missing_key_is_exit_3_with_advice(tmp_path: Path) -> None:
    src = prompts(tmp_path / "p.txt", 1)
    code, output = await sfbatch(
        "run", str(src), "--out", str(tmp_path / "o"), env=sfbatch_env(None)
    )
    assert code == 3 and "SILICONFLOW_API_KEY" in output


async def test_demo_job_runs_on_the_embedded_emulator_without_a_key(tmp_path: Path) -> None:
    code, output = await sfbatch(
        "run",
        "jobs/demo.toml",
        "--out",
        str(tmp_path / "demo"),
        env=sfbatch_env(None),
        deadline_s=120,
    )
    assert code == 0, output
    assert "embedded emulator" in output
    assert len(ok_counts(tmp_path / "demo")) == 24


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ("[job]\ninputs = ['p.txt']\nout = 'o'\nbogus = 1\n", "unknown key job.bogus"),
        (
            "[limits]\nrpm = 'fast'\n[job]\ninputs = ['p.txt']\nout = 'o'\n",
            "limits.rpm must be int or float",
        ),
        ("[nope]\n", "unknown section [nope]"),
        ("[job\n", "not valid TOML"),
        ("[job]\nout = 'o'\n", "names no prompt file"),
        (
            "[limits]\nconcurrency = 0\n[job]\ninputs = ['p.txt']\nout = 'o'\n",
            "concurrency must be",
        ),
        (
            "[api]\nprofile = 'eu'\n[job]\ninputs = ['p.txt']\nout = 'o'\n",
            "profile must be cn or com",
        ),
        (
            "[emulator]\nimage_px = -1\n[job]\ninputs = ['p.txt']\nout = 'o'\nemulator = 'on'\n",
            "image_px must be at least 1",
        ),
    ],
)
async def test_bad_job_files_name_the_key_and_file(tmp_path: Path, job: str, message: str) -> None:
    prompts(tmp_path / "p.txt", 2)
    path = tmp_path / "job.toml"
    path.write_text(job)
    for command in ("run", "validate"):
        code, output = await sfbatch(command, str(path))
        assert code == 2, output
        assert message in output and "job.toml" in output


async def test_validate_reports_every_bad_row_with_file_and_line(tmp_path: Path) -> None:
    src = tmp_path / "p.jsonl"
    src.write_bytes(
        b'{"prompt": "fine"}\n{"prompt": "x", "seed": -4}\nnot json\n'
        b'{"prompt": "y", "batch_size": 3}\n'
    )
    code, output = await sfbatch("validate", str(src), "--ipm", "2")
    assert code == 2
    assert f"{src}:2: seed must be 0..9999999999, got -4" in output
    assert f"{src}:3: not a JSON object" in output
    assert f"{src}:4: batch_size 3 can never fit an images-per-minute limit of 2" in output
    assert "4 rows: 1 valid, 3 invalid" in output
    code, output = await sfbatch("validate", "jobs/nightly.toml")
    assert code == 0, output
    assert "40 rows: 40 valid" in output


async def test_usage_errors_exit_2(tmp_path: Path) -> None:
    code, output = await sfbatch("run", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"))
    assert code == 2 and "cannot open" in output
    code, output = await sfbatch("run", str(prompts(tmp_path / "p.txt", 1)))
    assert code == 2 and "--out" in output
    code, output = await sfbatch(
        "run", str(tmp_path / "p.txt"), "--out", "o", "--batch-size", "3", "--ipm", "2"
    )
    assert code == 2 and "can never fit" in output


async def test_an_input_file_that_breaks_mid_run_is_exit_2_with_its_reason(tmp_path: Path) -> None:
    src = tmp_path / "p.csv"
    src.write_text("a,b\n1,2\n")
    code, output = await sfbatch("run", str(src), "--out", str(tmp_path / "o"), "--emulator")
    assert code == 2
    assert "p.csv:1: the header row has no 'prompt' column" in output
    assert "Traceback" not in output


async def test_a_job_reads_its_key_from_the_variable_it_names(tmp_path: Path) -> None:
    prompts(tmp_path / "p.txt", 2)
    job = tmp_path / "job.toml"
    job.write_text('[job]\ninputs = ["p.txt"]\nout = "out"\n[api]\nkey_env = "MY_COM_KEY"\n')
    async with Emulator() as emu:
        env = sfbatch_env(None, MY_COM_KEY="sk-emulator")
        code, output = await sfbatch("run", str(job), "--base-url", emu.base_url, env=env)
        assert code == 0, output
        # SILICONFLOW_API_KEY is not the variable this job reads.
        code, output = await sfbatch("run", str(job), "--base-url", emu.base_url, env=sfbatch_env())
    assert code == 3 and "MY_COM_KEY is not set" in output


async def test_kill_9_leaves_no_record_pointing_at_a_missing_or_partial_file(
    tmp_path: Path,
) -> None:
    # Images land by group commit (a batch written, fsynced and renamed together); a
    # record is written only after its batch, so a kill -9 at any point leaves every
    # ok record's files in place and whole.
    src = prompts(tmp_path / "p.txt", 400)
    out = tmp_path / "out"
    async with Emulator() as emu:
        proc = await start_sfbatch(
            "run", str(src), "--out", str(out), "--base-url", emu.base_url,
            "--concurrency", "32", "--download-concurrency", "32", "--no-progress",
        )  # fmt: skip
        await wait_for_lines(proc, out / "manifest.jsonl", 60)
        proc.kill()
        await proc.wait()
    records = [r for r in iter_records(out / "manifest.jsonl") if r["status"] == "ok"]
    assert records
    for record in records:
        for image in record["images"]:
            data = (out / image["path"]).read_bytes()
            assert len(data) == image["bytes"]
            assert hashlib.sha256(data).hexdigest() == image["sha256"]


@pytest.mark.usefixtures("sfbatch_logging")  # main() configures logging: put back after
def test_run_puts_the_collector_back_as_it_found_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run`` freezes start-up's objects and collects less often while it runs; ``main()``
    called in a process that goes on (a notebook, a scheduler) gets its settings back."""
    import gc

    from sfbatch.cli import main

    for name in ("SILICONFLOW_API_KEY", "SILICONFLOW_API_KEYS", "SILICONFLOW_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    before = gc.get_threshold()
    frozen = gc.get_freeze_count()
    src = prompts(tmp_path / "p.txt", 3)
    argv = ["run", str(src), "--out", str(tmp_path / "out"), "--emulator", "--no-progress"]
    assert main(argv) == 0
    assert lines_in(tmp_path / "out" / "manifest.jsonl") == 3
    assert gc.get_threshold() == before and gc.get_freeze_count() == frozen


async def test_garbage_of_the_user_or_the_environment_is_a_message_never_a_traceback(
    tmp_path: Path,
) -> None:
    src = prompts(tmp_path / "p.txt", 2)
    out = str(tmp_path / "o")
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe[job]\n")
    stray = tmp_path / "stray.csv"
    stray.write_text('id,prompt\na,"she said, hi\n' + "".join(f"r{i},p {i}\n" for i in range(50)))
    (tmp_path / "m" / "manifest.jsonl").mkdir(parents=True)
    cases: list[tuple[tuple[str, ...], dict[str, str] | None, int, str]] = [
        (("validate", str(tmp_path / "binary.toml")), None, 2, "not valid UTF-8"),
        (("validate", str(src), "--models-file", str(tmp_path / "binary.toml")), None, 2, "UTF-8"),
        (("run", str(src), "--out", ""), None, 2, "argument --out: an empty path"),
        (("validate", str(src), "--tz-offset", "30"), None, 2, "tz_offset_h must be at most 14"),
        (("validate", str(src), "--concurrency", "9" * 20), None, 2, "at most 10,000"),
        (("validate", str(src), "--limit", "9" * 20), None, 2, "limit must be at most"),
        (("validate", str(stray)), None, 2, f"{stray}:2: a quoted field opened here is never"),
        (
            ("run", str(src), "--out", out),
            sfbatch_env(None, SILICONFLOW_API_KEYS=" , "),
            3,
            "only commas or spaces",
        ),
        (
            ("run", str(src), "--out", out, "--base-url", "http://u:pw@127.0.0.1:9/v1"),
            None,
            2,
            "must not carry a user name or password",
        ),
        (
            ("run", str(src), "--out", str(tmp_path / "m"), "--emulator"),
            None,
            2,
            "Is a directory",
        ),
    ]
    status_dir = tmp_path / "st"
    status_dir.mkdir()
    (status_dir / "manifest.jsonl").write_bytes(b"")
    cases += [
        (("validate", str(tmp_path)), None, 2, "is a directory, not a prompt file"),
        (("status", str(tmp_path / "nosuch")), None, 2, "no manifest: no such directory"),
        (("status", str(src)), None, 2, "no manifest: not a directory"),
        (
            ("status", str(status_dir), "--input", str(tmp_path / "binary.toml")),
            None,
            2,
            "is a job file",
        ),
    ]
    for args, env, expected, message in cases:
        code, output = await sfbatch(*args, env=env)
        assert code == expected and message in output, (args, output)
        assert "Traceback" not in output, (args, output)


def test_a_reader_that_stops_early_is_no_traceback(tmp_path: Path) -> None:
    # `sfbatch status DIR | head -1`: the pipe's reader is gone before sfbatch writes
    (tmp_path / "manifest.jsonl").write_bytes(b"")
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sfbatch", "status", str(tmp_path)],
            stdout=write,
            stderr=subprocess.PIPE,
            env=sfbatch_env(None),
            cwd=REPO,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    assert done.returncode == 141 and b"Traceback" not in done.stderr, done.stderr


async def test_validate_takes_a_run_command_line_as_it_is(tmp_path: Path) -> None:
    src = prompts(tmp_path / "p.txt", 3)
    flags = ("--out", str(tmp_path / "o"), "-q", "--no-progress", "--key-env", "MY_KEY")
    code, output = await sfbatch("validate", str(src), *flags, "--emulator", "--log-format", "json")
    assert code == 0 and "3 rows: 3 valid" in output, output
    assert not (tmp_path / "o").exists()  # validate writes nothing


def test_ctrl_c_in_a_command_before_any_run_is_exit_130_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sfbatch.status
    from sfbatch.cli import main

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    (tmp_path / "manifest.jsonl").write_bytes(b"")
    monkeypatch.setattr(sfbatch.status, "status_report", interrupted)
    assert main(["status", str(tmp_path)]) == 130
