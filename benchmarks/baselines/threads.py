"""The docs' loop (:mod:`baselines.sequential`) in a ``ThreadPoolExecutor`` of 16 workers.

Each worker runs the same ``requests.post`` + ``requests.get`` + write per prompt; the
prompts are handed out one at a time (no future per row kept around), and a 429 is
retried after a fixed 1 s sleep, as in the sequential baseline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from baselines.sequential import new_counts, one_item

WORKERS = 16


def run(
    base_url: str,
    prompts: Iterable[str],
    out_dir: Path,
    *,
    key: str = "sk-emulator",
    workers: int = WORKERS,
    batch_size: int = 1,
    retry_429: bool = True,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Run the loop over ``prompts`` with ``workers`` threads (until ``deadline``, if given)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    totals = new_counts()
    lock = threading.Lock()
    source = iter(enumerate(prompts, start=1))

    def worker() -> None:
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                return
            with lock:
                nxt = next(source, None)
            if nxt is None:
                return
            index, prompt = nxt
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
            with lock:
                for name, value in counts.items():
                    totals[name] += value

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(worker) for _ in range(workers)]:
            future.result()
    return {**totals, "elapsed_s": time.perf_counter() - started, "workers": workers}
