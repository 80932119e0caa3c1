"""What the user sees while a run goes: a progress bar or periodic status lines.

Three displays, picked in :meth:`Progress.__aenter__`:

- **bar** (stderr is a terminal, text logging, not ``--no-progress``/``-q``): one line
  redrawn in place four times a second from a background task that reads
  ``pipeline.statistics()``::

      sfbatch  34%|██▌    | 1,020/3,000 · ok 990 · failed 0 · retries 12
                              · 598 img/min (limit 600) · 429s 3 · ETA 3m18s   (one line)

  Log records are printed above it (:class:`sfbatch.logs.LiveLine`). The line is drawn
  here rather than by tqdm: its text is sized to the terminal field by field, and the
  rate and ETA come from our own one-minute window, which leaves tqdm nothing to do.
- **status lines** (not a terminal, ``--no-progress``, or ``--log-format json``): one INFO
  record every ``SFBATCH_STATUS_INTERVAL_S`` seconds (default 10)::

      sfbatch: 1,234/10,000 done (12%) · ok 1,200 · failed 4 · invalid 30 · retries 3
               · 118 img/min (limit 120) · 429s 2 · ETA 1h14m                 (one line)

  In JSON the record also carries the counters as fields (``done``, ``total``, ``ok``...).
- **nothing** (``-q``): only warnings and errors.

Whatever the display, the same task warns when the API starts refusing requests as over
the rate limit (at most once a minute) and when the daily quota is reached.

Done counts items finished in this run plus rows skipped as finished by earlier runs, so
a resumed run starts where the last one stopped. The total is the rows the inputs will
yield when cheap to count (``PromptSource.count_rows()``, in a thread); otherwise the bar
follows the bytes of input read. Rates and the ETA come from a moving one-minute window,
not the average since the start. The closing summary is :mod:`sfbatch.summary`; where
log records go is :mod:`sfbatch.logs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from sfbatch.aio import AsyncResource
from sfbatch.figures import count as _count
from sfbatch.figures import duration as _duration
from sfbatch.figures import human_bytes
from sfbatch.logs import LiveLine, attach_live_line, json_logging

__all__ = ["Progress"]

log = logging.getLogger("sfbatch")

STATUS_INTERVAL_ENV = "SFBATCH_STATUS_INTERVAL_S"
_DEFAULT_STATUS_INTERVAL_S = 10.0
_BAR_REFRESH_S = 0.25
_QUIET_POLL_S = 1.0
_WINDOW_S = 60.0
_MIN_RATE_SPAN_S = 1.0
_THROTTLE_WARN_EVERY_S = 60.0
_MIN_BAR_COLS = 10
# The bar leaves two columns free, so a ^C echoed after it does not wrap to a new line.
_BAR_MARGIN_COLS = 2
_BAR_FULL = "█"
_BAR_PARTIAL = " ▏▎▍▌▋▊▉"  # eighths of a cell

Display = Literal["bar", "status", "off"]

# -- formatting helpers -----------------------------------------------------------------


def _rate(per_min: float) -> str:
    if per_min >= 10:
        return f"{per_min:,.0f}"
    return f"{per_min:.1f}".rstrip("0").rstrip(".")


_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# The embedded emulator's key (and the one its docs suggest exporting).
_EMULATOR_KEY_PREFIX = "sk-emulator"


def endpoint_name(base_url: str) -> str:
    """Where requests go, as a user reads it: ``api.siliconflow.cn`` or
    ``the emulator at 127.0.0.1:8765``."""
    url = urlsplit(base_url)
    if url.hostname in _LOOPBACK_HOSTS:  # host and port only: never a user or password
        host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        return f"the emulator at {host}" + (f":{url.port}" if url.port else "")
    return url.hostname or base_url


def _warn_emulator_key(cfg: Any) -> None:
    """A key left over from trying the emulator is no key for the real service."""
    host = urlsplit(str(getattr(cfg, "base_url", ""))).hostname
    key = str(getattr(cfg, "api_key", ""))
    if host and key.startswith(_EMULATOR_KEY_PREFIX) and host not in _LOOPBACK_HOSTS:
        log.warning(
            "the API key looks like the emulator's (%s...) but requests go to %s: "
            "unset SILICONFLOW_API_KEY or point --base-url at the emulator",
            _EMULATOR_KEY_PREFIX,
            host,
        )


def _status_interval_s() -> float:
    raw = os.environ.get(STATUS_INTERVAL_ENV, "").strip()
    if not raw:
        return _DEFAULT_STATUS_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        log.warning(
            "%s=%r is not a positive number of seconds; using %g",
            STATUS_INTERVAL_ENV,
            raw,
            _DEFAULT_STATUS_INTERVAL_S,
        )
        return _DEFAULT_STATUS_INTERVAL_S
    return value


def _terminal_columns(stream: Any) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, OSError, ValueError):
        return 80


# -- what is shown ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Sample:
    at: float
    finished: int
    images: int
    bytes_read: int
    rate_limited: int


@dataclass(frozen=True)
class _Snapshot:
    """One reading of the pipeline, with the derived rates; what both displays show."""

    elapsed_s: float
    done: int
    total: int | None  # rows, when counted
    bytes_read: int
    total_bytes: int | None
    ok: int
    failed: int
    invalid: int
    skipped: int
    retries: int
    rate_limited: int
    images: int
    images_per_min: float | None
    limit_per_min: float | None  # configured images per minute (ipm, or rpm x batch)
    slowed_to_per_min: float | None  # the limiter's current rate, when below the limit
    eta_s: float | None
    cooldown_s: float
    stopping: str | None
    ended: bool = False  # the run is over: the bar's last state

    @property
    def fraction(self) -> float | None:
        if self.total:
            return min(1.0, self.done / self.total)
        if self.total is None and self.total_bytes:
            return min(1.0, self.bytes_read / self.total_bytes)
        return None

    def fields(self) -> dict[str, Any]:
        """The counters as log-record extras (for ``--log-format json``)."""
        return {
            "event": "status",
            "done": self.done,
            "total": self.total,
            "percent": None if self.fraction is None else round(100 * self.fraction, 1),
            "ok": self.ok,
            "failed": self.failed,
            "invalid": self.invalid,
            "skipped": self.skipped,
            "retries": self.retries,
            "rate_limited_429": self.rate_limited,
            "images": self.images,
            "images_per_min": None
            if self.images_per_min is None
            else round(self.images_per_min, 1),
            "limit_images_per_min": self.limit_per_min,
            "eta_s": None if self.eta_s is None else round(self.eta_s),
            "bytes_read": self.bytes_read,
            "total_bytes": self.total_bytes,
            "elapsed_s": round(self.elapsed_s, 1),
            "stopping": self.stopping,
        }

    def _rate_text(self, *, with_limit: bool = True) -> str:
        rate = "–" if self.images_per_min is None else _rate(self.images_per_min)
        text = f"{rate} img/min"
        notes = []
        if with_limit and self.limit_per_min is not None:
            notes.append(f"limit {_rate(self.limit_per_min)}")
        if with_limit and self.slowed_to_per_min is not None:
            notes.append(f"slowed to {_rate(self.slowed_to_per_min)}")
        return f"{text} ({', '.join(notes)})" if notes else text

    def _tail(self) -> str:
        if self.stopping:
            return f"stopping ({self.stopping})"
        if self.ended:
            return f"took {_duration(self.elapsed_s)}"
        return f"ETA {'?' if self.eta_s is None else _duration(self.eta_s)}"

    def status_line(self) -> str:
        """``1,234/10,000 done (12%) · ok 1,200 · failed 4 · ... · ETA 1h14m``."""
        notes = []
        if self.total is not None:
            done = f"{_count(self.done)}/{_count(self.total)} done"
            if self.fraction is not None:
                notes.append(f"{100 * self.fraction:.0f}%")
        else:
            done = f"{_count(self.done)} done"
            if self.fraction is not None:
                notes.append(f"{100 * self.fraction:.0f}% of the input read")
        if self.skipped:
            notes.append(f"{_count(self.skipped)} in earlier runs")
        parts = [f"{done} ({', '.join(notes)})" if notes else done]
        parts += [
            f"ok {_count(self.ok)}",
            f"failed {_count(self.failed)}",
            f"invalid {_count(self.invalid)}",
            f"retries {_count(self.retries)}",
            self._rate_text(),
            f"429s {_count(self.rate_limited)}",
        ]
        if self.cooldown_s >= 1:
            parts.append(f"paused {_duration(self.cooldown_s)} after a 429")
        parts.append(self._tail())
        return " · ".join(parts)

    def bar_text(self, budget: int) -> str:
        """The text right of the bar, dropping the least useful fields to fit ``budget``."""
        if self.total is not None:
            head = f"{_count(self.done)}/{_count(self.total)}"
        elif self.total_bytes:
            head = f"{_count(self.done)} done · read {human_bytes(self.bytes_read)}"
            head += f" of {human_bytes(self.total_bytes)}"
        else:
            head = f"{_count(self.done)} done"
        # [drop order, text, shorter text]: the highest drop order goes first when space is
        # short, shortened first if it can be
        fields: list[list[Any]] = [[0, head, None], [1, f"ok {_count(self.ok)}", None]]
        fields.append([2, f"failed {_count(self.failed)}", None])
        if self.invalid:
            fields.append([8, f"invalid {_count(self.invalid)}", None])
        fields += [
            [7, f"retries {_count(self.retries)}", None],
            [5, self._rate_text(), self._rate_text(with_limit=False)],
            [6, f"429s {_count(self.rate_limited)}", None],
        ]
        if self.cooldown_s >= 1:
            fields.append([3, f"paused {_duration(self.cooldown_s)}", None])
        fields.append([4, self._tail(), None])
        while True:
            text = " · ".join(field[1] for field in fields)
            if len(text) <= budget or len(fields) <= 2:
                return text
            worst = max(range(len(fields)), key=lambda i: fields[i][0])
            if fields[worst][2] and fields[worst][2] != fields[worst][1]:
                fields[worst][1], fields[worst][2] = fields[worst][2], None
            else:
                del fields[worst]


# -- the display --------------------------------------------------------------------


class Progress(AsyncResource):
    """Shows how a run is going while ``pipeline.run()`` is awaited inside it.

    ``sources`` are the run's :class:`~sfbatch.loader.PromptSource` objects (for the
    total and the bytes read); ``enabled=False`` (``--no-progress``) shows status lines
    instead of a bar. ``tty`` and ``status_interval_s`` override the detection of a
    terminal and ``$SFBATCH_STATUS_INTERVAL_S``::

        progress = Progress(pipeline, sources=sources, enabled=True)
        async with progress:
            result = await pipeline.run()
        sfbatch.summary.print_summary(result, pipeline.config)
    """

    def __init__(
        self,
        pipeline: Any,
        *,
        sources: Sequence[Any],
        enabled: bool = True,
        tty: bool | None = None,
        status_interval_s: float | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._sources = list(sources)
        self._enabled = enabled
        self._tty = tty
        self._status_interval_s = status_interval_s
        self.display: Display = "off"
        self._line: LiveLine | None = None
        self._task: asyncio.Task[None] | None = None
        self._total: int | None = None
        self._counted = threading.Event()
        self._samples: deque[_Sample] = deque()
        self._last_throttle_warning_at = -float("inf")
        self._warned_rate_limited = 0
        self._warned_stopping: str | None = None
        self._next_status_at = 0.0

    # -- set-up and tear-down ---------------------------------------------------------

    async def _open(self) -> None:
        self.display = self._choose_display()
        self._warn_sources()
        _warn_emulator_key(self._pipeline.config)
        if self.display != "off":
            log.info("%s", self._start_line())
            threading.Thread(target=self._count_rows, name="sfbatch-count", daemon=True).start()
        interval = self._status_interval_s or _status_interval_s()
        self._next_status_at = time.monotonic() + interval
        self._sample(time.monotonic(), self._pipeline.statistics())
        if self.display == "bar":
            self._open_bar()
        tick = {"bar": _BAR_REFRESH_S, "status": min(_QUIET_POLL_S, interval)}.get(
            self.display, _QUIET_POLL_S
        )
        self._task = asyncio.create_task(self._watch(tick, interval), name="sfbatch-progress")

    async def aclose(self) -> None:
        try:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        finally:
            self._close_bar()

    def _choose_display(self) -> Display:
        if not log.isEnabledFor(logging.INFO):
            return "off"
        tty = self._tty
        if tty is None:
            try:
                tty = sys.stderr.isatty()
            except (AttributeError, ValueError):
                tty = False
        return "bar" if self._enabled and tty and not json_logging() else "status"

    def _warn_sources(self) -> None:
        seen: set[str] = set()
        for source in self._sources:
            for warning in getattr(source, "warnings", ()):
                if warning not in seen:
                    seen.add(warning)
                    log.warning("%s", warning)

    def _start_line(self) -> str:
        cfg = self._pipeline.config
        files = ", ".join(str(getattr(s, "file", s)) for s in self._sources) or "no input"
        limit = _configured_limit(cfg)
        limits = f"{_rate(limit)} images/min" if limit is not None else "no per-minute limit set"
        if getattr(cfg, "ipd", None) is not None:
            limits += f", {cfg.ipd:,} images a day"
        return (
            f"sending to {endpoint_name(str(getattr(cfg, 'base_url', '')))}; reading {files}; "
            f"writing to {cfg.out_dir} (limit: {limits})"
        )

    def _count_rows(self) -> None:
        total: int | None = 0
        for source in self._sources:
            try:
                n = source.count_rows()
            except Exception:  # the loader reports unreadable input itself
                n = None
            if n is None or total is None:
                total = None
                break
            total += n
        self._total = total
        self._counted.set()

    def _open_bar(self) -> None:
        self._line = LiveLine(sys.stderr)
        self._line.show("sfbatch starting…")
        attach_live_line(self._line)

    def _close_bar(self) -> None:
        line = self._line
        if line is None:
            return
        try:
            now, stats = time.monotonic(), self._pipeline.statistics()
            self._sample(now, stats)
            self._render_bar(dataclasses.replace(self._snapshot(now, stats), ended=True))
        except Exception:  # the display must never break the run's ending
            log.debug("progress: final refresh failed", exc_info=True)
        finally:
            attach_live_line(None)
            self._line = None
            line.close()

    # -- the watcher ----------------------------------------------------------------

    async def _watch(self, tick_s: float, interval_s: float) -> None:
        while True:
            await asyncio.sleep(tick_s)
            try:
                self._tick(interval_s)
            except Exception:  # a display bug must not stop the run
                log.debug("progress: refresh failed", exc_info=True)

    def _tick(self, interval_s: float) -> None:
        now = time.monotonic()
        stats = self._pipeline.statistics()
        self._sample(now, stats)
        snap = self._snapshot(now, stats)
        self._warn_throttling(now, stats)
        self._warn_stopping(stats)
        if self.display == "bar":
            self._render_bar(snap)
        elif self.display == "status" and now >= self._next_status_at:
            self._next_status_at = max(self._next_status_at + interval_s, now + interval_s / 2)
            log.info("%s", snap.status_line(), extra=snap.fields())

    def _sample(self, now: float, stats: dict[str, Any]) -> None:
        samples = self._samples
        samples.append(
            _Sample(
                at=now,
                finished=int(stats.get("finished", 0)),
                images=int(stats.get("images", 0)),
                bytes_read=self._bytes_read(),
                rate_limited=int(stats.get("rate_limited", 0)),
            )
        )
        # keep one sample at or before the window's start, so the span is a full window
        while len(samples) >= 2 and samples[1].at <= now - _WINDOW_S:
            samples.popleft()

    def _bytes_read(self) -> int:
        total = 0
        for source in self._sources:
            with contextlib.suppress(Exception):
                total += int(source.bytes_read)
        return total

    def _total_bytes(self) -> int | None:
        total = 0
        for source in self._sources:
            size = getattr(source, "total_bytes", None)
            if size is None:
                return None
            total += int(size)
        return total or None

    def _snapshot(self, now: float, stats: dict[str, Any]) -> _Snapshot:
        cfg = self._pipeline.config
        finished = int(stats.get("finished", 0))
        skipped = int(stats.get("skipped", 0))
        done = finished + skipped
        total = self._total if self._counted.is_set() else None
        total_bytes = self._total_bytes() if total is None else None
        oldest, newest = self._samples[0], self._samples[-1]
        span = newest.at - oldest.at
        images_per_min = eta_s = None
        if span >= _MIN_RATE_SPAN_S:
            images_per_min = (newest.images - oldest.images) * 60.0 / span
            if total is not None:
                items_per_s = (newest.finished - oldest.finished) / span
                remaining = max(0, total - done)
                eta_s = 0.0 if not remaining else remaining / items_per_s if items_per_s else None
            elif total_bytes:
                # the input still to read, or the rows read but not finished, whichever
                # takes longer (a small file is read at once, long before its rows are done)
                bytes_per_s = (newest.bytes_read - oldest.bytes_read) / span
                items_per_s = (newest.finished - oldest.finished) / span
                unread = max(0, total_bytes - newest.bytes_read)
                backlog = max(0, int(stats.get("rows_read", 0)) - done)
                etas = [
                    0.0 if not left else left / rate if rate else None
                    for left, rate in ((unread, bytes_per_s), (backlog, items_per_s))
                ]
                eta_s = None if None in etas else max(e for e in etas if e is not None)
        limiter = stats.get("limiter") or {}
        limit = _configured_limit(cfg)
        current = _limiter_rate(limiter, _batch(cfg))
        slowed = (
            current if current is not None and (limit is None or current < 0.98 * limit) else None
        )
        counts = {k[2:]: int(v) for k, v in stats.items() if k.startswith("n_")}
        return _Snapshot(
            elapsed_s=float(stats.get("elapsed_s", 0.0)),
            done=done,
            total=total,
            bytes_read=newest.bytes_read,
            total_bytes=total_bytes,
            ok=counts.get("ok", 0),
            failed=counts.get("failed", 0),
            invalid=counts.get("invalid", 0),
            skipped=skipped,
            retries=int(stats.get("retries", 0)),
            rate_limited=int(stats.get("rate_limited", 0)),
            images=int(stats.get("images", 0)),
            images_per_min=images_per_min,
            limit_per_min=limit,
            slowed_to_per_min=slowed,
            eta_s=eta_s,
            cooldown_s=float(limiter.get("cooldown_remaining_s") or 0.0),
            stopping=stats.get("stopping"),
        )

    def _render_bar(self, snap: _Snapshot) -> None:
        if self._line is not None:
            columns = max(20, _terminal_columns(self._line.stream) - _BAR_MARGIN_COLS)
            self._line.show(_bar_line(snap, columns))

    # -- warnings ---------------------------------------------------------------------

    def _warn_throttling(self, now: float, stats: dict[str, Any]) -> None:
        refused = int(stats.get("rate_limited", 0))
        if refused <= self._warned_rate_limited:
            return
        if now - self._last_throttle_warning_at < _THROTTLE_WARN_EVERY_S:
            return
        in_last_minute = max(1, refused - self._samples[0].rate_limited)
        self._last_throttle_warning_at = now
        self._warned_rate_limited = refused
        cfg = self._pipeline.config
        current = _limiter_rate(stats.get("limiter") or {}, _batch(cfg))
        slowed = f"slowed to {_rate(current)} images/min" if current is not None else "slowed down"
        advice = (
            "lower --rpm/--ipm to match your account"
            if cfg.rpm is not None or cfg.ipm is not None
            else "set --rpm/--ipm to your account's limits"
        )
        log.warning(
            "the API refused %d request%s as over the rate limit in the last minute; "
            "sfbatch %s — %s",
            in_last_minute,
            "" if in_last_minute == 1 else "s",
            slowed,
            advice,
            extra={"event": "rate_limited", "rate_limited_429": refused},
        )

    def _warn_stopping(self, stats: dict[str, Any]) -> None:
        reason = stats.get("stopping")
        if reason != "quota" or self._warned_stopping == reason:
            return
        self._warned_stopping = reason
        ipd = self._pipeline.config.ipd
        quota = f" ({ipd:,} images a day)" if ipd is not None else ""
        log.warning(
            "the daily quota%s is used up: finishing the requests in flight, then stopping; "
            "run the same command tomorrow to go on",
            quota,
            extra={"event": "quota_reached"},
        )


def _bar_line(snap: _Snapshot, columns: int) -> str:
    """``sfbatch  34%|██▌    | 1,020/3,000 · ok 990 · ...``, exactly ``columns`` wide or less."""
    fraction = snap.fraction
    if fraction is None:
        prefix = "sfbatch "
        return prefix + snap.bar_text(columns - len(prefix) - 1)
    head = f"sfbatch {100 * fraction:3.0f}%|"
    text = snap.bar_text(columns - len("sfbatch 100%|| ") - _MIN_BAR_COLS - 1)
    width = max(1, columns - len(head) - len("| ") - len(text))
    return f"{head}{_bar(fraction, width)}| {text}"


def _bar(fraction: float, width: int) -> str:
    """A bar ``width`` cells wide, filled to ``fraction`` in eighths of a cell."""
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    cells = _BAR_FULL * full + (_BAR_PARTIAL[part] if part else "")
    return cells.ljust(width)


def _batch(cfg: Any) -> int:
    defaults = getattr(cfg, "defaults", None)
    return int(getattr(defaults, "batch_size", None) or 1)


def _configured_limit(cfg: Any) -> float | None:
    """Images per minute the configuration allows: ``ipm``, or ``rpm`` x batch size."""
    candidates = [
        float(v)
        for v in (cfg.ipm, cfg.rpm * _batch(cfg) if cfg.rpm is not None else None)
        if v is not None
    ]
    return min(candidates) if candidates else None


def _limiter_rate(limiter: dict[str, Any], batch: int) -> float | None:
    """The limiter's current pace in images per minute (None before it has one)."""
    ipm, rpm = limiter.get("effective_ipm"), limiter.get("effective_rpm")
    candidates = [float(v) for v in (ipm, rpm * batch if rpm is not None else None) if v]
    return min(candidates) if candidates else None
