"""``sfbatch gallery``: page structure, escaping, paging, thumbnails, and a real browser."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sfbatch import gallery
from sfbatch.cli import main
from sfbatch.gallery import build_gallery
from sfbatch.manifest import ManifestWriter

Image = pytest.importorskip("PIL.Image")

ROOT = Path(__file__).resolve().parents[1]
EVIL = '<script>alert("x")</script> & <b>bold</b>'
KOLORS = "Kwai-Kolors/Kolors"
SD = "stabilityai/stable-diffusion-3-5-large"


def png(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def store(out: Path, row_id: str, data: bytes, index: int = 0) -> dict[str, Any]:
    rel = f"images/{(int(row_id) // 1000) % 1000:03d}/{row_id}_{index}.png"
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    (out / rel).write_bytes(data)
    return {"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def record(
    row_id: str,
    status: str,
    *,
    model: str | None = KOLORS,
    prompt: str | None = None,
    images: list[dict[str, Any]] | None = None,
    error: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A manifest record as ARCHITECTURE.md has it, FRONT_FIELDS first."""
    line = int(row_id)
    return {
        "id": row_id,
        "status": status,
        "finished_at": "2026-11-24T03:00:00.000Z",
        "billed_images": len(images or ()),
        "line": line,
        "file": "prompts.txt",
        "variation": 0,
        "prompt": prompt if prompt is not None else f"a red fox, number {line}",
        "negative_prompt": None,
        "model": model,
        "image_size": "1024x768",
        "batch_size": max(1, len(images or ())),
        "num_inference_steps": 20,
        "guidance_scale": 7.5,
        "prompt_enhancement": False,
        "requested_seed": 1000 + line,
        "seed": 1000 + line if status == "ok" else None,
        "timings": {"inference": 1.25} if status == "ok" else None,
        "images": images or [],
        "attempts": 1,
        "latency_s": 2.5,
        "trace_id": "trace",
        "error": error,
        **extra,
    }


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """Eight items: 4 ok (one with a batch of 2, two models), failed, invalid, generated, dup."""
    out = tmp_path / "out"
    colors = [(200, 40, 40), (40, 160, 60), (40, 60, 200), (220, 180, 30), (120, 40, 160)]
    records = [
        record("000000001", "ok", images=[store(out, "000000001", png(colors[0]))]),
        record(
            "000000002",
            "ok",
            model=SD,
            images=[
                store(out, "000000002", png(colors[1])),
                store(out, "000000002", png(colors[2]), index=1),
            ],
        ),
        record("000000003", "ok", prompt=EVIL, images=[store(out, "000000003", png(colors[3]))]),
        record(
            "000000004",
            "failed",
            prompt=EVIL,
            error={"status": 400, "code": 20012, "message": f"bad prompt: {EVIL}"},
        ),
        record(
            "000000005",
            "invalid",
            model=None,
            error={"status": None, "code": "invalid", "message": "prompts.txt:5: bad size"},
        ),
        record("000000006", "generated", urls=["https://x/y.png"], generated_at=1.0),
        record("000000007", "duplicate", duplicate_of="000000001"),
        record("001000008", "ok", model=SD, images=[store(out, "001000008", png(colors[4]))]),
    ]
    with ManifestWriter(out / "manifest.jsonl") as writer:
        for rec in records:
            writer.append(rec)
    return out


def cards(page: str) -> list[str]:
    return re.findall(r'<div class="card"[^>]*>', page)


# -- structure (no browser) ------------------------------------------------------------


def test_pages_cards_and_index(out: Path) -> None:
    result = build_gallery(out, page_size=3)
    gdir = out / "gallery"
    assert result.pages == 3 and result.cards == 8
    assert sorted(p.name for p in gdir.glob("*.html")) == [
        "index.html",
        "page-0001.html",
        "page-0002.html",
        "page-0003.html",
    ]
    assert (gdir / "index.html").read_text() == (gdir / "page-0001.html").read_text()
    pages = [(gdir / f"page-{n:04d}.html").read_text() for n in (1, 2, 3)]
    assert [len(cards(p)) for p in pages] == [3, 3, 2]
    every = [c for p in pages for c in cards(p)]
    statuses = [re.search(r'data-status="([^"]*)"', c).group(1) for c in every]  # type: ignore[union-attr]
    assert statuses == ["ok", "ok", "ok", "failed", "invalid", "generated", "duplicate", "ok"]
    assert (
        '<div class="card" data-status="ok" data-model="Kwai-Kolors/Kolors" id="c-000000001">'
        in pages[0]
    )
    # Pager: page 2 links back to 1 and on to 3; page 1 has no prev; filters and count exist.
    assert 'href="page-0001.html"' in pages[1] and 'href="page-0003.html"' in pages[1]
    assert "‹ prev</span>" in pages[0]
    for page in pages:
        assert '<span id="shown-count">' in page and 'id="model"' in page
        assert 'name="status" value="failed"' in page
        assert "http://" not in page and "https://" not in page  # nothing remote


def test_card_details(out: Path) -> None:
    build_gallery(out, page_size=100)
    page = (out / "gallery" / "index.html").read_text()
    first = page[page.index('id="c-000000001"') : page.index('id="c-000000002"')]
    assert "a red fox, number 1" in first and "seed 1001" in first
    assert "Kwai-Kolors/Kolors" in first and "1024x768" in first and "1.25 s" in first
    assert 'href="../images/000/000000001_0.png"' in first
    assert 'src="thumbs/000/000000001_0.jpg"' in first
    second = page[page.index('id="c-000000002"') : page.index('id="c-000000003"')]
    assert second.count("<img") == 2  # a batch of two
    # the reason's label, as the closing summary shows it (sfbatch.reasons), then the message
    assert "HTTP 400 (code 20012): bad prompt:" in page
    assert "invalid: prompts.txt:5: bad size" in page
    assert 'data-model="(none)"' in page and '<option value="(none)">' in page
    dup = page[page.index('id="c-000000007"') : page.index('id="c-001000008"')]
    assert 'duplicate of <a href="page-0001.html#c-000000001">000000001</a>' in dup


def test_user_text_is_escaped(out: Path) -> None:
    build_gallery(out, page_size=100)
    page = (out / "gallery" / "index.html").read_text()
    assert "<script>alert" not in page and "<b>bold</b>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    assert page.count("<script>") == 1  # only the page's own filter script


def test_thumbnails_are_made_once_and_reused(out: Path) -> None:
    first = build_gallery(out)
    assert first.thumbs_enabled
    assert (first.thumbs_made, first.thumbs_reused, first.thumbs_failed) == (5, 0, 0)
    thumb = out / "gallery" / "thumbs" / "000" / "000000001_0.jpg"
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and max(im.size) <= 256
    stamp = thumb.stat().st_mtime_ns

    second = build_gallery(out)
    assert (second.thumbs_made, second.thumbs_reused) == (0, 5)
    assert thumb.stat().st_mtime_ns == stamp

    # A regenerated image is newer than its thumbnail: only that one is made again.
    image = out / "images" / "000" / "000000002_0.png"
    later = thumb.stat().st_mtime_ns + 5_000_000_000
    os.utime(image, ns=(later, later))
    third = build_gallery(out)
    assert (third.thumbs_made, third.thumbs_reused) == (1, 4)

    # Another thumbnail size makes every thumbnail stale.
    fourth = build_gallery(out, thumb_px=32)
    assert fourth.thumbs_made == 5
    with Image.open(thumb) as im:
        assert max(im.size) <= 32


def test_thumbnails_in_worker_processes(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gallery, "_POOL_MIN_JOBS", 1)
    (out / "images" / "000" / "000000003_0.png").write_bytes(b"not an image at all")
    seen: list[tuple[int, int]] = []
    result = build_gallery(out, workers=2, progress=lambda done, total: seen.append((done, total)))
    assert (result.thumbs_made, result.thumbs_failed) == (4, 1)
    assert seen[-1] == (5, 5)
    assert (out / "gallery" / "thumbs" / "000" / "001000008_0.jpg").is_file()


def test_missing_and_broken_images(out: Path) -> None:
    (out / "images" / "000" / "000000001_0.png").unlink()
    (out / "images" / "000" / "000000003_0.png").write_bytes(b"not an image at all")
    result = build_gallery(out)
    assert result.images_missing == 1 and result.thumbs_failed == 1
    page = (out / "gallery" / "index.html").read_text()
    assert "image file missing" in page
    # The broken one falls back to the full image.
    assert 'src="../images/000/000000003_0.png"' in page


def test_no_thumbs_and_no_pillow_use_the_full_images(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = build_gallery(out, thumbs=False)
    assert not result.thumbs_enabled and result.notes == []
    assert not (out / "gallery" / "thumbs").exists()
    page = (out / "gallery" / "index.html").read_text()
    assert 'src="../images/000/000000001_0.png" width="256" height="192"' in page

    monkeypatch.setattr(gallery, "_pillow_available", lambda: False)
    result = build_gallery(out)
    assert not result.thumbs_enabled
    assert len(result.notes) == 1 and "Pillow is not installed" in result.notes[0]
    page = (out / "gallery" / "index.html").read_text()
    assert "Pillow is not installed" in page
    assert 'src="../images/000/000000001_0.png"' in page


def test_stale_pages_are_removed(out: Path) -> None:
    build_gallery(out, page_size=2, thumbs=False)
    assert (out / "gallery" / "page-0004.html").exists()
    build_gallery(out, page_size=5, thumbs=False)
    assert sorted(p.name for p in (out / "gallery").glob("page-*.html")) == [
        "page-0001.html",
        "page-0002.html",
    ]


def test_gallery_cli(out: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gallery", str(out), "--page-size", "4", "--no-thumbs"]) == 0
    assert "wrote 2 pages (8 cards)" in capsys.readouterr().out
    assert main(["gallery", str(out), "--page-size", "0"]) == 2
    assert main(["gallery", str(tmp_path / "nowhere")]) == 2
    assert "no manifest" in capsys.readouterr().err


# -- in a real browser -----------------------------------------------------------------


def _chromium() -> str | None:
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def browser(tmp_path: Path) -> Any:
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium (apt-get install chromium) for the browser test")
    profile = tmp_path / "chromium-profile"

    def run(url: str, *extra: str) -> str:
        args = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            *extra,
            url,
        ]
        done = subprocess.run(args, capture_output=True, text=True, timeout=90, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    return run


def visible(dom: str) -> list[str]:
    return [c for c in re.findall(r'<div class="card"[^>]*>', dom) if " hidden" not in c]


def shown_count(dom: str) -> int:
    match = re.search(r'<span id="shown-count">(\d+)</span>', dom)
    assert match, "no shown-count in the DOM"
    return int(match.group(1))


def test_in_chromium(out: Path, browser: Any) -> None:
    build_gallery(out, page_size=6)
    index = (out / "gallery" / "index.html").as_uri()

    dom = browser(index, "--dump-dom")
    assert len(visible(dom)) == 6 and shown_count(dom) == 6

    dom = browser(index + "#status=failed,invalid", "--dump-dom")
    assert shown_count(dom) == 2
    assert sorted(re.search(r'data-status="(\w+)"', c).group(1) for c in visible(dom)) == [  # type: ignore[union-attr]
        "failed",
        "invalid",
    ]
    # The page links carry the filter along.
    assert 'href="page-0002.html#status=failed,invalid"' in dom

    dom = browser(index + "#model=" + SD.replace("/", "%2F"), "--dump-dom")
    assert shown_count(dom) == 1  # 000000002; 001000008 is on page 2
    dom = browser(
        (out / "gallery" / "page-0002.html").as_uri() + "#status=ok&model=" + SD, "--dump-dom"
    )
    assert shown_count(dom) == 1 and len(visible(dom)) == 1

    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = artifacts / "gallery.png"
    shot.unlink(missing_ok=True)
    browser(index, f"--screenshot={shot}", "--window-size=1280,900", "--hide-scrollbars")
    assert shot.stat().st_size > 1000
    with Image.open(shot) as im:
        assert im.size == (1280, 900)
