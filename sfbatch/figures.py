"""The figures reports print, defined once: percentiles, byte sizes, durations, counts.

``summary.json`` (the pipeline), ``sfbatch status``, the live display and the closing
summary all use these, so the same run reads the same everywhere::

    >>> percentile([1.0, 2.0, 3.0, 4.0], 0.5)
    2.5
    >>> human_bytes(2_500_000)
    '2.4 MiB'
    >>> duration(75)
    '1m15s'
"""

from __future__ import annotations

import random
from collections.abc import Iterable

__all__ = [
    "Reservoir",
    "count",
    "duration",
    "human_bytes",
    "percentile",
    "percentiles",
    "plural",
]


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) of ``values`` by linear interpolation; ``None`` if empty.

    The definition of ``statistics.quantiles(method="inclusive")`` and NumPy's default
    (a test holds them equal), taken at any ``q`` rather than at ``n`` equal cuts.
    """
    ordered = sorted(values)
    if not ordered:
        return None
    pos = (len(ordered) - 1) * min(1.0, max(0.0, q))
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def percentiles(values: Iterable[float], *qs: float, ndigits: int = 3) -> dict[str, float | None]:
    """``{"p50": ..., "p95": ...}`` for ``qs`` (0..1), rounded to ``ndigits``."""
    ordered = sorted(values)
    out: dict[str, float | None] = {}
    for q in qs:
        value = percentile(ordered, q)
        out[f"p{round(q * 100)}"] = None if value is None else round(value, ndigits)
    return out


class Reservoir:
    """A fixed-size uniform sample of a stream of numbers, for :func:`percentiles`.

    Exact up to ``size`` values; past that, a uniform sample (Algorithm R)::

        >>> r = Reservoir(size=100)
        >>> for v in range(1, 101): r.add(float(v))
        >>> r.percentiles(0.5)
        {'p50': 50.5}
    """

    def __init__(self, size: int = 20_000, seed: int = 0) -> None:
        self._size = size
        self._seen = 0
        self._values: list[float] = []
        self._rng = random.Random(seed)

    def add(self, value: float) -> None:
        self._seen += 1
        if len(self._values) < self._size:
            self._values.append(value)
        else:
            slot = self._rng.randrange(self._seen)
            if slot < self._size:
                self._values[slot] = value

    def __len__(self) -> int:
        return self._seen

    def percentiles(self, *qs: float) -> dict[str, float | None]:
        return percentiles(self._values, *qs)


def human_bytes(n: float) -> str:
    """``1536`` → ``"1.5 KiB"`` (powers of 1024, as the size limits are given)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h14m``, ``2d03h``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def count(n: float) -> str:
    """``1234`` → ``"1,234"``."""
    return f"{round(n):,}"


def plural(n: float, noun: str, plural_noun: str | None = None) -> str:
    """``plural(1, "image")`` → ``"1 image"``, ``plural(1234, "image")`` → ``"1,234 images"``."""
    return f"{count(n)} {noun if round(n) == 1 else plural_noun or noun + 's'}"
