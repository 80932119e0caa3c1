"""The manifest record: one type, one builder, the writer's field order; reasons and figures."""

from __future__ import annotations

import statistics
from pathlib import Path, PurePosixPath

import orjson
import pytest

import sfbatch
from sfbatch import errors
from sfbatch.emulator import Emulator
from sfbatch.figures import Reservoir, duration, human_bytes, percentile, percentiles
from sfbatch.manifest import (
    FIELD_ORDER,
    FRONT_FIELDS,
    FRONT_RE,
    ManifestWriter,
    billed_on_day,
    iter_records,
    safe_relpath,
)
from sfbatch.reasons import Reason, message_class


async def test_records_on_disk_keep_the_field_order_the_resume_reader_needs(
    tmp_path: Path, emulator: Emulator
) -> None:
    config = sfbatch.RunConfig(
        out_dir=tmp_path, api_key=emulator.api_key, base_url=emulator.base_url
    )
    rows = ["a cat", {"prompt": "a dog", "batch_size": 2}, {"prompt": "x", "batch_size": 9}]
    yielded = [record async for record in sfbatch.generate(rows, config)]
    lines = (tmp_path / "manifest.jsonl").read_bytes().splitlines()
    assert len(lines) == 3
    for raw, record in zip(lines, yielded, strict=True):
        assert FRONT_RE.match(raw), raw  # the fast resume reader takes the front fields
        on_disk = orjson.loads(raw)
        assert list(on_disk) == [key for key in FIELD_ORDER if key in on_disk]
        assert list(on_disk)[:5] == list(FRONT_FIELDS)
        assert on_disk == record  # generate() yields exactly the line
    by_line = {r["line"]: r for r in yielded}
    assert [by_line[n]["status"] for n in (1, 2, 3)] == ["ok", "ok", "invalid"]
    assert len(by_line[2]["images"]) == 2
    assert by_line[3]["error"] == {
        "status": None,
        "code": "invalid",
        "message": "<records>:3: batch_size must be 1..4, got 9",
    }


def test_the_writer_owns_the_order_and_keeps_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    scrambled = {"billed_images": 2, "extra": 1, "finished_at": "t", "status": "ok", "id": "a"}
    with ManifestWriter(path) as writer:
        writer.append(scrambled)  # type: ignore[arg-type]
    raw = path.read_bytes()
    assert raw == b'{"id":"a","status":"ok","finished_at":"t","billed_images":2,"extra":1}\n'
    assert [r["id"] for r in iter_records(path)] == ["a"]


def test_field_order_is_the_documented_contract() -> None:
    assert (
        *("id", "status", "finished_at", "billed_images", "fingerprint"),
        *("line", "file", "variation"),
        *("prompt", "negative_prompt", "model", "image_size", "batch_size"),
        *("num_inference_steps", "guidance_scale", "prompt_enhancement", "inputs"),
        "requested_seed",
        *("seed", "timings", "images", "attempts", "latency_s", "trace_id", "key_index", "error"),
        *("duplicate_of", "urls", "generated_at"),
    ) == FIELD_ORDER


# -- reasons ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "key", "label"),
    [
        (
            {"status": 400, "code": 20012, "message": "m"},
            "failed: 400 20012",
            "HTTP 400 (code 20012)",
        ),
        ({"status": 503, "code": None, "message": "m"}, "failed: 503", "HTTP 503"),
        (
            errors.RequestTimeoutError("slow").to_record(),
            "failed: RequestTimeoutError",
            "request timeout",
        ),
        (
            errors.ImageTooLargeError("big").to_record(),
            "failed: ImageTooLargeError",
            "image too large",
        ),
        ({"status": None, "code": None, "message": "m"}, "failed: unknown", "failed"),
        (None, "failed: unknown", "failed"),
    ],
)
def test_reason_key_and_label(error: dict[str, object] | None, key: str, label: str) -> None:
    reason = Reason.of("failed", error)
    assert (reason.key, reason.label) == (key, label)


def test_reason_groups_and_describes_invalid_rows() -> None:
    error = {
        "status": None,
        "code": "invalid",
        "message": "p.txt:3: batch_size must be 1..4, got 9",
    }
    reason = Reason.of("invalid", error)
    assert reason.key == "invalid: invalid"
    assert reason.group(error["message"]) == "invalid: batch_size must be N..N, got N"  # type: ignore[arg-type]
    assert reason.describe("p.txt:3: bad") == "invalid: p.txt:3: bad"
    assert Reason.of("failed", None).group("") == "(no error recorded)"
    assert message_class("trace 0123456789abcdef0123 failed") == "trace … failed"


# -- figures and small helpers ----------------------------------------------------------


def test_percentile_is_statistics_quantiles_inclusive() -> None:
    values = [float((i * 7919) % 1000) / 7 for i in range(1, 502)]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    for k in range(1, 100):
        assert percentile(values, k / 100) == pytest.approx(cuts[k - 1], abs=1e-9)
    assert percentile([], 0.5) is None and percentile([3.0], 0.99) == 3.0
    assert percentiles([1.0, 2.0, 3.0, 4.0], 0.5, 0.95) == {"p50": 2.5, "p95": 3.85}


def test_reservoir_is_exact_below_its_size_and_bounded_above() -> None:
    small = Reservoir(size=1000)
    for v in range(1, 101):
        small.add(float(v))
    assert small.percentiles(0.5, 0.95) == percentiles(map(float, range(1, 101)), 0.5, 0.95)
    big = Reservoir(size=100)
    for v in range(10_000):
        big.add(float(v))
    assert len(big) == 10_000 and len(big._values) == 100
    p50 = big.percentiles(0.5)["p50"]
    assert p50 is not None and 2_000 < p50 < 8_000


def test_byte_sizes_and_durations() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1536, 2_500_000, 5 << 40)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "2.4 MiB",
        "5.0 TiB",
    ]
    assert [duration(s) for s in (42, 185, 4440, 183600)] == ["42s", "3m05s", "1h14m", "2d03h"]


def test_path_safety_and_billed_on_day() -> None:
    assert safe_relpath("images/000/a.png") == PurePosixPath("images/000/a.png")
    for bad in ("/etc/passwd", "../x.png", "images/../../x", "a\\b", "", None, 3):
        assert safe_relpath(bad) is None, bad
    assert billed_on_day(4, "2026-11-24T01:00:00.000Z", "2026-11-23T16:00:00.000Z") == 4
    assert billed_on_day(4, "2026-11-23T15:59:59.999Z", "2026-11-23T16:00:00.000Z") == 0
    assert billed_on_day(None, "2026-11-24T01:00:00.000Z", "") == 0
