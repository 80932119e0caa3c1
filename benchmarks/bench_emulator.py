"""How many generation requests per second the emulator answers on loopback.

The emulator runs in its own process (``python -m sfbatch emulator``: zero latency,
no limits, no faults); this process drives it with an aiohttp client over
``connections`` keep-alive connections, each sending the next request as soon as
the last one is answered::

    python benchmarks/bench_emulator.py                 # 3 runs of 5 s, 64 connections
    python benchmarks/bench_emulator.py --quick         # 3 runs of 1 s
    python benchmarks/bench_emulator.py --seconds 10 --connections 128

:func:`measure` returns the figures as a dict for ``benchmarks/run_all``. The client
shares the machine with the server, so the figure is a floor, not the server's ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson

__all__ = ["measure"]

_ROOT = Path(__file__).resolve().parent.parent
_KEY = "sk-emulator"
_BODY = orjson.dumps(
    {
        "model": "Kwai-Kolors/Kolors",
        "prompt": "an island near sea, with seagulls, moon shining over the sea, light house",
        "image_size": "1024x1024",
        "batch_size": 1,
        "seed": 4999999999,
        "num_inference_steps": 20,
        "guidance_scale": 7.5,
    }
)
_HEADERS = {"Authorization": f"Bearer {_KEY}", "Content-Type": "application/json"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start_server(port: int, stderr: IO[bytes]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "sfbatch", "emulator", "--port", str(port), "--key", _KEY]
    # stderr goes to a file: a pipe nobody reads could fill up and block the server.
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)


def _stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _wait_ready(
    session: aiohttp.ClientSession, root: str, proc: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"emulator exited with {proc.returncode}")
        try:
            async with session.get(root + "/_stats") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError("emulator did not answer within 15 s")


async def _run_once(
    session: aiohttp.ClientSession, url: str, seconds: float, connections: int
) -> tuple[int, int, list[float], float]:
    """(ok, errors, latencies in s, elapsed s) of one run."""
    latencies: list[float] = []
    counts = [0, 0]
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        perf = time.perf_counter
        while (start := perf()) < deadline:
            async with session.post(url, data=_BODY, headers=_HEADERS) as resp:
                await resp.read()
                counts[resp.status != 200] += 1
            latencies.append(perf() - start)

    began = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(connections):
            tg.create_task(worker())
    return counts[0], counts[1], latencies, time.perf_counter() - began


async def _drive(
    root: str, proc: subprocess.Popen[bytes], seconds: float, connections: int, runs: int
) -> dict[str, Any]:
    url = root + "/v1/images/generations"
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        await _wait_ready(session, root, proc)
        await _run_once(session, url, min(1.0, seconds), connections)  # warm up connections
        rates: list[float] = []
        latencies: list[float] = []
        errors = 0
        peak = 0
        for _ in range(runs):
            async with session.post(root + "/_control", json={"reset_stats": True}) as resp:
                resp.raise_for_status()
            ok, failed, lat, elapsed = await _run_once(session, url, seconds, connections)
            async with session.get(root + "/_stats") as resp:
                stats = await resp.json()
            rates.append(ok / elapsed)
            latencies.extend(lat)
            errors += failed
            peak = max(peak, stats["peak_in_flight"])
    latencies.sort()
    return {
        "requests_per_s": statistics.median(rates),
        "runs_requests_per_s": rates,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "errors": errors,
        "peak_in_flight": peak,
        "connections": connections,
        "seconds": seconds,
        "cpus": os.cpu_count(),
    }


def measure(seconds: float = 5.0, connections: int = 64, *, runs: int = 3) -> dict[str, Any]:
    """Start an emulator process, drive it ``runs`` times, stop it; the figures as a dict.

    ``requests_per_s`` is the median over the runs; ``p50_ms``/``p99_ms`` are over
    every request of every run; ``peak_in_flight`` is the server's own count.
    """
    port = _free_port()
    with tempfile.TemporaryFile() as stderr:
        proc = _start_server(port, stderr)
        try:
            return asyncio.run(_drive(f"http://127.0.0.1:{port}", proc, seconds, connections, runs))
        except RuntimeError as exc:
            stderr.seek(0)
            raise RuntimeError(f"{exc}\n{stderr.read().decode(errors='replace')}") from exc
        finally:
            _stop_server(proc)


def _table(result: dict[str, Any]) -> str:
    rows = [
        ("requests/s (median of runs)", f"{result['requests_per_s']:,.0f}"),
        ("runs", ", ".join(f"{r:,.0f}" for r in result["runs_requests_per_s"])),
        ("latency p50", f"{result['p50_ms']:.2f} ms"),
        ("latency p99", f"{result['p99_ms']:.2f} ms"),
        ("non-200 answers", str(result["errors"])),
        ("server peak in flight", str(result["peak_in_flight"])),
        ("connections x seconds", f"{result['connections']} x {result['seconds']:g}"),
        ("cpus", str(result["cpus"])),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="runs of 1 s")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run")
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections")
    parser.add_argument("--runs", type=int, default=3, help="runs (the median is reported)")
    args = parser.parse_args(argv)
    seconds = 1.0 if args.quick else args.seconds
    print("emulator benchmark: POST /v1/images/generations, zero latency, no limits, no faults")
    print(_table(measure(seconds, args.connections, runs=args.runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
