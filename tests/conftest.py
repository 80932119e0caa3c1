"""Shared fixtures: the SiliconFlow emulator on 127.0.0.1, on a free port.

``emulator`` is one with the defaults (key ``sk-emulator``, zero latency, no limits,
no faults); ``emulator_factory(**config_fields)`` is an async context manager for any
other configuration, e.g. ``async with emulator_factory(rpm=2, latency_s=0.05) as emu``.

``s3`` is a fresh bucket on moto's S3 server (one per session, on 127.0.0.1), with the
AWS environment variables pointing at it (``AWS_ENDPOINT_URL``, test credentials).

``sfbatch_env``, ``start_sfbatch`` and ``run_sfbatch`` run ``python -m sfbatch`` as a user
would, with this checkout's code and none of the machine's ``SILICONFLOW_*`` settings;
``run_benchmark`` runs a script of ``benchmarks/`` the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sfbatch.emulator import Emulator, EmulatorConfig
from sfbatch.logs import configure_logging

EmulatorFactory = Callable[..., AbstractAsyncContextManager[Emulator]]

REPO = Path(__file__).resolve().parent.parent


def sfbatch_env(key: str | None = "sk-emulator", **extra: str) -> dict[str, str]:
    """This process's environment without ``SILICONFLOW_*``, with this checkout first on
    the path, ``key`` as the API key (None: no key) and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SILICONFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if key is not None:
        env["SILICONFLOW_API_KEY"] = key
    env.update(extra)
    return env


async def start_sfbatch(
    *args: str, env: dict[str, str] | None = None, cwd: Path = REPO
) -> asyncio.subprocess.Process:
    """``python -m sfbatch ARGS``, its output piped (default environment: :func:`sfbatch_env`)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sfbatch",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env if env is not None else sfbatch_env(),
        cwd=cwd,
    )


def manifest_record(
    row_id: str,
    status: str,
    *,
    finished_at: str = "2026-11-24T10:00:00.000Z",
    billed: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    """A manifest line's fields as the resume reader and ``latest_records`` need them."""
    return {
        "id": row_id,
        "status": status,
        "finished_at": finished_at,
        "billed_images": billed,
        **extra,
    }


async def run_sfbatch(
    *args: str, env: dict[str, str] | None = None, cwd: Path = REPO, deadline_s: float = 120
) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``python -m sfbatch ARGS``."""
    proc = await start_sfbatch(*args, env=env, cwd=cwd)
    out, err = await asyncio.wait_for(proc.communicate(), deadline_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def run_benchmark(script: str, *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """``benchmarks/SCRIPT ARGS`` with this checkout first on the path; its exit code is
    asserted 0 (the output's end in the message)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture
def sfbatch_logging() -> Iterator[None]:
    """configure_logging for one test; the loggers are put back as they were after."""
    logger, root = logging.getLogger("sfbatch"), logging.getLogger()
    saved = (logger.handlers[:], logger.level, logger.propagate, root.handlers[:])
    configure_logging(level=logging.INFO)
    yield
    logger.handlers[:], logger.level, logger.propagate, root.handlers[:] = saved


@pytest.fixture
def emulator_factory() -> EmulatorFactory:
    """``factory(config=None, **overrides)``: an async context manager running an Emulator.

    The overrides are :class:`EmulatorConfig` fields; the host is always 127.0.0.1 and
    the port a free one.
    """

    @asynccontextmanager
    async def factory(
        config: EmulatorConfig | None = None, **overrides: Any
    ) -> AsyncIterator[Emulator]:
        overrides.update(host="127.0.0.1", port=0)
        async with Emulator(config, **overrides) as emulator:
            yield emulator

    return factory


@pytest.fixture
async def emulator(emulator_factory: EmulatorFactory) -> AsyncIterator[Emulator]:
    """An emulator with the defaults: key ``sk-emulator``, no latency, limits or faults."""
    async with emulator_factory() as emu:
        yield emu


@dataclass(frozen=True)
class S3Server:
    """A moto S3 server on 127.0.0.1 and a fresh, empty bucket in it."""

    endpoint_url: str
    bucket: str

    def client(self) -> Any:
        """A plain boto3 client on the server, for checking what landed."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server (ThreadedMotoServer) on 127.0.0.1, a free port, for the session."""
    server_mod = pytest.importorskip("moto.server", reason="needs moto[server] (the test extra)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    """Credentials and endpoint the standard AWS way (environment), and an empty bucket."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    server = S3Server(endpoint_url=moto_endpoint, bucket=f"b-{uuid.uuid4().hex[:16]}")
    server.client().create_bucket(Bucket=server.bucket)
    return server
