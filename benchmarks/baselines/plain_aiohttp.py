"""The plain script a user writes with aiohttp + aiolimiter: the CPU baseline of figure 7.

64 workers take prompts from a queue, each POSTs a generation (paced by an
``AsyncLimiter``), downloads the image and writes it to ``OUT/N.png``. Nothing else:
no type check, no sha256, no ``.part`` file and rename, no fsync, no manifest, no
retries. Run as a whole process, start-up included::

    python benchmarks/baselines/plain_aiohttp.py BASE_URL PROMPTS_FILE OUT_DIR [--limit N]

``--kept-work`` adds, in the cheapest plain form, the per-image work sfbatch keeps and
this script skips (no fsync): the type check of the first bytes, sha256, a ``.part``
file renamed into place, and a flushed JSON line per image in ``OUT/manifest.jsonl``.
It measures how much of the gap to sfbatch that work explains by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
from pathlib import Path

import aiohttp
import orjson
from aiolimiter import AsyncLimiter

MODEL = "Kwai-Kolors/Kolors"


async def run(
    base_url: str,
    prompts: list[str],
    out_dir: Path,
    *,
    concurrency: int,
    rpm: float,
    kept_work: bool = False,
) -> dict[str, int]:
    headers = {"Authorization": f"Bearer {os.environ.get('SILICONFLOW_API_KEY', 'sk-emulator')}"}
    limiter = AsyncLimiter(rpm, 60)
    todo: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for item in enumerate(prompts):
        todo.put_nowait(item)
    counts = {"ok": 0, "failed": 0, "bytes": 0}
    manifest = open(out_dir / "manifest.jsonl", "ab") if kept_work else None  # noqa: ASYNC230, SIM115

    def keep(index: int, data: bytes) -> None:
        """The kept work, plain: type check, sha256, .part + rename, a manifest line."""
        assert manifest is not None
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            counts["failed"] += 1
            return
        part = out_dir / f"{index}.png.part"
        part.write_bytes(data)
        part.replace(out_dir / f"{index}.png")
        line = {"id": str(index), "status": "ok", "path": f"{index}.png", "bytes": len(data)}
        line["sha256"] = hashlib.sha256(data).hexdigest()
        manifest.write(orjson.dumps(line) + b"\n")
        manifest.flush()

    async def worker(session: aiohttp.ClientSession) -> None:
        while not todo.empty():
            index, prompt = todo.get_nowait()
            async with limiter:
                body = {"model": MODEL, "prompt": prompt, "image_size": "1024x1024"}
                async with session.post(f"{base_url}/images/generations", json=body) as resp:
                    if resp.status != 200:
                        counts["failed"] += 1
                        continue
                    answer = await resp.json()
            async with session.get(answer["images"][0]["url"]) as resp:
                data = await resp.read()
            if manifest is not None:
                keep(index, data)
            else:
                (out_dir / f"{index}.png").write_bytes(data)
            counts["ok"] += 1
            counts["bytes"] += len(data)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    if manifest is not None:
        manifest.close()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("base_url")
    parser.add_argument("prompts", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rpm", type=float, default=10_000_000.0)
    parser.add_argument("--kept-work", action="store_true", help="add sfbatch's kept work")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    prompts = args.prompts.read_text().splitlines()[: args.limit]
    counts = asyncio.run(
        run(
            args.base_url,
            prompts,
            args.out_dir,
            concurrency=args.concurrency,
            rpm=args.rpm,
            kept_work=args.kept_work,
        )
    )
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
