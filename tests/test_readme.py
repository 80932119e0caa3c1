"""Every command in README.md runs, as written, against the emulator: the README cannot rot.

Commands come from the README's ``console`` blocks (lines starting ``$ ``), its ``cron``
block and its ``python`` block; the JSONL example becomes ``prompts.jsonl``. They run
in a sandbox holding a copy of ``jobs/``, with ``SILICONFLOW_BASE_URL`` pointing at an
emulator. Only the nightly job's limits are raised in the sandbox copy (2 images a
minute would make the test take hours); its ``ipd`` is lowered so the nightly commands
show the quota stop (exit 4) they exist for.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest
from PIL import Image

from sfbatch.emulator import Emulator
from sfbatch.models import ModelRegistry

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)
BLOCKS = [(lang, body) for lang, body in BLOCK.findall(README)]
EDIT_MODEL = "Qwen/Qwen-Image-Edit-2509"


def console_commands() -> list[str]:
    return [
        line[2:].strip()
        for lang, body in BLOCKS
        if lang == "console"
        for line in body.splitlines()
        if line.startswith("$ ")
    ]


def test_the_readme_opens_with_the_two_setup_commands() -> None:
    first, second = console_commands()[:2]
    assert first.endswith("sfbatch run jobs/demo.toml") and "pip install" in first
    assert "pytest" in second and "pip install" in second
    ci = (REPO / ".ci" / "run").read_text()
    assert second in ci, ".ci/run must run exactly the README's test command"


def sandbox(tmp_path: Path) -> Path:
    box = tmp_path / "box"
    shutil.copytree(REPO / "jobs", box / "jobs")
    nightly = box / "jobs" / "nightly.toml"
    text = nightly.read_text()
    text = re.sub(r"(?m)^rpm = \d+", "rpm = 6000", text)
    text = re.sub(r"(?m)^ipm = \d+", "ipm = 6000", text)
    text = re.sub(r"(?m)^ipd = \d+", "ipd = 12", text)
    nightly.write_text(text)
    (box / "prompts.txt").write_text("a lighthouse at dawn\n\na fox in snow\na teapot\n")
    jsonl = next(body for lang, body in BLOCKS if lang == "json" and '"fox-1"' in body)
    (box / "prompts.jsonl").write_text(jsonl)
    edits = next(body for lang, body in BLOCKS if lang == "json" and '"image2"' in body)
    (box / "edits" / "photos").mkdir(parents=True)
    (box / "edits" / "edits.jsonl").write_text(edits)
    for name, color in (("room.png", "tan"), ("cat.png", "gray"), ("lamp.webp", "gold")):
        Image.new("RGB", (32, 24), color).save(box / "edits" / "photos" / name)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".sfbatch-key").write_text("sk-emulator\n")
    return box


async def shell(command: str, *, cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        command,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_every_readme_command_runs(tmp_path: Path) -> None:
    box = sandbox(tmp_path)
    bindir = Path(sys.executable).parent
    async with Emulator() as emu:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SILICONFLOW_")},
            "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(tmp_path / "home"),
            "SILICONFLOW_API_KEY": "sk-emulator",
            "SILICONFLOW_BASE_URL": emu.base_url,
        }
        ran = 0
        for command in console_commands():
            if command.startswith("export ") or "pytest" in command:
                continue  # the environment is set above; the test suite does not run itself
            if command.startswith("sfbatch emulator"):
                continue  # a server: see test_the_readme_emulator_command_serves
            if "edits/" in command and EDIT_MODEL not in ModelRegistry.builtin():
                continue  # the edit recipe runs once the model rules of today are in
            run_env = dict(env)
            if "pip install" in command:
                command = command.split("&&", 1)[1].strip()  # installed already
                del run_env["SILICONFLOW_API_KEY"]  # the demo promises: no key, no cost
                del run_env["SILICONFLOW_BASE_URL"]
            code, output = await shell(command, cwd=box, env=run_env)
            expected = {0, 4} if "nightly.toml" in command else {0}
            assert code in expected, f"{command}\n{output}"
            assert "sk-emulator" not in output
            ran += 1
        cron = next(body for lang, body in BLOCKS if lang == "cron").strip()
        command = cron.split(maxsplit=5)[5].replace("cd /srv/sfbatch", f"cd {box}")
        code, output = await shell(command, cwd=box, env=env)
        assert code == 4, output  # the sandbox's quota of 12 images is reached
        assert "quota" in (box / "nightly.log").read_text()

        script = next(body for lang, body in BLOCKS if lang == "python")
        (box / "example.py").write_text(script)
        code, output = await shell(f"{sys.executable} example.py", cwd=box, env=env)
        assert code == 0, output
        made = [line.split(" ", 2) for line in output.splitlines()]
        assert [status for _, status, _ in made] == ["ok", "ok"]  # ids come from the prompts
        assert made[1][2].count(".png") == 2
    assert ran >= 10
    assert (box / "demo-out" / "manifest.jsonl").is_file()
    assert (box / "data" / "gallery" / "index.html").is_file()


async def test_the_readme_emulator_command_serves(tmp_path: Path) -> None:
    command = next(c for c in console_commands() if c.startswith("sfbatch emulator"))
    args = command.split()[1:]
    args[args.index("--port") + 1] = "0"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sfbatch", *args, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert b"listening on http://127.0.0.1:" in line
    finally:
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


@pytest.mark.parametrize("job", sorted((REPO / "jobs").glob("*.toml")))
async def test_shipped_jobs_validate(job: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sfbatch", "validate", str(job), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
