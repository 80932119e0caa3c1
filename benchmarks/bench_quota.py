#!/usr/bin/env python3
"""Issue 12's quota figures, measured on the engine: ``python -m sfbatch run`` against an
emulator process, in real time.

Every scenario is one ``sfbatch run PROMPTS --out DIR`` (default flags plus the ones
named) against its own ``sfbatch emulator`` process on its own loopback port; all
scenarios run at once (they are paced by the limits and the latency, not the CPU), so the
whole figure takes about 6-7 minutes. Rates, 429 shares and stalls come from the
emulator's own account (``GET /_admissions``: when it admitted or refused what, for which
key), the window and the hint from the run's ``summary.json`` and its log:

- **quota fill**: latency 10 ± 5 s, IPM 300, 150 prompts, ``--ipm 300``: the share of the
  limit admitted after the first window of latency (15 s), against ``--concurrency 4``
  (with the hint the engine prints) and ``--concurrency 64``;
- **unknown limit**: IPM 120, latency 10 ± 5 s, no limit flags: when every trailing
  minute holds >= 90 % of the limit, the 429 share, the longest time nothing was sent;
  without and with Retry-After; against the run told the right limit (``--ipm 120``),
  and told 4x the limit (``--ipm 480``);
- **three keys** of IPM 60 (``SILICONFLOW_API_KEYS``), ``--ipm 60``: key 1 has 120
  images of its daily quota left; the total against 180/min while all three go, then
  keys 0 and 2 against 60/min each once key 1 is set aside; against one key.

::

    python benchmarks/bench_quota.py            # the figure (about 7 minutes)
    python benchmarks/bench_quota.py --smoke    # everything shrunk: does it still run?
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_util import (
    KEY,
    EmulatorProcess,
    child_env,
    fmt,
    http_json,
    table,
    work_dir,
    write_prompts,
)

MINUTE_MS = 60_000
FIRST_WINDOW_MS = 15_000  # the first window of latency at 10 ± 5 s
KEYS = (KEY, "sk-emulator-b", "sk-emulator-c")


@dataclass(frozen=True)
class Scenario:
    name: str
    prompts: int
    emulator: dict[str, Any]
    flags: tuple[str, ...] = ()
    keys: tuple[str, ...] = (KEY,)
    limit_per_min: float = 0.0  # the server's limit, per key


@dataclass
class Outcome:
    scenario: Scenario
    exit_code: int
    wall_s: float
    # (ms since the first decision, key index, images, "ok" or the refusing limit)
    admissions: list[tuple[int, int, int, str]]
    summary: dict[str, Any]
    log_tail: str
    hint: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)


def scenarios(mode: str) -> list[Scenario]:
    smoke = mode == "smoke"
    latency = (
        {"latency": 1.0, "latency_jitter": 0.5}
        if smoke
        else {
            "latency": 10.0,
            "latency_jitter": 5.0,
        }
    )
    n = (lambda full: max(8, full // 40)) if smoke else (lambda full: full)
    fill = {**latency, "ipm": 300, "seed": 1}
    unknown = {**latency, "ipm": 120, "seed": 2}
    keys = {
        **latency,
        "ipm": 60,
        "key": list(KEYS[1:]),
        "key_limit": [f"{KEYS[1]}:ipm=60,ipd={3 if smoke else 120}"],
        "seed": 3,
    }
    return [
        Scenario("fill auto", n(150), fill, ("--ipm", "300"), limit_per_min=300),
        Scenario("fill fixed 4", n(150), fill, ("--ipm", "300", "--concurrency", "4"),
                 limit_per_min=300),
        Scenario("fill fixed 64", n(150), fill, ("--ipm", "300", "--concurrency", "64"),
                 limit_per_min=300),
        Scenario("unknown", n(480), unknown, limit_per_min=120),
        Scenario("unknown retry-after", n(480), {**unknown, "retry_after": 0},
                 limit_per_min=120),
        Scenario("told right", n(480), unknown, ("--ipm", "120"), limit_per_min=120),
        Scenario("told 4x", n(480), unknown, ("--ipm", "480"), limit_per_min=120),
        Scenario("three keys", n(600), keys, ("--ipm", "60"), keys=KEYS, limit_per_min=60),
        Scenario("one key", n(240), {**latency, "ipm": 60, "seed": 4}, ("--ipm", "60"),
                 limit_per_min=60),
    ]  # fmt: skip


class Run:
    """One scenario in flight: its emulator process and its ``sfbatch run`` process."""

    def __init__(self, scenario: Scenario, tmp: Path, stack: contextlib.ExitStack) -> None:
        self.scenario = scenario
        self.emulator = stack.enter_context(EmulatorProcess(**scenario.emulator))
        slug = scenario.name.replace(" ", "-")
        prompts = write_prompts(tmp / f"{slug}.txt", scenario.prompts)
        self.out = tmp / slug
        env = child_env()
        if len(scenario.keys) > 1:
            del env["SILICONFLOW_API_KEY"]
            env["SILICONFLOW_API_KEYS"] = ",".join(scenario.keys)
        cmd = [sys.executable, "-m", "sfbatch", "run", str(prompts), "--out", str(self.out)]
        cmd += ["--base-url", self.emulator.base_url, "--no-progress", *scenario.flags]
        self.log = stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 (closed by stack)
        self.started = time.monotonic()
        self.ended: float | None = None
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        stack.callback(self._kill)

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def done(self) -> bool:
        if self.ended is None and self.proc.poll() is not None:
            self.ended = time.monotonic()
        return self.ended is not None

    def finish(self) -> Outcome:
        """The outcome of a run that is done (killed first if it is not)."""
        if not self.done():
            self._kill()
            self.done()
        code = self.proc.returncode
        wall_s = (self.ended or time.monotonic()) - self.started
        self.log.seek(0)
        log_text = self.log.read().decode(errors="replace")
        raw = http_json(self.emulator.root + "/_admissions", timeout=30)
        start = raw[0][0] if raw else 0
        index = {key: i for i, key in enumerate(self.scenario.keys)}
        admissions = [(t - start, index[key], images, what) for t, key, images, what in raw]
        summary_path = self.out / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        hint = next((line for line in log_text.splitlines() if "would fill it" in line), None)
        return Outcome(self.scenario, code, wall_s, admissions, summary, log_text[-2000:], hint)


# --- what the emulator's account says ------------------------------------------------------


def admitted(outcome: Outcome, key: int | None = None) -> list[tuple[int, int]]:
    """(ms, images) of each admitted request (of one key)."""
    return [
        (t, images)
        for t, k, images, what in outcome.admissions
        if what == "ok" and (key is None or k == key)
    ]


def rate_per_min(events: Sequence[tuple[int, int]], start_ms: float, end_ms: float) -> float:
    """Images per minute admitted in ``(start_ms, end_ms]``."""
    span = end_ms - start_ms
    if span <= 0:
        return math.nan
    return sum(images for t, images in events if start_ms < t <= end_ms) * MINUTE_MS / span


def sustained_from_s(events: Sequence[tuple[int, int]], limit: float) -> float:
    """The first second from which every trailing minute, until the last admission, holds
    >= 90 % of ``limit``; inf if none does."""
    per_s: dict[int, int] = {}
    for t, images in events:
        per_s[t // 1000] = per_s.get(t // 1000, 0) + images
    last = max(per_s, default=0)
    held = 0  # images in the trailing minute (second - 59, second]
    ok: list[bool] = []
    for second in range(last + 1):
        held += per_s.get(second, 0) - per_s.get(second - 60, 0)
        ok.append(second >= 59 and held >= 0.9 * limit)
    first = math.inf
    for second in range(last, -1, -1):
        if not ok[second]:
            break
        first = float(second + 1)
    return first


def longest_stall_s(outcome: Outcome) -> float:
    """The longest time between two requests reaching the server."""
    times = [t for t, _, _, _ in outcome.admissions]
    return max((b - a for a, b in itertools.pairwise(times)), default=0) / 1000


def share_429(outcome: Outcome) -> float:
    decisions = outcome.admissions
    refused = sum(1 for _, _, _, what in decisions if what in ("IPM", "RPM"))
    return refused / max(1, len(decisions))


def fill_figures(o: Outcome) -> dict[str, Any]:
    events = admitted(o)
    last = max((t for t, _ in events), default=0)
    return {
        "share_after_first_window": rate_per_min(events, FIRST_WINDOW_MS, last)
        / o.scenario.limit_per_min,
        "images": sum(images for _, images in events),
        "span_s": last / 1000,
        "share_429": share_429(o),
        "peak_window": max(
            (w["size"] for w in [o.summary.get("window") or {}] if "size" in w), default=None
        ),
        "hint": o.hint,
    }


def unknown_figures(o: Outcome) -> dict[str, Any]:
    events = admitted(o)
    last = max((t for t, _ in events), default=0)
    limiter = [k for k in o.summary.get("keys", []) if k.get("key_index") == 0]
    return {
        "sustained_90_from_s": sustained_from_s(events, o.scenario.limit_per_min),
        "share_429": share_429(o),
        "longest_stall_s": longest_stall_s(o),
        "share_after_2_min": rate_per_min(events, 2 * MINUTE_MS, last) / o.scenario.limit_per_min,
        "span_s": last / 1000,
        "target_rate_per_min": limiter[0].get("target_rate_per_min") if limiter else None,
    }


def keys_figures(o: Outcome) -> dict[str, Any]:
    limit = o.scenario.limit_per_min
    events = admitted(o)
    last = max((t for t, _ in events), default=0)
    if len(o.scenario.keys) == 1:
        return {"share": rate_per_min(events, 0, last) / limit, "span_s": last / 1000}
    out_ms = max((t for t, _ in admitted(o, key=1)), default=0)
    after = {
        k: rate_per_min(admitted(o, key=k), out_ms, last) / limit
        for k in range(len(o.scenario.keys))
        if k != 1
    }
    return {
        "share_of_3_while_all_go": rate_per_min(events, 0, out_ms) / (3 * limit),
        "key1_out_at_s": out_ms / 1000,
        "others_share_after": after,
        "share_429": share_429(o),
        "daily_429s": sum(1 for *_, what in o.admissions if what == "IPD"),
        "span_s": last / 1000,
    }


FIGURES = {"fill": fill_figures, "unknown": unknown_figures, "told": unknown_figures,
           "three": keys_figures, "one": keys_figures}  # fmt: skip


def measure(mode: str = "full", log: Any = print) -> dict[str, Any]:
    chosen = scenarios(mode)
    timeout_s = 120.0 if mode == "smoke" else 900.0
    started = time.monotonic()
    with work_dir("quota") as tmp, contextlib.ExitStack() as stack:
        runs = [Run(s, tmp, stack) for s in chosen]
        log(f"bench_quota: {len(runs)} runs started")
        running = list(runs)
        while running and time.monotonic() - started < timeout_s:
            time.sleep(0.2)
            for run in [run for run in running if run.done()]:
                running.remove(run)
                log(f"bench_quota: {run.scenario.name} done ({run.ended - run.started:.0f} s)")
        outcomes = [run.finish() for run in runs]
    for o in outcomes:
        o.figures = FIGURES[o.scenario.name.split()[0]](o)
    return {
        "mode": mode,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": time.monotonic() - started,
        "runs": {
            o.scenario.name: {
                "exit_code": o.exit_code,
                "wall_s": o.wall_s,
                "prompts": o.scenario.prompts,
                "flags": " ".join(o.scenario.flags) or "(none)",
                **o.figures,
                "log_tail": None if o.exit_code in (0, 4) else o.log_tail,
            }
            for o in outcomes
        },
    }


def _pct(x: Any) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f} %"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and a == a and b == b else "n/a"


def _yes(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def rows(r: dict[str, Any]) -> list[list[str]]:
    runs = r["runs"]
    auto, f4, f64 = runs["fill auto"], runs["fill fixed 4"], runs["fill fixed 64"]
    out = [
        [
            "quota fill: % of IPM 300 after the first 15 s, auto (vs fixed 4)",
            _pct(auto["share_after_first_window"]),
            _pct(f4["share_after_first_window"]),
            _ratio(auto["share_after_first_window"], f4["share_after_first_window"]),
            ">= 95 %",
            _yes(auto["share_after_first_window"] >= 0.95),
        ],
        [
            "quota fill: same, auto (vs fixed 64)",
            _pct(auto["share_after_first_window"]),
            _pct(f64["share_after_first_window"]),
            _ratio(auto["share_after_first_window"], f64["share_after_first_window"]),
            ">= 95 %",
            _yes(auto["share_after_first_window"] >= 0.95),
        ],
    ]
    told = runs["told right"]
    for name in ("unknown", "unknown retry-after", "told 4x"):
        u = runs[name]
        label = {
            "unknown": "unknown IPM 120, no Retry-After",
            "told 4x": "told 4x (--ipm 480)",
            "unknown retry-after": "unknown IPM 120, Retry-After",
        }[name]
        target = name != "told 4x"
        out += [
            [
                f"{label}: s to sustain >= 90 % (vs told --ipm 120)",
                fmt(u["sustained_90_from_s"]),
                fmt(told["sustained_90_from_s"]),
                "-",
                "<= 90 s" if target else "-",
                _yes(u["sustained_90_from_s"] <= 90) if target else "n/a",
            ],
            [
                f"{label}: 429 share",
                _pct(u["share_429"]),
                _pct(told["share_429"]),
                "-",
                "< 5 %" if target else "-",
                _yes(u["share_429"] < 0.05) if target else "n/a",
            ],
            [
                f"{label}: longest stall, s",
                fmt(u["longest_stall_s"], 1),
                fmt(told["longest_stall_s"], 1),
                "-",
                "<= 10 s" if target else "-",
                _yes(u["longest_stall_s"] <= 10) if target else "n/a",
            ],
        ]
    three, one = runs["three keys"], runs["one key"]
    after = three["others_share_after"]
    out += [
        ["three keys IPM 60: % of 180/min while all go (vs one key of 60)",
         _pct(three["share_of_3_while_all_go"]), _pct(one["share"]), "-", ">= 95 %",
         _yes(three["share_of_3_while_all_go"] >= 0.95)],
        [f"three keys: keys 0, 2 after key 1's daily quota (out at {three['key1_out_at_s']:.0f} s)",
         ", ".join(_pct(v) for v in after.values()), _pct(one["share"]), "-", ">= 95 % each",
         _yes(all(v >= 0.95 for v in after.values()))],
    ]  # fmt: skip
    return out


def report(r: dict[str, Any]) -> str:
    lines = [f"## bench_quota ({r['mode']}, {r['date']}, {r['wall_s']:.0f} s wall)", ""]
    for name, run in r["runs"].items():
        details = {k: v for k, v in run.items() if k not in ("log_tail",)}
        lines.append(f"- **{name}**: " + "; ".join(f"{k} {_detail(v)}" for k, v in details.items()))
        if run.get("log_tail"):
            lines.append("  log tail:\n" + run["log_tail"])
    lines += ["", table(rows(r), ["figure", "sfbatch", "baseline", "ratio", "target", "met?"])]
    return "\n".join(lines)


def _detail(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_detail(v)}" for k, v in value.items())
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny runs: does it still run?")
    parser.add_argument("--json", type=Path, help="write every number to this file")
    args = parser.parse_args(argv)
    result = measure("smoke" if args.smoke else "full", log=lambda m: print(m, file=sys.stderr))
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    failed = [n for n, run in result["runs"].items() if run["exit_code"] not in (0, 4)]
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
