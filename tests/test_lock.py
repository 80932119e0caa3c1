"""One run per output directory, with real processes; and the writable --out check."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sfbatch
from sfbatch.emulator import Emulator
from sfbatch.errors import ConfigError, OutDirInUseError
from sfbatch.lock import LOCK_NAME, LockHolder, RunLock, check_out_dir

REPO = Path(__file__).resolve().parent.parent

HOLD = """
import sys
from pathlib import Path
from sfbatch.lock import RunLock
lock = RunLock(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
sys.stdin.read()
"""

CONTEND = """
import sys
from pathlib import Path
from sfbatch.errors import OutDirInUseError
from sfbatch.lock import RunLock
try:
    RunLock(Path(sys.argv[1])).acquire()
except OutDirInUseError as exc:
    print(exc)
    sys.exit(2)
print("acquired")
"""


def python(script: str, *args: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        [sys.executable, "-c", script, *args], cwd=REPO, text=True, **kwargs
    )


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding ``tmp_path``'s lock until it is killed."""
    proc = python(HOLD, str(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)


def contend(out_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CONTEND, str(out_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_second_process_is_refused_naming_the_holder(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    second = contend(tmp_path)
    assert second.returncode == 2, second.stderr
    assert f"pid {holder.pid} on {socket.gethostname()}, started 20" in second.stdout
    assert "in use by another sfbatch run" in second.stdout
    with pytest.raises(OutDirInUseError):  # this process too
        RunLock(tmp_path).acquire()


def test_kill_9_leaves_no_stale_lock(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    assert contend(tmp_path).returncode == 2
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert (tmp_path / LOCK_NAME).exists()  # the file stays; the kernel dropped the lock
    after = contend(tmp_path)
    assert after.returncode == 0 and after.stdout == "acquired\n", after.stdout + after.stderr


def test_release_lets_the_next_run_in_and_records_the_holder(tmp_path: Path) -> None:
    with RunLock(tmp_path) as lock:
        assert lock.held and lock.holder is not None and lock.holder.pid == os.getpid()
        recorded = LockHolder.parse((tmp_path / LOCK_NAME).read_bytes())
        assert recorded == lock.holder
        assert contend(tmp_path).returncode == 2
    assert not lock.held
    assert contend(tmp_path).returncode == 0
    with RunLock(tmp_path):  # and again in this process
        pass


async def make_two_images(out: Path) -> list[dict[str, Any]]:
    async with Emulator() as emu:
        config = sfbatch.RunConfig(out_dir=out, api_key=emu.api_key, base_url=emu.base_url)
        return [r async for r in sfbatch.generate(["a cat", "a dog"], config)]


def test_status_verify_and_gallery_read_a_directory_in_use(tmp_path: Path) -> None:
    out = tmp_path / "out"
    records = asyncio.run(make_two_images(out))
    assert [r["status"] for r in records] == ["ok", "ok"]
    proc = python(HOLD, str(out), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        for command in ("status", "verify", "gallery"):
            done = subprocess.run(
                [sys.executable, "-m", "sfbatch", command, str(out)],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, (command, done.stdout, done.stderr)
        assert contend(out).returncode == 2  # still held, undisturbed
    finally:
        proc.kill()
        proc.wait(timeout=60)


def test_a_holder_file_that_is_not_json_is_not_trusted() -> None:
    assert LockHolder.parse(b"") is None
    assert LockHolder.parse(b'{"pid": "x"}') is None
    holder = LockHolder(pid=7, host="h", started_at="2026-12-01T08:00:00Z")
    assert LockHolder.parse(holder.to_json()) == holder


# -- check_out_dir -------------------------------------------------------------------------


def test_a_writable_out_is_created_and_left_clean(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    check_out_dir(out)
    assert out.is_dir() and list(out.iterdir()) == []
    check_out_dir(out)  # existing: fine too


def test_a_file_in_the_way_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        check_out_dir(tmp_path / "f")
    with pytest.raises(ConfigError, match=f"cannot be created: {tmp_path / 'f'} is a file"):
        check_out_dir(tmp_path / "f" / "sub" / "out")


@pytest.mark.parametrize("name", ["images", ".tmp"])
def test_a_file_where_sfbatch_keeps_a_directory_is_a_usage_error(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("the user's")
    with pytest.raises(ConfigError, match=f"{name} is a file, where sfbatch keeps"):
        check_out_dir(tmp_path)


def test_too_little_free_space_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="MiB free"):
        check_out_dir(tmp_path / "out", min_free_bytes=2**62)


def test_no_permission_is_a_usage_error(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.geteuid() != 0:
        with pytest.raises(ConfigError, match="no permission"):
            check_out_dir(locked / "out")
        return
    # root may write anywhere: check as nobody, in a forked child, in a directory
    # nobody may look into (pytest's own base directory is root's alone).
    base = Path(tempfile.mkdtemp(prefix="sfbatch-perm-"))
    try:
        base.chmod(0o755)
        (base / "locked").mkdir(mode=0o555)
        message = check_as_nobody(base / "locked" / "out")
        assert "cannot be created: no permission" in message, message
        message = check_as_nobody(base / "locked")  # exists, but cannot be written
        assert "is not writable: no permission" in message, message
    finally:
        shutil.rmtree(base)


def check_as_nobody(out: Path) -> str:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        message = b"no error"
        try:
            os.setuid(65534)
            check_out_dir(out)
        except BaseException as exc:
            message = f"{type(exc).__name__}: {exc}".encode()
        finally:
            os.write(write, message)
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    return message


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_a_read_only_file_system_is_a_usage_error(tmp_path: Path) -> None:
    mount = tmp_path / "ro"
    mount.mkdir()
    script = (
        "import sys; from pathlib import Path; from sfbatch.lock import check_out_dir\n"
        "check_out_dir(Path(sys.argv[1]) / 'out')"
    )
    shell = (
        f"mount -t tmpfs -o ro,size=1m none {mount} || exit 77; "
        f'exec "{sys.executable}" -c "$0" "{mount}"'
    )
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", shell, script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode == 77 or "unshare failed" in done.stderr:
        pytest.skip("no mount namespace here")
    assert "read-only file system" in done.stderr, done.stderr
