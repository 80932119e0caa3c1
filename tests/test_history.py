"""The manifest stays the truth across edits and damage (issue 10 points 1, 2, 7; issue 12).

The real engine and the ``sfbatch`` command against the emulator over loopback: what a
run found since the manifest was written, history kept apart from the current input's
counts and exit code, damaged manifest lines, ``verify --repair``, and two inputs.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import run_sfbatch

from sfbatch.config import RunConfig
from sfbatch.emulator import Emulator, FaultConfig
from sfbatch.loader import PromptSource
from sfbatch.manifest import iter_records, latest_records
from sfbatch.models import ModelRegistry
from sfbatch.pipeline import Pipeline, RunResult
from sfbatch.status import status_report

REPO = Path(__file__).resolve().parent.parent
REG = ModelRegistry.builtin()


def config_for(emulator: Emulator, out: Path, **overrides: Any) -> RunConfig:
    return RunConfig(
        out_dir=out,
        api_key=emulator.api_key,
        base_url=emulator.base_url,
        concurrency=4,
        download_concurrency=4,
        backoff_base_s=0.01,
        backoff_cap_s=0.05,
        **overrides,
    )


async def run(config: RunConfig, prompts: Path) -> RunResult:
    source = PromptSource(prompts, registry=REG, limit=config.limit)
    return await Pipeline(config, source, registry=REG).run()


async def sfbatch(*args: str, deadline_s: float = 90) -> tuple[int, str]:
    """``python -m sfbatch ARGS`` in the repository; its exit code and its output."""
    code, out, err = await run_sfbatch(*args, deadline_s=deadline_s)
    return code, out + err


def lines(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(f"{p}\n" for p in prompts))
    return path


PROMPTS = [f"a harbour at dawn, study {i}" for i in range(8)]


async def test_an_edited_file_says_what_changed_and_keeps_the_rest_as_history(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prompts = lines(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "out"
    async with Emulator() as emu:
        first = await run(config_for(emu, out), prompts)
        assert first.exit_code == 0
        assert first.summary["history"] == 0
        assert first.summary["found"]["new_or_changed"] == 8
        # Edit: a line inserted at the top, one changed, two removed, the rest moved.
        edited = ["a new first line", *PROMPTS[:2], "study 2, edited", *PROMPTS[3:6]]
        lines(prompts, edited)
        made = emu.stats()["generation_requests"]
        with caplog.at_level(logging.INFO, logger="sfbatch"):
            again = await run(config_for(emu, out), prompts)
        assert emu.stats()["generation_requests"] == made + 2  # only the new and the edited
    assert again.exit_code == 0
    assert again.summary["found"]["new_or_changed"] == 2
    assert again.summary["history"] == 3  # study 2 before the edit, studies 6 and 7
    assert again.summary["manifest"] == {"ok": 7}
    assert (
        "2 rows new or changed since the manifest was written; 3 earlier records are no "
        "longer in the input (kept as history)" in caplog.text
    )
    # status --input matches rows by (id, fingerprint) and counts the history apart.
    report = status_report(out, input_path=prompts)
    assert report["pending"] == 0 and report["input_rows"] == 7
    assert report["history"] == 3
    assert report["counts"]["ok"] == 7  # the input's rows, as summary.json says; not 10
    assert status_report(out)["counts"]["ok"] == 10  # without --input: every id's latest


async def test_a_failed_prompt_edited_away_no_longer_fails_every_run(tmp_path: Path) -> None:
    prompts = lines(tmp_path / "p.txt", PROMPTS[:3])
    out = tmp_path / "out"
    async with Emulator(faults=FaultConfig(seed=3, p_503=1.0)) as emu:
        first = await run(config_for(emu, out, max_retries=0), prompts)
        assert first.exit_code == 1 and first.summary["manifest"] == {"failed": 3}
        emu.set_faults(FaultConfig())
        lines(prompts, PROMPTS[3:6])  # the failing prompts are replaced
        again = await run(config_for(emu, out), prompts)
        # A run of part of the input says nothing of history: it did not read it all.
        limited = await run(config_for(emu, out, limit=1), prompts)
    assert again.exit_code == 0, again.summary
    assert again.summary["manifest"] == {"ok": 3}
    assert again.summary["history"] == 3
    assert limited.exit_code == 0
    assert limited.summary["history"] is None
    assert limited.summary["found"]["new_or_changed"] is None
    assert limited.summary["manifest"] == {"ok": 1}


async def test_damaged_manifest_lines_are_reported_and_their_items_made_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prompts = lines(tmp_path / "p.txt", PROMPTS[:5])
    out = tmp_path / "out"
    manifest = out / "manifest.jsonl"
    async with Emulator() as emu:
        await run(config_for(emu, out), prompts)
        raw = manifest.read_bytes().split(b"\n")
        raw[1] = raw[1][: len(raw[1]) // 2]  # a line cut in the middle of the file
        raw[3] = b"\x00\x00garbage"
        manifest.write_bytes(b"\n".join(raw))
        made = emu.stats()["generation_requests"]
        with caplog.at_level(logging.WARNING, logger="sfbatch"):
            again = await run(config_for(emu, out), prompts)
        assert emu.stats()["generation_requests"] == made + 2
    found = again.summary["found"]
    assert found["damaged_lines"] == ["manifest.jsonl:2", "manifest.jsonl:4"]
    assert found["damaged_line_count"] == 2
    assert f"{manifest}:2, {manifest}:4" in caplog.text
    assert again.summary["manifest"] == {"ok": 5}
    assert again.exit_code == 0


async def test_verify_repair_makes_a_damaged_image_due_again(tmp_path: Path) -> None:
    lines(tmp_path / "p.txt", PROMPTS[:4])
    out = tmp_path / "out"
    async with Emulator() as emu:
        args = ("run", str(tmp_path / "p.txt"), "--out", str(out), "--base-url", emu.base_url)
        code, output = await sfbatch(*args, "--no-progress")
        assert code == 0, output
        records = latest_records([out / "manifest.jsonl"])
        victim = sorted(records.values(), key=lambda r: r["line"])[1]
        image = out / victim["images"][0]["path"]
        image.write_bytes(image.read_bytes()[:100])  # truncated on disk
        code, output = await sfbatch("verify", str(out))
        assert code == 1 and "MISMATCHED" in output
        code, output = await sfbatch("verify", "--repair", "--json", str(out))
        assert code == 1
        assert orjson.loads(output.splitlines()[0])["repaired"] == [victim["id"]]
        repaired = latest_records([out / "manifest.jsonl"])[victim["id"]]
        assert repaired["status"] == "failed" and repaired["error"]["code"] == "damaged"
        made = emu.stats()["generation_requests"]
        code, output = await sfbatch(*args, "--no-progress")  # no --retry-failed needed
        assert code == 0, output
        assert "1 items are made again" in output
        assert emu.stats()["generation_requests"] == made + 1
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["found"]["remade_damaged"] == 1
    assert summary["manifest"] == {"ok": 4}
    remade = latest_records([out / "manifest.jsonl"])[victim["id"]]
    assert remade["status"] == "ok" and remade["images"][0]["path"] != victim["images"][0]["path"]
    code, output = await sfbatch("verify", str(out))
    assert code == 0, output


async def test_two_inputs_with_the_same_lines_never_share_an_id_or_a_file(
    tmp_path: Path,
) -> None:
    lines(tmp_path / "a.txt", PROMPTS[:4])
    lines(tmp_path / "b.txt", PROMPTS[:4])  # the same prompts on the same line numbers
    job = tmp_path / "job.toml"
    job.write_text('[job]\ninputs = ["a.txt", "b.txt"]\nout = "out"\n')
    out = tmp_path / "out"
    async with Emulator() as emu:
        code, output = await sfbatch("run", str(job), "--base-url", emu.base_url, "--no-progress")
        assert code == 0, output
        assert emu.stats()["generation_requests"] == 8
        code, output = await sfbatch("run", str(job), "--base-url", emu.base_url, "--no-progress")
        assert code == 0 and emu.stats()["generation_requests"] == 8  # all done
    records = list(iter_records(out / "manifest.jsonl"))
    assert len({r["id"] for r in records}) == 8
    assert Counter(r["file"].rsplit("/", 1)[-1] for r in records) == {"a.txt": 4, "b.txt": 4}
    paths = [image["path"] for r in records for image in r["images"]]
    assert len(paths) == len(set(paths)) == 8  # no path listed twice: nothing overwritten
    code, output = await sfbatch("verify", str(out))
    assert code == 0, output


async def test_validate_reads_a_job_of_two_inputs_as_run_does(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(
        '{"id": "cat", "prompt": "a cat"}\n{"id": "dog", "prompt": "a dog"}\n'
    )
    (tmp_path / "b.jsonl").write_text('{"prompt": "a cow"}\n{"id": "dog", "prompt": "a dog"}\n')
    job = tmp_path / "job.toml"
    job.write_text('[job]\ninputs = ["a.jsonl", "b.jsonl"]\nout = "out"\n')
    code, output = await sfbatch("validate", str(job))
    assert code == 2, output
    assert "b.jsonl:2" in output and "duplicate id dog" in output and "a.jsonl:2" in output
    assert "4 rows: 3 valid, 1 invalid" in output


async def test_after_a_run_that_stopped_early_pending_rows_are_not_called_new(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prompts = lines(tmp_path / "p.txt", PROMPTS[:5])
    out = tmp_path / "out"
    async with Emulator() as emu:
        first = await run(config_for(emu, out), lines(tmp_path / "q.txt", PROMPTS[:3]))
        assert first.exit_code == 0
        summary = orjson.loads((out / "summary.json").read_bytes())
        # as if the last run had been interrupted before its end
        (out / "summary.json").write_bytes(orjson.dumps({**summary, "outcome": "interrupted"}))
        with caplog.at_level(logging.INFO, logger="sfbatch"):
            again = await run(config_for(emu, out), prompts)
    assert again.exit_code == 0
    assert "2 rows not recorded yet (new, changed, or not reached by the last run)" in caplog.text
    assert "new or changed since the manifest was written" not in caplog.text
