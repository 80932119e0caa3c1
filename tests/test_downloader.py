"""The downloader against the emulator's image hosting: streaming, checks, errors."""

from __future__ import annotations

import asyncio
import errno
import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web

from sfbatch import downloader as downloader_module
from sfbatch.downloader import Downloader, disk_full, sniff_image_type
from sfbatch.emulator import Emulator, FaultConfig
from sfbatch.emulator.images import render_png
from sfbatch.errors import (
    DiskFullError,
    DownloadError,
    ExpiredUrlError,
    ImageTooLargeError,
    NotAnImageError,
    RunBlockedError,
)
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


PNG = render_png(3, hashlib.blake2b(b"x", digest_size=16).digest(), 0, 64, 64)


@pytest.fixture
async def dribbling_host() -> AsyncIterator[str]:
    """Serves ``/png?first=N``: the PNG's first N bytes, a pause, then the rest (and
    ``/slow``, below)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        first = int(request.query["first"])
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        resp.content_length = len(PNG)
        await resp.prepare(request)
        await resp.write(PNG[:first])
        await asyncio.sleep(0.2)  # so the client reads the first bytes as a chunk of their own
        await resp.write(PNG[first:])
        await resp.write_eof()
        return resp

    async def slow(request: web.Request) -> web.StreamResponse:
        """``/slow?chunks=N&every=S``: the PNG in N pieces, S seconds apart."""
        chunks, every = int(request.query["chunks"]), float(request.query["every"])
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        resp.content_length = len(PNG)
        await resp.prepare(request)
        step = -(-len(PNG) // chunks)
        for start in range(0, len(PNG), step):
            await resp.write(PNG[start : start + step])
            await asyncio.sleep(every)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/png", handler)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/png"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("streamed", [True, False])
@pytest.mark.parametrize("first", [1, 3, 7, 11])
async def test_an_image_whose_first_chunk_is_tiny_is_still_an_image(
    tmp_path: Path,
    dribbling_host: str,
    first: int,
    streamed: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if streamed:  # over the size read in one go: chunk by chunk, sniffed across chunks
        monkeypatch.setattr(downloader_module, "_SPOOL_BYTES", 1)
    async with aiohttp.ClientSession() as session:
        downloader = Downloader(out_dir=tmp_path, session=session, retry=FAST)
        stored = await downloader.fetch(f"{dribbling_host}?first={first}", "images/000/a_0")
    assert stored.path == "images/000/a_0.png"
    assert (tmp_path / stored.path).read_bytes() == PNG


async def test_a_full_disk_is_disk_full_and_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first temporary file is a link to /dev/full: the kernel answers ENOSPC to the write
    # (a retry would write the next one, an ordinary file).
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "full-0.part").symlink_to("/dev/full")
    monkeypatch.setattr(
        downloader_module, "uuid", SimpleNamespace(uuid4=lambda: SimpleNamespace(hex="full"))
    )
    retry = RetryPolicy(max_retries=3, base_s=0.01, cap_s=0.01)
    async with Emulator() as emu, aiohttp.ClientSession() as session:
        url = await image_url(emu)
        downloader = Downloader(out_dir=tmp_path, session=session, retry=retry)
        with pytest.raises(DiskFullError) as info:
            await downloader.fetch(url, "images/000/a_0")
        assert emu.stats()["downloads"] == 1  # not retried: the disk will not empty itself
    exc = info.value
    assert isinstance(exc, RunBlockedError) and isinstance(exc, OSError)
    assert exc.errno == errno.ENOSPC and "no space left" in str(exc) and str(tmp_path) in str(exc)
    assert "run the same command again" in str(exc)
    assert not (tmp_path / "images").exists()
    assert not (tmp_path / ".tmp" / "full-0.part").is_symlink()


def test_disk_full_names_a_quota() -> None:
    exc = disk_full(OSError(errno.EDQUOT, "Disk quota exceeded", "/x/y"), Path("/x"))
    assert exc.errno == errno.EDQUOT and "quota" in str(exc) and exc.filename == "/x/y"


async def test_cheap_file_work_lands_on_the_loop_and_a_full_disk_still_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Any file work counts as cheap here: after the first image (in the worker thread,
    # where the work is measured) each lands on the loop, with no trip to a thread.
    monkeypatch.setattr(downloader_module, "_INLINE_MAX_S", 10.0)
    trips: list[object] = []
    to_thread = asyncio.to_thread

    async def counted(func: Callable[..., object], /, *args: object) -> object:
        trips.append(func)
        return await to_thread(func, *args)

    monkeypatch.setattr(asyncio, "to_thread", counted)
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "cheap-2.part").symlink_to("/dev/full")  # the third image's
    monkeypatch.setattr(
        downloader_module, "uuid", SimpleNamespace(uuid4=lambda: SimpleNamespace(hex="cheap"))
    )
    async with Emulator() as emu, aiohttp.ClientSession() as session:
        url = await image_url(emu)
        downloader = Downloader(out_dir=tmp_path, session=session, retry=FAST)
        first = await downloader.fetch(url, "images/000/a_0")
        assert len(trips) == 1
        second = await downloader.fetch(url, "images/000/b_0")
        assert len(trips) == 1  # landed on the loop
        with pytest.raises(DiskFullError):
            await downloader.fetch(url, "images/000/c_0")
    assert (tmp_path / first.path).read_bytes() == (tmp_path / second.path).read_bytes()
    assert second.sha256 == first.sha256
    assert not (tmp_path / "images/000/c_0.png").exists()
    assert not (tmp_path / ".tmp" / "cheap-2.part").is_symlink()


def test_file_work_that_turns_slow_goes_back_to_the_worker_thread() -> None:
    commit = downloader_module._GroupCommit(fsync=True)
    cheap = downloader_module._INLINE_MAX_S / 10

    def on_loop() -> bool:
        average = commit._per_image_s
        return average is not None and average <= downloader_module._INLINE_MAX_S

    assert not on_loop()  # nothing measured yet: the first batch goes to the thread
    commit._observe(64 * cheap, 64)
    assert on_loop()
    commit._observe(0.05, 1)  # one stalled write (or a disk's fsync)
    assert not on_loop()
    commit._observe(cheap, 1)
    assert not on_loop()  # one cheap batch does not undo a stall
    for _ in range(20):
        commit._observe(cheap, 1)
    assert on_loop()  # cheap again for a while: back on the loop


@pytest.mark.timeout(20)
async def test_a_stalled_body_fails_on_the_idle_bound_long_before_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The emulator sends half the image, then nothing for 30 s; the deadline is 60 s.
    monkeypatch.setattr(downloader_module, "_IDLE_S", 0.5)
    async with (
        Emulator(faults=FaultConfig(p_stalled_image=1.0, stall_s=30)) as emu,
        aiohttp.ClientSession() as session,
    ):
        url = await image_url(emu)
        downloader = Downloader(out_dir=tmp_path, session=session, retry=FAST, timeout_s=60)
        with pytest.raises(DownloadError, match="deadline"):
            await downloader.fetch(url, "images/000/a_0")


@pytest.mark.timeout(20)
async def test_a_slow_body_that_keeps_coming_is_not_cut_by_the_idle_bound(
    tmp_path: Path, dribbling_host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 8 pieces 0.25 s apart: 2 s in all, four times the idle bound, never idle that long.
    monkeypatch.setattr(downloader_module, "_IDLE_S", 0.5)
    url = dribbling_host.replace("/png", "/slow") + "?chunks=8&every=0.25"
    async with aiohttp.ClientSession() as session:
        downloader = Downloader(out_dir=tmp_path, session=session, retry=FAST, timeout_s=60)
        stored = await downloader.fetch(url, "images/000/a_0")
    assert (tmp_path / stored.path).read_bytes() == PNG
