"""The benchmarks still run: ``benchmarks/run_all --quick --smoke`` prints every table row,
and ``benchmarks/bench_quota.py --smoke`` (the engine against emulator processes) every
quota row.

No timing is asserted (CI machines are noisy); only that every figure ran against the
emulator and reported. The baselines need ``requests`` (the ``bench`` extra); without
it the test is skipped. img2dataset and pyinstrument are optional: run_all says so and
carries on without that baseline or the profile.
"""

from __future__ import annotations

import pytest
from conftest import run_benchmark

pytest.importorskip("requests", reason="the baselines need requests (pip install '.[bench]')")


ROWS = (
    "| 1 throughput, items/s (vs sequential)",
    "| 1 CPU-s per 1,000 items",
    "| 2 latency",
    "| 3 RPM 600 known",
    "| 3 IPM 1,200 known",
    "| 3 told 4x the RPM",
    "| 4 peak RSS",
    "| 4 resume over",
    "| 5 downloads",
    "| 6 emulator: POST requests/s",
    "| 7 CPU-ms per item",
)


@pytest.mark.timeout(180)
def test_run_all_smoke_prints_every_row() -> None:
    proc = run_benchmark("run_all", "--quick", "--smoke", timeout_s=170)
    out = proc.stdout
    assert "## summary: benchmarks/run_all --quick --smoke (smoke mode)" in out
    assert "| figure" in out and "| met?" in out
    for row in ROWS:
        assert row in out, f"missing row {row!r} in:\n{out[-4000:]}"
    for figure in ("figure 1", "figure 2+3", "figure 4", "figure 5", "figure 6", "figure 7"):
        assert f"## {figure}:" in out


QUOTA_ROWS = (
    "| quota fill: % of IPM 300 after the first 15 s, auto (vs fixed 4)",
    "| unknown IPM 120, no Retry-After: s to sustain",
    "| unknown IPM 120, Retry-After: 429 share",
    "| told 4x (--ipm 480): longest stall",
    "| three keys IPM 60: % of 180/min while all go",
    "| three keys: keys 0, 2 after key 1's daily quota",
)


@pytest.mark.timeout(120)
def test_bench_quota_smoke_runs_the_engine_and_prints_every_row() -> None:
    proc = run_benchmark("bench_quota.py", "--smoke", timeout_s=110)
    for row in QUOTA_ROWS:
        assert row in proc.stdout, f"missing row {row!r} in:\n{proc.stdout[-4000:]}"
    # the engine said why fixed concurrency 4 holds the rate down
    assert "concurrency 4 holds the rate below the limit" in proc.stdout
