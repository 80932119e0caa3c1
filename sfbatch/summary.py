"""The closing summary of ``sfbatch run``: what was made, what failed and why, what next.

Written to stderr after the live display is gone::

    sfbatch: finished in 1m15s: 10 ok (20 images, 2.4 MiB), 2 failed, 5 skipped as done before
      why:   2 failed: HTTP 400 (code 20012), e.g. image_size not allowed
      files: images in out/images, manifest out/manifest.jsonl, summary out/summary.json
      next:  2 items in the manifest failed: add --retry-failed to try failed items again

The reasons and their examples are the run's own (:attr:`RunResult.errors`, tallied by
the pipeline as it writes each record), never re-read from the manifest. With ``-q``
only a run that needs attention says anything; with ``--log-format json`` the summary
is one record carrying the numbers.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from sfbatch.figures import count, duration, human_bytes, plural
from sfbatch.logs import json_logging
from sfbatch.pipeline import RunResult

__all__ = ["print_summary"]

log = logging.getLogger("sfbatch")

_TOP_REASONS = 3
# Long enough for a whole list of allowed sizes in a model-rule message.
_EXAMPLE_CHARS = 400


def print_summary(result: RunResult, config: Any) -> None:
    """Write the summary of ``result``; ``config`` is the run's :class:`~sfbatch.RunConfig`."""
    summary = result.summary or {}
    out_dir = Path(config.out_dir)
    manifest = out_dir / config.manifest_name
    headline = _headline(result, summary)
    reasons = _reasons(result)
    if result.outcome == "quota" and result.message:
        reasons.insert(0, result.message)  # which model and keys ran out (others may have finished)
    images_to = getattr(getattr(config, "output", None), "images_to", None)
    files = (
        f"images in {images_to or out_dir / 'images'}, manifest {manifest}, "
        f"summary {out_dir / config.summary_name}"
    )
    hints = _next_steps(result, summary)
    if json_logging():
        level = logging.INFO if result.exit_code == 0 else logging.WARNING
        if result.outcome == "fatal":
            level = logging.ERROR
        log.log(
            level,
            "%s",
            "; ".join([headline, *reasons, files, *hints]),
            extra={
                "event": "summary",
                "outcome": result.outcome,
                "exit_code": result.exit_code,
                "run": summary.get("run", {}),
                "errors": summary.get("errors", {}),
                "manifest_totals": summary.get("manifest", {}),
                "out_dir": str(out_dir),
                "manifest": str(manifest),
                "summary_file": str(out_dir / config.summary_name),
                "next": hints,
            },
        )
        return
    if not log.isEnabledFor(logging.INFO):
        if result.exit_code != 0:
            level = logging.ERROR if result.outcome == "fatal" else logging.WARNING
            log.log(level, "%s", "; ".join([headline, *hints, f"manifest {manifest}"]))
        return
    lines = [f"sfbatch: {headline}"]
    lines += _labelled("why:", reasons)
    lines += _labelled("files:", [files])
    lines += _labelled("next:", hints)
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()


def _labelled(label: str, texts: list[str]) -> list[str]:
    return [f"  {label if i == 0 else '':<7}{text}" for i, text in enumerate(texts)]


def _headline(result: RunResult, summary: dict[str, Any]) -> str:
    run = summary.get("run", {})
    elapsed = duration(float(summary.get("elapsed_s") or 0.0))
    made = (
        f"{count(run.get('ok', 0))} ok ({plural(run.get('images', 0), 'image')}, "
        f"{human_bytes(run.get('bytes', 0))})"
    )
    if not run.get("ok"):
        made = "nothing made"
    parts = [made]
    for key in ("failed", "invalid"):
        if run.get(key):
            parts.append(f"{count(run[key])} {key}")
    if run.get("duplicate"):
        parts.append(plural(run["duplicate"], "duplicate"))
    parts += _skipped(run)
    if run.get("regenerated_expired"):  # paid twice: say so
        parts.append(f"{count(run['regenerated_expired'])} generated again (their URLs expired)")
    if pending := (summary.get("manifest") or {}).get("generated"):
        parts.append(f"{count(pending)} paid and not downloaded yet (the next run downloads them)")
    what = {
        "done": f"finished in {elapsed}",
        "quota": f"stopped at the daily quota after {elapsed}",
        "interrupted": f"interrupted after {elapsed}",
        "fatal": f"stopped after {elapsed}: {result.message or 'the API refused the job'}",
        "input_error": f"stopped after {elapsed}: {result.message}",
        "blocked": f"stopped after {elapsed}: {result.message}",
    }.get(result.outcome, f"{result.outcome} after {elapsed}")
    return f"{what}: {', '.join(parts)}"


def _skipped(run: dict[str, Any]) -> list[str]:
    """Rows earlier runs finished, by how: a failed row is not "done"."""
    skipped = int(run.get("skipped") or 0)
    by_status = dict(run.get("skipped_as") or {})
    if sum(by_status.values()) != skipped:  # a summary without the split
        by_status = {"ok": skipped} if skipped else {}
    words = {"ok": "done", "failed": "failed", "invalid": "invalid", "duplicate": "duplicates"}
    order = [*words, *sorted(set(by_status) - set(words))]
    return [
        f"{count(by_status[status])} skipped as {words.get(status, status)} before"
        for status in order
        if by_status.get(status)
    ]


def _reasons(result: RunResult) -> list[str]:
    tallies = result.errors
    lines = []
    for tally in tallies[:_TOP_REASONS]:
        reason = tally.reason
        if reason.status == "invalid":
            text = plural(tally.count, "invalid row")
        else:
            text = f"{count(tally.count)} {reason.status}: {reason.label}"
        if tally.example:
            text += f", e.g. {_shorten(tally.example, _EXAMPLE_CHARS)}"
        lines.append(text)
    rest = len(tallies) - _TOP_REASONS
    if rest > 0:
        lines.append(f"and {rest} other kind{'s' if rest != 1 else ''} of error (see the manifest)")
    return lines


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _next_steps(result: RunResult, summary: dict[str, Any]) -> list[str]:
    totals = summary.get("manifest") or {}
    failed, invalid = int(totals.get("failed", 0)), int(totals.get("invalid", 0))
    hints = []
    if result.outcome == "quota":
        hints.append("the daily quota is used up: run the same command tomorrow to go on")
    elif result.outcome == "interrupted":
        hints.append("run the same command again to resume")
    elif result.outcome in ("fatal", "input_error", "blocked"):
        hints.append("fix that, then run the same command again to resume")
    if failed:
        hints.append(
            f"{plural(failed, 'item')} in the manifest failed: "
            "add --retry-failed to try failed items again"
        )
    if invalid:
        hints.append(
            f"{plural(invalid, 'input row')} invalid: fix {'it' if invalid == 1 else 'them'} "
            "(file:line is in each record's error) and run the same command again"
        )
    if not hints:
        hints.append("all done: running the same command again makes nothing new")
    return hints
