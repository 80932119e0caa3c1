"""Shared helpers of the benchmarks: an emulator subprocess, prompt files, child runs, tables.

Everything binds to 127.0.0.1 and stops by itself: emulator processes are stopped in
``finally`` (SIGINT, then SIGKILL after 10 s), child runs have timeouts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
WORK = BENCH / "_work"
KEY = "sk-emulator"
MODEL = "Kwai-Kolors/Kolors"
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def child_env() -> dict[str, str]:
    """The environment of every child process: this checkout first on the path, no network."""
    path = os.pathsep.join(p for p in (str(ROOT), str(BENCH), os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "SILICONFLOW_API_KEY": KEY,
        "NO_ALBUMENTATIONS_UPDATE": "1",  # img2dataset's dependency checks PyPI on import
        "WANDB_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pin(cpu: int | None, pid: int = 0) -> None:
    """Pin a process (default: this one) to one CPU if there are two or more; None: don't."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return
    cpus = os.sched_getaffinity(0)
    if len(cpus) >= 2 and cpu in cpus:
        with contextlib.suppress(OSError):  # the process may be gone already
            os.sched_setaffinity(pid, {cpu})


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def self_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read())


class EmulatorProcess:
    """``python -m sfbatch emulator`` on a free loopback port, for a ``with`` block.

    ``flags`` are emulator CLI flags without the dashes (``latency=2``, ``rpm=600``,
    ``image_px=64``; a list repeats the flag: ``key=["sk-b", "sk-c"]``); ``cpu`` pins it
    to one core.
    """

    def __init__(self, *, cpu: int | None = None, **flags: Any) -> None:
        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.base_url = self.root + "/v1"
        self.flags = flags
        self.cpu = cpu
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115  (closed in stop())

    def __enter__(self) -> EmulatorProcess:
        cmd = [sys.executable, "-m", "sfbatch", "emulator", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--key", KEY]
        for name, value in self.flags.items():
            for one in value if isinstance(value, list) else [value]:  # a list: repeated
                if one is not None:
                    cmd += [f"--{name.replace('_', '-')}", str(one)]
        self.proc = subprocess.Popen(
            cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=self._stderr
        )
        pin(self.cpu, self.proc.pid)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._stderr.seek(0)
                err = self._stderr.read().decode(errors="replace")
                raise RuntimeError(f"emulator exited with {self.proc.returncode}: {err}")
            try:
                self.stats()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("emulator did not answer within 20 s")

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = http_json(self.root + "/_stats")
        return result

    def control(self, **body: Any) -> dict[str, Any]:
        result: dict[str, Any] = http_json(self.root + "/_control", body)
        return result

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid) if self.proc else 0.0

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._stderr.close()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_prompts(path: Path, n: int, *, chunk: int = 200_000) -> Path:
    """``n`` distinct one-line prompts (about 50 bytes each), written fast."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for start in range(0, n, chunk):
            f.write(
                b"".join(
                    b"prompt number %d, a lighthouse at dusk, oil painting\n" % i
                    for i in range(start, min(n, start + chunk))
                )
            )
    return path


@contextlib.contextmanager
def work_dir(name: str, base: Path | None = None) -> Iterator[Path]:
    """A fresh directory under ``benchmarks/_work`` (gitignored) or ``base``, removed after."""
    path = (base or WORK) / f"sfbatch-bench-{name}-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_child(
    script: str | Path, params: dict[str, Any], *, timeout: float, cpu: int | None = None
) -> dict[str, Any]:
    """Run ``python SCRIPT --child JSON`` and return the JSON object it prints last."""
    cmd = [sys.executable, str(script), "--child", json.dumps(params)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=child_env(), stdout=out, stderr=err)
        pin(cpu, proc.pid)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(
                f"{Path(script).name} {params} timed out after {timeout:g} s"
            ) from None
        out.seek(0)
        err.seek(0)
        lines = out.read().decode(errors="replace").strip().splitlines()
        if proc.returncode != 0 or not lines:
            tail = err.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"{Path(script).name} {params} exited {proc.returncode}:\n{tail}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result


def child_main(run: Any) -> bool:
    """If argv is ``--child JSON``, run ``run(**params)``, print its JSON, and return True."""
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        result = run(**json.loads(sys.argv[2]))
        print(json.dumps(result), flush=True)
        return True
    return False


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:,.{digits}f}"


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A GitHub-markdown table (also readable as plain text)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def script_main(
    description: str,
    measure: Callable[[str], Any],
    report: Callable[[Any], str],
    *,
    modes: dict[str, str] | None = None,
) -> int:
    """The command line every figure's script shares: ``[--quick | --smoke]``, and a
    script's own ``modes`` (flag name: help)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    for name, help_text in (modes or {}).items():
        parser.add_argument(f"--{name}", action="store_true", help=help_text)
    args = parser.parse_args()
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    mode = next((name for name in modes or {} if getattr(args, name)), mode)
    print(report(measure(mode)))
    return 0
