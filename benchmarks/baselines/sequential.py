"""The loop from SiliconFlow's API docs: ``requests.post`` per prompt, then each URL, in turn.

This is what the docs' example becomes when put in a ``for`` loop::

    response = requests.request("POST", url, json=payload, headers=headers)
    for image in response.json()["images"]:
        open(path, "wb").write(requests.get(image["url"]).content)

No ``Session`` (the docs use none, so every request opens a new connection), no rate
limiting. The one concession to a long run: a 429 is retried after a fixed 1 s sleep
(``retry_429``), the naive fix users add, so an item is not simply lost.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import requests

MODEL = "Kwai-Kolors/Kolors"


def payload(prompt: str, batch_size: int = 1) -> dict[str, Any]:
    """The request body of the docs' example, with the row's prompt."""
    return {
        "model": MODEL,
        "prompt": prompt,
        "image_size": "1024x1024",
        "batch_size": batch_size,
        "num_inference_steps": 20,
        "guidance_scale": 7.5,
    }


def new_counts() -> dict[str, int]:
    return {"ok": 0, "failed": 0, "requests": 0, "rate_limited": 0, "images": 0, "bytes": 0}


def one_item(
    base_url: str,
    key: str,
    index: int,
    prompt: str,
    out_dir: Path,
    *,
    batch_size: int = 1,
    retry_429: bool = True,
    deadline: float | None = None,
) -> dict[str, int]:
    """Generate one prompt and download its images; the counts of what happened."""
    counts = new_counts()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    while True:
        counts["requests"] += 1
        response = requests.request(
            "POST",
            f"{base_url}/images/generations",
            json=payload(prompt, batch_size),
            headers=headers,
            timeout=120,
        )
        if response.status_code == 429 and retry_429:
            counts["rate_limited"] += 1
            if deadline is not None and time.monotonic() >= deadline:
                counts["failed"] += 1
                return counts
            time.sleep(1.0)
            continue
        break
    if response.status_code != 200:
        counts["failed"] += 1
        return counts
    for n, image in enumerate(response.json()["images"]):
        data = requests.get(image["url"], timeout=120).content
        (out_dir / f"{index:09d}_{n}.png").write_bytes(data)
        counts["images"] += 1
        counts["bytes"] += len(data)
    counts["ok"] += 1
    return counts


def run(
    base_url: str,
    prompts: Iterable[str],
    out_dir: Path,
    *,
    key: str = "sk-emulator",
    batch_size: int = 1,
    retry_429: bool = True,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Run the loop over ``prompts`` (until ``deadline``, a ``time.monotonic()``, if given)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    totals = new_counts()
    started = time.perf_counter()
    for index, prompt in enumerate(prompts, start=1):
        if deadline is not None and time.monotonic() >= deadline:
            break
        counts = one_item(
            base_url,
            key,
            index,
            prompt,
            out_dir,
            batch_size=batch_size,
            retry_429=retry_429,
            deadline=deadline,
        )
        for name, value in counts.items():
            totals[name] += value
    return {**totals, "elapsed_s": time.perf_counter() - started}
