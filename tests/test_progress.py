"""What the user sees while a run goes: status lines, JSON logs, -q, the summary, the bar.

The command-line tests run ``python -m sfbatch run JOB.toml --emulator`` in a subprocess
(stderr is then a pipe, not a terminal) against the embedded emulator, slowed by the job
file's ``[emulator] latency_s`` so a run lasts about two seconds, with
``SFBATCH_STATUS_INTERVAL_S=0.2``. The bar test runs the same command in a detached tmux
session of a fixed size and reads the pane; it is skipped when tmux is not installed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from conftest import sfbatch_env

from sfbatch.logs import LiveLine, attach_live_line
from sfbatch.pipeline import RunResult
from sfbatch.progress import Progress, _bar_line, _Snapshot
from sfbatch.reasons import Reason, ReasonTally
from sfbatch.summary import print_summary

STATUS = re.compile(
    r"^sfbatch: (?P<done>[\d,]+)/(?P<total>[\d,]+) done \(\d+%\) · ok \d+ · failed \d+ · "
    r"invalid \d+ · retries \d+ · (–|[\d,.]+) img/min \(limit 1,200\) · 429s \d+ · "
    r"ETA (\?|[\dhms]+)$"
)


# -- helpers ---------------------------------------------------------------------------


def write_job(
    tmp_path: Path,
    *,
    rows: int,
    invalid: int = 0,
    latency_s: float = 0.2,
    emulator_ipm: int | None = None,
) -> Path:
    """A job file with ``rows`` prompts (and ``invalid`` bad rows), slowed by ``latency_s``."""
    lines = [orjson.dumps({"prompt": f"a lighthouse at dusk, number {i}"}) for i in range(rows)]
    lines += [orjson.dumps({"prompt": "too many", "batch_size": 9}) for _ in range(invalid)]
    (tmp_path / "p.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    limits = f"ipm = {emulator_ipm}\n" if emulator_ipm else ""
    job = tmp_path / "job.toml"
    job.write_text(
        f'[job]\ninputs = ["p.jsonl"]\n\n'
        f"[emulator]\nlatency_s = {latency_s}\nimage_px = 16\n{limits}"
    )
    return job


def cli_env() -> dict[str, str]:
    env = sfbatch_env(None, SFBATCH_STATUS_INTERVAL_S="0.2")
    env.pop("COLUMNS", None)
    return env


def sfbatch_command(job: Path, out: Path, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sfbatch",
        "run",
        str(job),
        "--out",
        str(out),
        "--emulator",
        "--ipm",
        "1200",
        *flags,
    ]


def run_cli(job: Path, out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sfbatch_command(job, out, *flags),
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def status_lines(stderr: str) -> list[re.Match[str]]:
    return [m for line in stderr.splitlines() if (m := STATUS.match(line))]


# -- the command line, not on a terminal ----------------------------------------------------


def test_status_lines_and_a_summary_saying_where_and_how_to_go_on(tmp_path: Path) -> None:
    job = write_job(tmp_path, rows=40, invalid=1)
    out = tmp_path / "out"
    done = run_cli(job, out)
    assert done.returncode == 1, done.stderr  # the invalid row
    lines = status_lines(done.stderr)
    assert len(lines) >= 3, done.stderr
    counts = [int(m["done"].replace(",", "")) for m in lines]
    assert counts == sorted(counts) and counts[-1] > counts[0]
    assert {m["total"] for m in lines} == {"41"}  # counted before the run, invalid row included
    assert "no rate limit" not in done.stderr and "img/min" in done.stderr
    # the summary, after the last status line
    summary = done.stderr[done.stderr.index("sfbatch: finished in") :]
    assert "40 ok (40 images" in summary and "1 invalid" in summary
    assert re.search(r"why: +1 invalid row, e\.g\. \S*p\.jsonl:41: ", summary), summary
    assert f"manifest {out / 'manifest.jsonl'}" in summary
    assert "run the same command again" in summary
    assert "sk-" not in done.stderr  # no API key, ever

    again = run_cli(job, out)  # a resumed run: everything was finished before
    assert again.returncode == 1
    # The invalid row was not "done": it is skipped as what it was.
    assert "nothing made, 40 skipped as done before, 1 skipped as invalid before" in again.stderr


def test_json_log_format_is_one_object_per_line(tmp_path: Path) -> None:
    job = write_job(tmp_path, rows=40)
    out = tmp_path / "out"
    done = run_cli(job, out, "--log-format", "json")
    assert done.returncode == 0, done.stderr
    records = [orjson.loads(line) for line in done.stderr.splitlines()]  # every line parses
    assert all({"ts", "level", "message"} <= record.keys() for record in records)
    status = [r for r in records if r.get("event") == "status"]
    assert len(status) >= 3, done.stderr
    assert all(r["total"] == 40 and r["level"] == "info" for r in status)
    assert status[-1]["done"] >= status[0]["done"]
    assert STATUS.match("sfbatch: " + status[-1]["message"])
    (summary,) = [r for r in records if r.get("event") == "summary"]
    assert summary["outcome"] == "done" and summary["exit_code"] == 0
    assert summary["run"]["ok"] == 40
    assert summary["manifest"] == str(out / "manifest.jsonl")


def test_quiet_prints_nothing_when_all_goes_well(tmp_path: Path) -> None:
    job = write_job(tmp_path, rows=30)
    done = run_cli(job, tmp_path / "out", "-q")
    assert done.returncode == 0
    assert done.stderr == ""
    assert (tmp_path / "out" / "summary.json").exists()


def test_interrupted_run_says_how_to_resume(tmp_path: Path) -> None:
    job = write_job(tmp_path, rows=400)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        sfbatch_command(job, out),
        env=cli_env(),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        manifest = out / "manifest.jsonl"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if manifest.exists() and manifest.read_bytes().count(b"\n") >= 8:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "sfbatch: interrupted after" in stderr
    assert "run the same command again to resume" in stderr
    assert f"manifest {manifest}" in stderr


# -- the bar, on a terminal (tmux) ------------------------------------------------------------

BAR = re.compile(
    r"^sfbatch +\d+%\|.*\| (?P<done>[\d,]+)/(?P<total>[\d,]+) · ok [\d,]+ · failed [\d,]+ · "
    r"retries [\d,]+ · (–|[\d,.]+) img/min \(limit 1,200(, slowed to [\d,.]+)?\) · "
    r"429s [\d,]+ · ETA \S+\s*$"
)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_bar_on_a_terminal_with_log_lines_above_it(tmp_path: Path) -> None:
    # The emulator allows 30 images a minute, sfbatch is told 1,200: 429s come within a
    # second, and the throttling warning must appear above the bar, not through it.
    job = write_job(tmp_path, rows=2000, latency_s=0.05, emulator_ipm=30)
    command = " ".join(
        [
            *(f"{k}={_quote(v)}" for k, v in cli_env().items() if k in _PASSED_ENV),
            *map(_quote, sfbatch_command(job, tmp_path / "out")),
        ]
    )
    tmux = ["tmux", "-L", f"sfbatch-test-{os.getpid()}", "-f", os.devnull]
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", "run", "-x", "150", "-y", "20"],
        check=True,
        env={**cli_env(), "TERM": "xterm-256color"},
    )
    try:
        subprocess.run([*tmux, "send-keys", "-t", "run", command, "Enter"], check=True)
        deadline = time.monotonic() + 20
        pane = ""
        while time.monotonic() < deadline:
            time.sleep(0.3)
            pane = subprocess.run(
                [*tmux, "capture-pane", "-p", "-t", "run"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            if "refused" in pane and any(BAR.match(line) for line in pane.splitlines()):
                break
        lines = [line for line in pane.splitlines() if line.strip()]
        bars = [m for line in lines if (m := BAR.match(line))]
        assert bars, pane
        assert bars[0]["total"] == "2,000"
        assert int(bars[0]["done"].replace(",", "")) > 0
        bar_at = next(i for i, line in enumerate(lines) if BAR.match(line))
        warning_at = next(i for i, line in enumerate(lines) if "refused" in line)
        assert warning_at < bar_at, pane  # the log line sits above the bar
        assert lines[warning_at].startswith("sfbatch: warning: the API refused"), pane
        assert not any("%|" in line and "warning" in line for line in lines), pane
        assert sum("%|" in line for line in lines) == 1, pane  # one bar, redrawn in place
    finally:
        subprocess.run([*tmux, "kill-server"], check=False, capture_output=True)


_PASSED_ENV = ("PYTHONPATH", "SFBATCH_STATUS_INTERVAL_S")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


# -- the pieces, in process ---------------------------------------------------------------


def snapshot(**overrides: Any) -> _Snapshot:
    fields: dict[str, Any] = {
        "elapsed_s": 600.0,
        "done": 1234,
        "total": 10_000,
        "bytes_read": 0,
        "total_bytes": None,
        "ok": 1200,
        "failed": 4,
        "invalid": 30,
        "skipped": 0,
        "retries": 3,
        "rate_limited": 2,
        "images": 1200,
        "images_per_min": 118.4,
        "limit_per_min": 120.0,
        "slowed_to_per_min": None,
        "eta_s": 4440.0,
        "cooldown_s": 0.0,
        "stopping": None,
    }
    return _Snapshot(**{**fields, **overrides})


def test_status_line_reads_as_in_the_issue() -> None:
    assert snapshot().status_line() == (
        "1,234/10,000 done (12%) · ok 1,200 · failed 4 · invalid 30 · retries 3 · "
        "118 img/min (limit 120) · 429s 2 · ETA 1h14m"
    )
    unknown = snapshot(total=None, total_bytes=1000, bytes_read=250, eta_s=None)
    assert unknown.status_line().startswith("1,234 done (25% of the input read) · ok 1,200")
    assert unknown.status_line().endswith("ETA ?")
    slowed = snapshot(slowed_to_per_min=60.0, cooldown_s=12.0, stopping="quota")
    line = slowed.status_line()
    assert "(limit 120, slowed to 60)" in line and "paused 12s" in line
    assert line.endswith("stopping (quota)")


def test_bar_text_drops_the_least_useful_fields_to_fit() -> None:
    full = snapshot().bar_text(200)
    assert full == (
        "1,234/10,000 · ok 1,200 · failed 4 · invalid 30 · retries 3 · "
        "118 img/min (limit 120) · 429s 2 · ETA 1h14m"
    )
    narrow = snapshot().bar_text(60)
    assert len(narrow) <= 60
    assert narrow.startswith("1,234/10,000 · ok 1,200 · failed 4") and "ETA 1h14m" in narrow
    assert "img/min" in narrow and "invalid" not in narrow


class FakePipeline:
    def __init__(self, out: Path, **config: Any) -> None:
        settings: dict[str, Any] = {
            "out_dir": out,
            "manifest_name": "manifest.jsonl",
            "summary_name": "summary.json",
            "rpm": None,
            "ipm": 120.0,
            "ipd": None,
            "defaults": SimpleNamespace(batch_size=None),
            **config,
        }
        self.config = SimpleNamespace(**settings)
        self.stats: dict[str, Any] = {"finished": 0, "skipped": 0, "rate_limited": 0}

    def statistics(self) -> dict[str, Any]:
        return dict(self.stats)


async def test_throttling_and_quota_warnings_at_most_once_a_minute(
    tmp_path: Path, sfbatch_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline = FakePipeline(tmp_path, ipd=400)
    progress = Progress(pipeline, sources=[], enabled=False, tty=False, status_interval_s=0.05)
    async with progress:
        assert progress.display == "status"
        for refused in (3, 5, 9):
            pipeline.stats.update(
                rate_limited=refused, limiter={"effective_ipm": 60.0, "cooldown_remaining_s": 4}
            )
            await asyncio.sleep(0.15)
        pipeline.stats["stopping"] = "quota"
        await asyncio.sleep(0.15)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "refused" in line]
    assert warnings == [
        "sfbatch: warning: the API refused 3 requests as over the rate limit in the last "
        "minute; sfbatch slowed to 60 images/min — lower --rpm/--ipm to match your account"
    ]
    assert err.count("the daily quota (400 images a day) is used up") == 1
    assert "run the same command tomorrow" in err
    assert "slowed to 60" in err and "paused 4s" in err  # the status lines show it too


def _result(
    outcome: str, *, run: dict[str, Any], errors: tuple[ReasonTally, ...] = (), **totals: int
) -> Any:
    summary = {"elapsed_s": 75.0, "run": run, "manifest": totals}
    return RunResult(outcome=outcome, summary=summary, errors=errors)  # type: ignore[arg-type]


def test_summary_explains_failures_and_the_next_step(
    tmp_path: Path, sfbatch_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    config = FakePipeline(tmp_path).config
    run = {"ok": 10, "failed": 2, "images": 20, "bytes": 2_500_000, "skipped": 5}
    errors = (
        ReasonTally(Reason("failed", 400, 20012), 2, "image_size not allowed"),
        ReasonTally(Reason("failed", None, "RequestTimeoutError"), 1, ""),
    )
    print_summary(_result("done", run=run, errors=errors, ok=15, failed=2), config)
    err = capsys.readouterr().err
    assert err.startswith(
        "sfbatch: finished in 1m15s: 10 ok (20 images, 2.4 MiB), 2 failed, "
        "5 skipped as done before\n"
    )
    assert "why:   2 failed: HTTP 400 (code 20012), e.g. image_size not allowed" in err
    assert "1 failed: request timeout" in err
    assert f"manifest {tmp_path / 'manifest.jsonl'}" in err
    assert "--retry-failed to try failed items again" in err

    print_summary(_result("quota", run={"ok": 3, "images": 3}, ok=3), config)
    err = capsys.readouterr().err
    assert err.startswith("sfbatch: stopped at the daily quota after 1m15s: 3 ok")
    assert "next:  the daily quota is used up: run the same command tomorrow to go on" in err
    assert "why:" not in err  # nothing failed, and no message to tell

    one_model = "no key can go on with Qwen/Qwen-Image: the key has reached its daily quota"
    quota = RunResult(outcome="quota", summary={"run": {"ok": 3}}, message=one_model)
    print_summary(quota, config)
    assert f"why:   {one_model}" in capsys.readouterr().err

    fatal = RunResult(
        outcome="fatal", summary={"run": {}}, message="401 the API key was not accepted"
    )
    print_summary(fatal, config)
    err = capsys.readouterr().err
    assert err.startswith("sfbatch: stopped after 0s: 401 the API key was not accepted: ")
    assert "fix that, then run the same command again to resume" in err


def test_the_bar_line_fills_the_terminal_width_and_no_more() -> None:
    for columns in (60, 98, 148):
        line = _bar_line(snapshot(), columns)
        assert len(line) == columns, line
        assert line.startswith("sfbatch  12%|█") and "| 1,234/10,000 · ok 1,200" in line
    full = _bar_line(snapshot(done=10_000, eta_s=0.0), 98)
    assert full.startswith("sfbatch 100%|") and " " not in full[13 : full.index("| ")]
    assert _bar_line(snapshot(total=None), 98).startswith("sfbatch 1,234 done · ok 1,200")


def test_log_records_print_above_the_live_line_and_it_is_drawn_again(
    sfbatch_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    line = LiveLine(sys.stderr)
    line.show("sfbatch  50%|█████     | 5/10")
    attach_live_line(line)
    try:
        logging.getLogger("sfbatch").warning("the API refused 3 requests")
    finally:
        attach_live_line(None)
    line.close()
    logging.getLogger("sfbatch").info("after the bar")
    err = capsys.readouterr().err
    clear = "\r\x1b[2K"
    assert err == (
        f"{clear}sfbatch  50%|█████     | 5/10"
        f"{clear}sfbatch: warning: the API refused 3 requests\nsfbatch  50%|█████     | 5/10"
        f"{clear}sfbatch  50%|█████     | 5/10\n"
        "sfbatch: after the bar\n"
    )


def test_the_endpoint_is_named_by_host_and_port_never_a_user_or_password() -> None:
    from sfbatch.progress import endpoint_name

    assert endpoint_name("http://u:sk-secret@127.0.0.1:8765/v1") == "the emulator at 127.0.0.1:8765"
    assert endpoint_name("http://[::1]:80/v1") == "the emulator at [::1]:80"
    assert endpoint_name("https://api.siliconflow.cn/v1") == "api.siliconflow.cn"
