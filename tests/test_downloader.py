"""The downloader against the emulator's image hosting: streaming, checks, errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import aiohttp
import pytest

from sfbatch import downloader as downloader_module
from sfbatch.downloader import Downloader, sniff_image_type
from sfbatch.emulator import Emulator, FaultConfig
from sfbatch.errors import ExpiredUrlError, ImageTooLargeError, NotAnImageError
from sfbatch.retry import RetryPolicy

FAST = RetryPolicy(max_retries=0, base_s=0.01, cap_s=0.01)


async def image_url(emu: Emulator, **request: object) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{emu.base_url}/images/generations",
            json={"prompt": "a cat", "seed": 1, **request},
            headers={"Authorization": f"Bearer {emu.api_key}"},
        ) as resp,
    ):
        body = await resp.json()
    url: str = body["images"][0]["url"]
    return url


@pytest.mark.parametrize("spool_bytes", [4 * 1024 * 1024, 1000])
async def test_download_lands_complete_with_its_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spool_bytes: int
) -> None:
    # 1000 bytes forces the path of an image too large to hold in memory.
    monkeypatch.setattr(downloader_module, "_SPOOL_BYTES", spool_bytes)
    async with Emulator(image_px=None) as emu, aiohttp.ClientSession() as session:
        url = await image_url(emu, image_size="768x512")
        stored = await Downloader(out_dir=tmp_path, session=session).fetch(url, "images/001/x_0")
        expected = emu.expected_png(seed=1, prompt="a cat", index=0, width=768, height=512)
    assert stored.path == "images/001/x_0.png"
    data = (tmp_path / stored.path).read_bytes()
    assert data == expected and len(expected) > 1000
    assert stored.sha256 == hashlib.sha256(expected).hexdigest() and stored.bytes == len(data)
    assert list((tmp_path / ".tmp").iterdir()) == []


async def test_size_cap_expired_and_not_an_image(tmp_path: Path) -> None:
    async with Emulator() as emu, aiohttp.ClientSession() as session:
        url = await image_url(emu)
        small = Downloader(out_dir=tmp_path, session=session, max_bytes=100, retry=FAST)
        with pytest.raises(ImageTooLargeError):
            await small.fetch(url, "images/000/a_0")
        emu.set_faults(FaultConfig(p_not_image=1.0))
        with pytest.raises(NotAnImageError):
            await Downloader(out_dir=tmp_path, session=session, retry=FAST).fetch(url, "b")
        emu.set_faults(FaultConfig())
        emu.advance_clock(3601)
        with pytest.raises(ExpiredUrlError):
            await Downloader(out_dir=tmp_path, session=session).fetch(url, "c")
    assert not list((tmp_path / ".tmp").iterdir())
    assert not (tmp_path / "images").exists()


def test_sniff_image_type() -> None:
    assert sniff_image_type(b"\x89PNG\r\n\x1a\nrest") == "png"
    assert sniff_image_type(b"\xff\xd8\xff\xe0") == "jpg"
    assert sniff_image_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert sniff_image_type(b"GIF89a") == "gif"
    assert sniff_image_type(b"<html>") is None
