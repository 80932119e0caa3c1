"""What a first-time user reads (issue 14): every message checked as printed, by the CLI.

Each test runs ``python -m sfbatch`` as a user would (against the emulator on 127.0.0.1)
and reads its output as a user would: the words, and the counts against the manifest.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, run_sfbatch, sfbatch_env

import sfbatch
from sfbatch.jobfile import job_keys
from sfbatch.manifest import latest_records, manifest_paths


def latest(out: Path) -> Counter[str]:
    return Counter(str(r["status"]) for r in latest_records(manifest_paths(out)).values())


# -- 1. where requests go -----------------------------------------------------------------


async def test_the_run_names_its_endpoint(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a lighthouse\n")
    async with sfbatch.Emulator() as emu:
        code, _, err = await run_sfbatch(
            "run", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"), "--base-url", emu.base_url
        )
    assert code == 0, err
    host = emu.base_url.split("/")[2]
    assert f"sending to the emulator at {host}" in err
    assert "looks like the emulator's" not in err


async def test_an_emulator_key_sent_to_a_real_host_is_warned_about(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a lighthouse\n")
    # A host that can never resolve (RFC 6761): the warning comes before any request.
    code, _, err = await run_sfbatch(
        "run",
        str(tmp_path / "p.txt"),
        "--out",
        str(tmp_path / "o"),
        "--base-url",
        "https://api.siliconflow.invalid/v1",
        "--max-retries",
        "0",
        "--connect-timeout",
        "5",
        "--outage-timeout",  # an unreachable endpoint is an outage: paused, then exit 5
        "1",
        "--no-progress",
    )
    assert "sending to api.siliconflow.invalid" in err
    assert "warning: the API key looks like the emulator's" in err, err
    assert "sk-emulator" in err and code != 0


async def test_the_demo_says_the_emulator_draws_small_images(tmp_path: Path) -> None:
    shutil.copytree(REPO / "jobs", tmp_path / "jobs")
    code, _, err = await run_sfbatch(
        "run", "jobs/demo.toml", "--limit", "1", cwd=tmp_path, env=sfbatch_env(None)
    )
    assert code == 0, err
    first = err.splitlines()[0]
    assert "embedded emulator at http://127.0.0.1:" in first
    assert "draws small 256×256 placeholder images whatever image_size asks" in err


# -- 2. counts ---------------------------------------------------------------------------


async def test_a_rerun_after_failures_does_not_call_them_done(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a\nb\nc\n")
    out = tmp_path / "o"
    async with sfbatch.Emulator() as emu:
        args = ("run", str(tmp_path / "p.txt"), "--out", str(out), "--base-url", emu.base_url)
        # 2048x2048 is over Kolors' pixel limit: the service refuses each with a 400.
        code, _, err = await run_sfbatch(*args, "--image-size", "2048x2048", "--limit", "2")
        assert code == 1, err
        code, _, err = await run_sfbatch(*args, "--image-size", "2048x2048")
    assert latest(out) == Counter(failed=3)
    headline = next(line for line in err.splitlines() if "finished in" in line)
    assert headline.endswith(": nothing made, 1 failed, 2 skipped as failed before"), headline
    assert "skipped as done" not in err


async def test_one_of_everything_is_singular(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a lighthouse\n")
    out = tmp_path / "o"
    async with sfbatch.Emulator() as emu:
        code, _, err = await run_sfbatch(
            "run", str(tmp_path / "p.txt"), "--out", str(out), "--base-url", emu.base_url
        )
    assert code == 0, err
    assert "1 ok (1 image," in err and "1 images" not in err
    assert "(limit: no per-minute limit set)" in err
    code, status, _ = await run_sfbatch("status", str(out))
    assert code == 0
    assert re.search(r"^  ok +1  1 image, ", status, re.M), status
    # One short run: no hourly rate extrapolated from seconds, no nights on a plain build.
    assert "ok/h" not in status and "too short for an hourly rate" in status
    assert "nights left" not in status


async def test_status_of_a_nightly_build_still_counts_nights(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a\nb\nc\n")
    out = tmp_path / "o"
    async with sfbatch.Emulator() as emu:
        code, _, err = await run_sfbatch(
            "run", str(tmp_path / "p.txt"), "--out", str(out), "--base-url", emu.base_url,
            "--ipd", "2",
        )  # fmt: skip
    assert code == 4, err
    code, status, _ = await run_sfbatch("status", str(out), "--input", str(tmp_path / "p.txt"))
    assert re.search(r"^  nights left +1  at 2 images/day", status, re.M), status


async def test_a_why_line_keeps_the_whole_list_of_sizes(tmp_path: Path) -> None:
    sizes = [f"{512 + 64 * i}x{512 + 64 * i}" for i in range(12)]
    models = tmp_path / "models.toml"
    models.write_text(f'[models."acme/wide"]\nimage_sizes = {sizes!r}\n'.replace("'", '"'))
    # A row's own size: an invalid row (as a flag it is a usage error, listing them too).
    (tmp_path / "p.jsonl").write_text(
        '{"prompt": "a", "model": "acme/wide", "image_size": "100x100"}\n'
    )
    async with sfbatch.Emulator() as emu:
        code, _, err = await run_sfbatch(
            "run", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o"),
            "--base-url", emu.base_url, "--models-file", str(models),
        )  # fmt: skip
        assert code == 1, err
        flag_code, _, flag_err = await run_sfbatch(
            "run", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o2"),
            "--base-url", emu.base_url, "--models-file", str(models),
            "--model", "acme/wide", "--image-size", "100x100",
        )  # fmt: skip
    assert flag_code == 2 and f"(one of: {', '.join(sizes)})" in flag_err, flag_err
    why = next(line for line in err.splitlines() if line.startswith("  why:"))
    assert "1 invalid row, e.g." in why
    assert f"(one of: {', '.join(sizes)})" in why, why


# -- 3. validate -------------------------------------------------------------------------

BAD_ROWS = (
    b'{"prompt": "a cat", "sead": 3}\n'
    b'{"prompt": "a dog"}\n'
    b'{"prompt": "bad\n'
    b'{"prompt": "x", "model": "Qwen/Qwen-Image", "batch_size": 2}\n'
    b'{"prompt": "a fox", "sead": 4}\n'
    b"plain words\n"
    b'{"prompt": "fine"}\n'
)


async def test_validate_lists_each_bad_line_once_with_its_own_line_number(tmp_path: Path) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_bytes(BAD_ROWS)
    code, out, err = await run_sfbatch("validate", str(src), "--variations", "2")
    assert code == 2
    both = out + err
    assert both.count("unknown field 'sead'") == 1, both
    assert f"warning: {src}:1: unknown field 'sead' ignored (did you mean 'seed'?)" in out
    assert both.count(f"{src}:3: not a JSON object") == 1
    assert "line 2 column" not in both and "(char " not in both
    assert f"{src}:4: batch_size must be 1, got 2" in out
    assert both.count(f"{src}:4:") == 1 and both.count(f"{src}:6:") == 1
    assert "7 rows: 4 valid, 3 invalid (8 items, 2 per row); 8 images to make" in out


async def test_validate_lists_every_mistake_of_a_job_file(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a\n")
    job = tmp_path / "job.toml"
    job.write_text(
        '[job]\ninputs = ["p.txt"]\nout = "o"\n'
        '[limits]\nrmp = 3\nconcurrency = "four"\n[build]\nshard = "9"\n'
    )
    code, _, err = await run_sfbatch("validate", str(job))
    assert code == 2
    assert "unknown key limits.rmp (did you mean limits.rpm?)" in err
    assert "limits.concurrency: concurrency must be auto or a whole number" in err
    assert "shard must be I/N" in err


# -- 4. help -------------------------------------------------------------------------------


async def test_run_help_shows_every_default() -> None:
    code, out, _ = await run_sfbatch("run", "--help", env=sfbatch_env(COLUMNS="300"))
    assert code == 0
    # One entry per option: its line and the wrapped lines under it, joined.
    entries = re.split(r"\n(?=  -)", out.split("options:", 1)[1])
    lines = {entry.split()[0]: " ".join(entry.split()) for entry in entries if entry.strip()}
    expected = {
        "--model": "(default Kwai-Kolors/Kolors)",
        "--image-size": "(default the model's own)",
        "--rpm": "(default no limit)",
        "--ipm": "(default no limit)",
        "--ipd": "(default no limit)",
        "--concurrency": "(default ",
        "--max-retries": "(default 5)",
        "--request-timeout": "(default 300)",
        "--download-timeout": "(default 120)",
        "--key-env": "(default SILICONFLOW_API_KEY",
        "--file-naming": "(default {id}_{index})",
    }
    for flag, text in expected.items():
        assert text in lines.get(flag, ""), (flag, lines.get(flag))


async def test_key_env_names_another_variable(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a\n")
    async with sfbatch.Emulator() as emu:
        code, _, err = await run_sfbatch(
            "run", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"),
            "--base-url", emu.base_url, "--key-env", "MY_KEY",
            env=sfbatch_env(None, MY_KEY=emu.api_key),
        )  # fmt: skip
    assert code == 0, err
    assert latest(tmp_path / "o") == Counter(ok=1)


def test_the_readme_job_file_table_holds_every_key() -> None:
    readme = (REPO / "README.md").read_text()
    table = readme.split("<!-- job-file keys: begin -->")[1].split("<!-- job-file keys: end -->")[0]
    shown = re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \|", table, re.M)
    regenerate = "python3 -c 'from sfbatch.cli import job_keys_table; print(job_keys_table())'"
    assert sorted(shown) == sorted(job_keys()), f"README's table is stale: {regenerate}"


# -- 5. library ----------------------------------------------------------------------------


async def test_the_library_starts_the_embedded_emulator(tmp_path: Path) -> None:
    assert "Emulator" in sfbatch.__all__
    async with sfbatch.Emulator() as emu:
        config = sfbatch.RunConfig(
            out_dir=tmp_path, api_key=emu.api_key, base_url=emu.base_url, rpm=600
        )
        first = [record async for record in sfbatch.generate(["a cat", "a dog"], config)]
        again = [record async for record in sfbatch.generate(["a cat", "a dog"], config)]
    assert [r["status"] for r in first] == ["ok", "ok"]
    assert again == []  # as the README says: finished records are not yielded again


# -- 6. gallery ------------------------------------------------------------------------------


def test_the_pillow_hint_works_from_a_checkout_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from sfbatch import gallery

    assert "pip install 'sfbatch[gallery]'" in gallery.PILLOW_HINT
    assert "pip install '.[gallery]'" in gallery.PILLOW_HINT


# -- done when: a newcomer's first three commands -------------------------------------------


async def test_a_newcomers_first_three_commands_print_nothing_untrue(tmp_path: Path) -> None:
    shutil.copytree(REPO / "jobs", tmp_path / "jobs")
    code, _, err = await run_sfbatch("run", "jobs/demo.toml", cwd=tmp_path, env=sfbatch_env(None))
    assert code == 0, err
    out = tmp_path / "demo-out"
    records = latest_records(manifest_paths(out))
    ok = [r for r in records.values() if r["status"] == "ok"]
    images = sum(len(r["images"]) for r in ok)
    assert len(records) == len(ok) == 24
    assert "finished in" in err and f": {len(ok)} ok ({images} images, " in err

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(BAD_ROWS)
    code, report, _ = await run_sfbatch("validate", str(bad), cwd=tmp_path)
    assert code == 2
    lines = BAD_ROWS.count(b"\n")
    assert f"{lines} rows: 4 valid, 3 invalid; 4 images to make" in report

    code, status, _ = await run_sfbatch("status", "demo-out", cwd=tmp_path)
    assert code == 0
    assert status.startswith(f"demo-out: {len(records)} items from 1 manifest")
    assert re.search(rf"^  ok +{len(ok)}  {images} images, ", status, re.M), status
    assert re.search(r"^  failed +0$", status, re.M)
    assert re.search(r"^  invalid +0$", status, re.M)
    billed = sum(int(r.get("billed_images") or 0) for r in records.values())
    assert re.search(rf"^  billed total +{billed}$", status, re.M), status
    assert "nights left" not in status and "ok/h over 0 h" not in status
