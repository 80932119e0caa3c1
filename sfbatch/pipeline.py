"""The pipeline: loader → generation workers → downloaders → manifest.

:class:`Pipeline` runs one job under a single :class:`asyncio.TaskGroup`: one loader
task, a fixed pool of generation workers and a fixed pool of download workers, joined
by bounded queues, so memory does not grow with the input and a slow download never
holds a generation slot. Every record goes through :meth:`Pipeline._emit`, which
appends it to the manifest only after the item's files are in place.

Stopping, in order of severity:

- daily quota reached (ours or the API's): stop taking rows; in-flight generations
  finish and are downloaded; outcome ``quota`` (exit 4).
- :meth:`Pipeline.interrupt` (Ctrl-C, SIGTERM): the same, but after ``grace_s`` (or a
  second interrupt) the stages are cancelled; generated items not yet downloaded are
  written as ``generated`` records with their URLs, so the next run downloads them
  instead of paying again; outcome ``interrupted`` (exit 130).
- something outside the run must be fixed (:class:`~sfbatch.errors.RunBlockedError`:
  the account's balance or verification (403) on the last key, a full disk, an outage
  longer than ``outage_timeout_s``; with ``images_to``, an upload that failed after the
  store's retries, its item kept ``generated``): like the quota, no new request,
  in-flight work lands as ``ok`` or ``generated``; outcome ``blocked`` (exit 5).
- 401/404 from the API: cancelled at once; outcome ``fatal`` (exit 3). So is an
  ``images_to`` store that refuses a test write at start, before any request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import queue
import time
import uuid
from collections import Counter
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import orjson

from sfbatch.client import Generation, SiliconFlowClient
from sfbatch.concurrency import ConcurrencyWindow
from sfbatch.config import RunConfig
from sfbatch.deadlines import Deadlines
from sfbatch.downloader import Downloader, StoredImage, clean_tmp, tmp_dir_name, write_failed
from sfbatch.errors import (
    OUTPUT_ERRNOS,
    ConfigError,
    DownloadError,
    ExpiredUrlError,
    FatalApiError,
    ModelDisabledError,
    OutageError,
    OutputWriteError,
    QuotaReachedError,
    RunBlockedError,
    SfbatchError,
)
from sfbatch.figures import Reservoir
from sfbatch.generator import Generator, Stopped, WorkItem
from sfbatch.identity import unused_stem
from sfbatch.keypool import KeyPool, ModelLimits, NoKeyLeftError
from sfbatch.limiter import batch_fit_problem
from sfbatch.loader import SKIPPED, JobRows, PromptSource, Row, SkippedRows, image_shard_dir
from sfbatch.lock import RunLock, check_out_dir, lock_name
from sfbatch.manifest import (
    ManifestRecord,
    ManifestWriter,
    RecordError,
    Status,
    build_record,
    day_start_iso,
    invalid_error,
    now_iso,
)
from sfbatch.modelcheck import ModelOffer, check_defaults, check_models
from sfbatch.models import DEFAULT_MODEL, ModelRegistry
from sfbatch.outage import OutageDetector
from sfbatch.reasons import Reason, ReasonTally
from sfbatch.resume import DAMAGED, Cursor, read_index, refresh_side
from sfbatch.storage import ImageStore, StorageError, open_store

__all__ = ["Outcome", "Pipeline", "RunResult", "RunStats", "generate"]

Outcome = Literal["done", "quota", "interrupted", "fatal", "input_error", "blocked"]
EXIT_BLOCKED = 5
_YIELD_EVERY_ROWS = 256
# Generation queue order: regenerations first, then new rows, then the workers' end.
_REGENERATE, _NEW_ROW, _END = 0, 1, 2
# A "generated" record's URLs are reused only while this much of their lifetime is left.
_URL_MARGIN_S = 120.0
_DAMAGED_LISTED = 100
# Told no limit, a run goes unlimited until its first 429 while answers come in
# milliseconds; when its first answers all take this long it probes the limit instead, so
# that the first 429 does not find the server's minute filled in a burst (and a long
# stall after).
_PROBE_AFTER_LATENCY_S = 1.0

log = logging.getLogger("sfbatch")


@dataclass
class RunStats:
    """Counters of this run (trio-style ``statistics()``)."""

    started: float = field(default_factory=time.monotonic)
    counts: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    # Of ``skipped``, by the status earlier runs recorded: "ok", "failed", "invalid", ...
    skipped_as: Counter[str] = field(default_factory=Counter)
    rows_read: int = 0
    images: int = 0
    bytes: int = 0
    billed_images: int = 0
    regenerated: int = 0
    new_rows: int = 0  # rows with no record of their id and fingerprint
    remade_damaged: int = 0  # rows whose record `verify --repair` marked damaged
    whole_input: bool = False  # the loader read every row (no limit, shard or stop)
    latency: Reservoir = field(default_factory=Reservoir)
    inference: Reservoir = field(default_factory=Reservoir)
    reasons: Counter[Reason] = field(default_factory=Counter)
    # One message per reason, kept as errors happen, for the closing summary.
    examples: dict[Reason, str] = field(default_factory=dict)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def finished(self) -> int:
        return sum(self.counts.values())

    def error_tallies(self) -> tuple[ReasonTally, ...]:
        """This run's errors by reason, the most common first."""
        return tuple(
            ReasonTally(reason, n, self.examples.get(reason, ""))
            for reason, n in self.reasons.most_common()
        )


@dataclass(frozen=True)
class RunResult:
    """How a run ended, and the summary written to ``summary.json``."""

    outcome: Outcome
    summary: dict[str, Any]
    message: str = ""
    errors: tuple[ReasonTally, ...] = ()  # by reason, with an example each; most common first

    @property
    def exit_code(self) -> int:
        if self.outcome == "fatal":
            return 3
        if self.outcome == "blocked":
            return EXIT_BLOCKED
        if self.outcome == "input_error":
            return 2
        if self.outcome == "quota":
            return 4
        if self.outcome == "interrupted":
            return 130
        totals = self.summary.get("manifest", {})
        return 1 if totals.get("failed") or totals.get("invalid") else 0


class Pipeline:
    """One run of the engine over ``rows`` with ``config``.

    Create it inside the running loop: the constructor reads the manifest back and builds
    every part (it opens the manifest and two HTTP sessions); then call :meth:`run` once,
    which closes them. ``on_record`` is awaited with every record after it is in the
    manifest (the library's :func:`generate` uses it; so does the progress display).
    """

    def __init__(
        self,
        config: RunConfig,
        rows: Iterable[Row] | AsyncIterable[Row],
        *,
        registry: ModelRegistry | None = None,
        on_record: Callable[[ManifestRecord], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self.registry = registry or ModelRegistry.load(config.models_file)
        self.stats = RunStats()
        self._rows = rows
        self._on_record = on_record
        self._stop_reason: Outcome | None = None
        self._stop_message = ""
        self._interrupts = 0
        self._stages: asyncio.Task[None] | None = None
        self._cancelled_by_us = False
        self.fatal_error: FatalApiError | None = None
        self.input_error: BaseException | None = None
        self.blocked_error: RunBlockedError | None = None
        self.store_error: StorageError | None = None
        # model -> the server's message, once a 403 30003 said the account may not use it
        self.disabled_models: dict[str, str] = {}
        # model -> why no key can go on with it today (daily quotas): its rows wait for
        # tomorrow, unrecorded, while the other models go on
        self.out_for_today: dict[str, str] = {}

        # Every part, built here in one phase; run() closes what they hold open.
        out = config.out_dir
        # Before anything else (and any request): a writable DIR, and this run alone in it.
        check_out_dir(out)
        self._lock = RunLock(out, name=lock_name(config.output.shard))
        self._lock.acquire()
        try:
            self._build(config, rows)
        except OSError as exc:
            self._lock.release()
            if exc.errno not in OUTPUT_ERRNOS:
                raise
            # the manifest (or its side files) cannot be read or written: before any request
            raise ConfigError(
                f"--out {out}: {exc.strerror or exc}"
                + (f": {exc.filename}" if isinstance(exc.filename, str) else "")
            ) from exc
        except BaseException:
            self._lock.release()
            raise

    def _build(self, config: RunConfig, rows: Iterable[Row] | AsyncIterable[Row]) -> None:
        out, limits, workers = config.out_dir, config.limits, config.workers
        shard = config.output.shard
        self._tmp_dir = tmp_dir_name(shard)
        clean_tmp(out, shard)
        manifest_path = out / config.manifest_name
        self._last_outcome = _last_outcome(out / config.summary_name)
        self._state = read_index([manifest_path], day_start=day_start_iso(limits.day_utc_offset_h))
        refresh_side(self._state, manifest_path)  # before the writer appends to it
        # before the sessions: a manifest that cannot be written stops the run here, exit 2
        self._writer = ManifestWriter(manifest_path)
        if self._state.damaged:
            places = ", ".join(f"{d.path}:{d.line}" for d in self._state.damaged[:10])
            more = len(self._state.damaged) - 10
            log.warning(
                "%d manifest lines are not complete records (%s%s): their items are made again",
                len(self._state.damaged),
                places,
                f" and {more} more" if more > 0 else "",
            )
        if isinstance(rows, JobRows | PromptSource):
            rows.legacy = self._state  # rows made by an older sfbatch keep their ids
            # Rows done already come out of the loader as SKIPPED, before being built.
            rows.done = self._state.done_check(
                retry_failed=config.build.retry_failed, skipped_as=self.stats.skipped_as
            )
            if config.output.shard is None:  # jump past a done prefix (loader.SkippedRows)
                rows.cursor = Cursor(self._state, manifest_path, self.stats.skipped_as)
        keys = config.api_keys or ("",)
        # Rows may set their own batch_size: size the limiters for the largest any model takes.
        self._pool = KeyPool(
            keys=len(keys),
            limits=ModelLimits(rpm=limits.rpm, ipm=limits.ipm, ipd=limits.ipd),
            per_model={
                model: ModelLimits(rpm=own.rpm, ipm=own.ipm, ipd=own.ipd)
                for model, own in ((m, limits.for_model(m)) for m in limits.models)
            },
            max_batch_size=max(rule.max_batch_size for rule in self.registry),
            used_today=self._state.billed_today_for,
            utc_offset_h=limits.day_utc_offset_h,
            probe_after_latency_s=_PROBE_AFTER_LATENCY_S,
            # the models known before any row: the window is sized from their limits'
            # rate from the first request, not only after the first (slow) answer
            models=sorted({config.defaults.model or DEFAULT_MODEL, *limits.models}),
        )
        self._window = ConcurrencyWindow(
            fixed=workers.concurrency, max_size=workers.max_concurrency
        )
        self._window.set_target_rate(self._pool.target_rate_per_min())
        # images/SHARD dir -> it was absent when first looked at: every file in it is this
        # run's (one id, one name), so its stems need no collision check. Not with --shard:
        # other processes write into the same directories.
        self._fresh_dirs: dict[str, bool] | None = {} if config.output.shard is None else None
        # New rows wait in the generation queue behind items sent back for regeneration
        # (their URLs expired). Those come from the downloaders, which must never wait on
        # it, so the queue has no bound of its own: ``_room`` bounds the rows in it.
        self._gen_queue: asyncio.PriorityQueue[tuple[int, int, WorkItem | None]] = (
            asyncio.PriorityQueue()
        )
        self._room = asyncio.Semaphore(workers.queue_size)
        self._order = itertools.count()
        self._dl_queue: asyncio.Queue[WorkItem | None] = asyncio.Queue(
            2 * workers.download_concurrency
        )
        self._api_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=workers.generation_workers),
            raise_for_status=False,
        )
        self._dl_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=workers.download_concurrency)
        )
        deadlines = Deadlines()  # one timer for every request's deadline
        clients = [
            SiliconFlowClient(
                base_url=config.base_url,
                api_key=key,
                session=self._api_session,
                request_timeout_s=config.timeouts.request_timeout_s,
                connect_timeout_s=config.timeouts.connect_timeout_s,
                deadlines=deadlines,
                key_name=(
                    "SILICONFLOW_API_KEY"
                    if len(keys) == 1
                    else f"key #{index} of the run's keys (counting from 0)"
                ),
            )
            for index, key in enumerate(keys)
        ]
        self._outage = OutageDetector(
            probe=clients[0].probe, outage_timeout_s=config.timeouts.outage_timeout_s
        )
        self._generator = Generator(
            clients=clients,
            pool=self._pool,
            retry=config.retry,
            window=self._window,
            outage=self._outage,
            stopping=lambda: self.stopping,
        )
        # With images_to, a download lands in DIR/.tmp and is uploaded from there: an fsync
        # of a file about to be deleted buys nothing (the store's PUT is the durable copy).
        images_to = config.output.images_to
        self._store: ImageStore | None = None if images_to is None else open_store(images_to)
        self._downloader = Downloader(
            out_dir=out,
            session=self._dl_session,
            timeout_s=config.timeouts.download_timeout_s,
            max_bytes=config.output.max_image_bytes,
            retry=config.retry,
            fsync=config.output.fsync_images and self._store is None,
            tmp_dir=self._tmp_dir,
            deadlines=deadlines,
        )

    # -- control ---------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop_reason is not None

    def interrupt(self) -> None:
        """First call: stop taking rows, let in-flight work land for ``grace_s``; second: now."""
        self._interrupts += 1
        if self._interrupts == 1:
            self._request_stop("interrupted", "interrupted: finishing in-flight work")
            grace_s = self.config.timeouts.grace_s
            asyncio.get_running_loop().call_later(grace_s, self._cancel_stages)
        else:
            self._request_stop("interrupted", "interrupted twice: stopping now")
            self._cancel_stages()

    def _block(self, exc: SfbatchError) -> None:
        """Something outside the run must be fixed: send nothing more (exit 5)."""
        if self._stop_reason != "blocked":
            log.error("stopping: %s", exc)
        if isinstance(exc, RunBlockedError) and self.blocked_error is None:
            self.blocked_error = exc
        self._request_stop("blocked", str(exc))

    def _request_stop(self, reason: Outcome, message: str) -> None:
        overrides = reason in ("fatal", "input_error") or (
            reason == "blocked" and self._stop_reason == "quota"  # what to fix comes first
        )
        if self._stop_reason is None or overrides:
            self._stop_reason, self._stop_message = reason, message
        self._generator.stop_waiting()  # nothing more is sent: no request waits its turn

    def _cancel_stages(self) -> None:
        if self._stages is not None and not self._stages.done():
            self._cancelled_by_us = True
            self._stages.cancel()

    def statistics(self) -> dict[str, Any]:
        """Live counters for progress displays."""
        gen = self._generator
        return {
            "elapsed_s": self.stats.elapsed_s,
            "rows_read": self.stats.rows_read,
            "skipped": self.stats.skipped,
            "finished": self.stats.finished,
            **{f"n_{k}": v for k, v in self.stats.counts.items()},
            "images": self.stats.images,
            "requests": gen.requests,
            "retries": gen.retries,
            "rate_limited": gen.rate_limited,
            "in_generation_queue": self._gen_queue.qsize(),
            "in_download_queue": self._dl_queue.qsize(),
            "limiter": self._first_limiter_statistics(),
            "quota_remaining": self._quota_remaining(),
            "window": dataclasses.asdict(self._window.statistics()),
            "keys": [dataclasses.asdict(key) for key in self._pool.statistics()],
            "outage": dataclasses.asdict(self._outage.statistics()),
            "stopping": self._stop_reason,
        }

    def _first_limiter_statistics(self) -> dict[str, Any]:
        """The first (key, model) limiter's figures: what the progress line shows."""
        first = next(iter(self._pool.statistics()), None)
        if first is None:
            return {}
        return dict(self._pool.limiter(first.key_index, first.model).statistics())

    def _quota_remaining(self) -> int | None:
        ipd = self.config.limits.ipd
        if ipd is None:
            return None
        keys = [k for k in self._pool.statistics() if k.set_aside is None]
        if not keys:
            return 0 if self._pool.statistics() else ipd
        return sum(max(0, ipd - (k.images_today or 0)) for k in keys)

    def _billed_today(self) -> int | None:
        if self.config.limits.ipd is None:
            return None
        keys = self._pool.statistics()
        return sum(k.images_today or 0 for k in keys) if keys else self._state.billed_today

    # -- run ----------------------------------------------------------------------

    async def run(self) -> RunResult:
        """Run the job to its end; never raises for item-level failures. Call it once: it
        closes the manifest and the sessions the constructor opened."""
        try:
            if await self._open_store():
                await self._run_stages()
        except* FatalApiError as group:
            fatal = group.exceptions[0]
            assert isinstance(fatal, FatalApiError)
            self.fatal_error = fatal
            self._request_stop("fatal", str(fatal))
        except* RunBlockedError as group:
            # e.g. the manifest could not be written (ENOSPC): what is written stays
            blocked = group.exceptions[0]
            assert isinstance(blocked, RunBlockedError)
            self._block(blocked)
        finally:
            try:
                with contextlib.suppress(RunBlockedError):
                    await self._save_undownloaded()
                with contextlib.suppress(OSError):  # a full disk: the lines are flushed
                    self._writer.close()
                await self._api_session.close()
                await self._dl_session.close()
                if self._store is not None:
                    await self._store.aclose()
                clean_tmp(self.config.out_dir, self.config.output.shard)
            finally:
                self._lock.release()
        return self._finish()

    async def _open_store(self) -> bool:
        """Open the image store and prove it takes writes, before anything is paid for;
        ``False`` (and the run stops, exit 3) when it refuses."""
        if self._store is None:
            return True
        try:
            await self._store.__aenter__()
            await self._store.check_writable()
        except StorageError as exc:
            self.store_error = exc
            self._request_stop("fatal", f"the image store refuses writes: {exc}")
            return False
        return True

    async def _run_stages(self) -> None:
        self._stages = asyncio.create_task(self._stages_body())
        try:
            await self._stages
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not self._cancelled_by_us or (current is not None and current.cancelling()):
                raise

    async def _stages_body(self) -> None:
        workers = self.config.workers
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._load())
            for _ in range(workers.generation_workers):
                tg.create_task(self._generate_worker())
            for _ in range(workers.download_concurrency):
                tg.create_task(self._download_worker())

    # -- stages -------------------------------------------------------------------
    #
    # An item counts as unfinished in the generation queue (``join``) from the loader's put
    # until it is recorded or dropped: the generation worker marks it done when it ends
    # there, else the download worker does; a regeneration puts it back first.

    async def _load(self) -> None:
        state, stats = self._state, self.stats
        jumped = 0
        numbered = _numbered(self._rows)
        while True:
            try:
                n, row = await anext(numbered)
            except StopAsyncIteration:
                break
            except Exception as exc:  # kept: the caller raises it again
                # The input broke mid-way (a corrupt gzip, a caller's iterable raising):
                # no new rows, and what is in flight still lands and is recorded.
                self.input_error = exc
                self._request_stop("input_error", str(exc))
                break
            if isinstance(row, SkippedRows):  # done rows the loader jumped past, all ok
                jumped += row.count - 1
                stats.rows_read = n + jumped
                stats.skipped += row.count
                stats.skipped_as["ok"] += row.count
                continue
            stats.rows_read = n + jumped
            if self.stopping:
                break
            if row is SKIPPED:
                stats.skipped += 1  # the loader found it done (and matched it) already
                continue
            status = state.match(row.id, row.fingerprint)
            if status is None:
                stats.new_rows += 1
            elif status == DAMAGED:
                stats.remade_damaged += 1
            if status == "ok" or (status == "failed" and not self.config.build.retry_failed):
                stats.skipped += 1
                stats.skipped_as[status] += 1
                continue
            if row.request is None:
                if status == "invalid":
                    stats.skipped += 1
                    stats.skipped_as[status] += 1
                else:
                    await self._emit(row, "invalid", error=invalid_error(row.error or ""))
                continue
            unfit = batch_fit_problem(row.request.get("batch_size", 1), self.config.limits.ipm)
            if unfit is not None:
                await self._emit(
                    row, "invalid", error=invalid_error(f"{row.file}:{row.line}: {unfit}")
                )
                continue
            if row.duplicate_of is not None:
                if status == "duplicate":
                    stats.skipped += 1
                    stats.skipped_as[status] += 1
                else:
                    await self._emit(row, "duplicate")
                continue
            item = WorkItem(row=row)
            if status == "generated":
                self._attach_pending(item, state.generated_record(row.id, row.fingerprint))
            await self._room.acquire()
            self._gen_queue.put_nowait((_NEW_ROW, next(self._order), item))
        self._report_found()
        # Only on the way out through the end of input or a stop (after an error the
        # TaskGroup cancels every task): once every item is finished none can come back
        # for regeneration, and the workers may go.
        await self._gen_queue.join()
        for _ in range(self.config.workers.generation_workers):
            self._gen_queue.put_nowait((_END, next(self._order), None))
        for _ in range(self.config.workers.download_concurrency):
            await self._dl_queue.put(None)

    def _report_found(self) -> None:
        """Once the input is read: what changed since the manifest was written."""
        stats, state = self.stats, self._state
        stats.whole_input = (
            not self.stopping and self.config.limit is None and self.config.shard is None
        )
        if stats.remade_damaged:
            log.warning(
                "%d items are made again: their files were missing or damaged (verify --repair)",
                stats.remade_damaged,
            )
        if not stats.whole_input or not state.records:
            return
        history = sum(state.counts(matched=False).values())
        if stats.new_rows or history:
            what = "new or changed since the manifest was written"
            if self._last_outcome not in (None, "done"):  # it stopped before the end
                what = "not recorded yet (new, changed, or not reached by the last run)"
            log.info(
                "%d rows %s; %d earlier records are no longer in the input (kept as history)",
                stats.new_rows,
                what,
                history,
            )

    def _attach_pending(self, item: WorkItem, record: dict[str, Any] | None) -> None:
        if not record:
            return
        made_at = float(record.get("generated_at") or 0)
        if time.time() - made_at < self.config.timeouts.url_ttl_s - _URL_MARGIN_S:
            timings = record.get("timings") or {}
            item.generation = Generation(
                urls=tuple(record.get("urls") or ()),
                seed=record.get("seed"),
                inference_s=timings.get("inference"),
                trace_id=record.get("trace_id"),
                latency_s=0.0,
            )
            item.pending_at = made_at

    async def _generate_worker(self) -> None:
        while True:
            origin, _, item = await self._gen_queue.get()
            if item is None:
                return
            if origin == _NEW_ROW:
                self._room.release()
                item.started = time.monotonic()
            if not await self._generate_item(item):
                self._gen_queue.task_done()

    async def _generate_item(self, item: WorkItem) -> bool:
        """Generate ``item`` if it needs it and hand it to the downloaders; ``False`` if it
        ends here instead (failed, or not sent because the run is stopping)."""
        try:
            if self.stopping:
                raise Stopped
            if (disabled := self.disabled_models.get(item.model)) is not None and (
                item.generation is None or item.expired
            ):  # the model is disabled: recorded without sending
                raise ModelDisabledError(disabled, model=item.model, trace_id=None)
            if item.generation is None or item.expired:
                await self._generator.generate(item)
            await self._dl_queue.put(item)
            return True
        except (Stopped, QuotaReachedError, RunBlockedError) as exc:
            if isinstance(exc, RunBlockedError) or (
                isinstance(exc, NoKeyLeftError) and exc.exit_code == EXIT_BLOCKED
            ):
                self._block(exc)
            elif isinstance(exc, NoKeyLeftError):
                self._out_for_today(item.model, exc)
            elif isinstance(exc, QuotaReachedError):
                self._request_stop("quota", str(exc))
            await self._keep_paid(item)  # nothing was sent: the next run takes it
        except (asyncio.CancelledError, FatalApiError) as exc:
            if isinstance(exc, FatalApiError):  # before any other worker sends again
                self._request_stop("fatal", str(exc))
            await self._keep_paid(item)
            raise
        except ModelDisabledError as exc:
            model = exc.model or item.model
            if model not in self.disabled_models:
                self.disabled_models[model] = str(exc)
                log.error("%s is disabled for this account: its rows fail (%s)", model, exc)
            await self._emit(item.row, "failed", item=item, error=exc)
        except SfbatchError as exc:
            await self._emit(item.row, "failed", item=item, error=exc)
        return False

    def _out_for_today(self, model: str, exc: NoKeyLeftError) -> None:
        """No key can go on with ``model`` today: leave its rows for the next run; stop
        (exit 4) once that holds for every model this run has sent (or tried to send) for."""
        if model not in self.out_for_today:
            self.out_for_today[model] = str(exc)
            if any(self._pool.can_go_on(m) for m in self._pool.used_models()):
                log.warning("%s: its rows are left for tomorrow; the other models go on", exc)
        if not any(self._pool.can_go_on(m) for m in self._pool.used_models()):
            self._request_stop("quota", "; ".join(self.out_for_today.values()))

    async def _download_worker(self) -> None:
        while True:
            item = await self._dl_queue.get()
            if item is None:
                return
            try:
                await self._download_item(item)
            except asyncio.CancelledError:
                await self._save_generated(item)
                raise
            self._gen_queue.task_done()

    async def _download_item(self, item: WorkItem) -> None:
        generation = item.generation
        if generation is None:
            raise RuntimeError(f"{item.row.id} reached the downloaders without a generation")
        images: list[StoredImage] = []
        while True:
            outages = self._outage.outages
            try:
                for index in range(len(images), len(generation.urls)):
                    stem = (
                        self._stem(item.row, index)
                        if self._store is None
                        else f"{self._tmp_dir}/up/{uuid.uuid4().hex}"  # uploaded by the store step
                    )
                    images.append(await self._downloader.fetch(generation.urls[index], stem))
            except OutputWriteError as exc:
                self._block(exc)
                await self._save_generated(item)  # paid for: the next run downloads it
                return
            except ExpiredUrlError as exc:
                if item.regenerations >= self.config.retry.max_retries:
                    await self._emit(item.row, "failed", item=item, error=exc)
                else:
                    self._regenerate(item)
                return
            except DownloadError as exc:
                outage = self._outage.paused or self._outage.outages > outages
                if exc.retryable and outage:
                    # the service went down meanwhile: not the item's fault; again once it is back
                    try:
                        await self._outage.wait_ready()
                    except OutageError as stop:
                        self._block(stop)
                        await self._save_generated(item)
                        return
                    continue
                await self._emit(item.row, "failed", item=item, error=exc)
                return
            except SfbatchError as exc:
                await self._emit(item.row, "failed", item=item, error=exc)
                return
            if self._store is not None:
                try:
                    images = await self._store_images(item, images, self._store)
                except StorageError as exc:
                    self.store_error = self.store_error or exc
                    self._block(exc)
                    await self._save_generated(item)  # paid for: the next run uploads it
                    return
            await self._emit(item.row, "ok", item=item, images=images)
            return

    async def _store_images(
        self, item: WorkItem, images: Sequence[StoredImage], store: ImageStore
    ) -> list[StoredImage]:
        """The store step: each image, downloaded to ``DIR/.tmp/up/`` (checked as always),
        uploaded under ``images/SHARD/NAME.EXT``; its record ``path`` is the object URL."""
        stored: list[StoredImage] = []
        try:
            for index, image in enumerate(images):
                stem, ext = self._base_stem(item.row, index), image.path.rpartition(".")[2]
                key = f"{stem}.{ext}"
                if await store.head(key) is not None:  # never overwrite an earlier record's
                    key = f"{stem}~{item.row.fingerprint[:8]}.{ext}"
                local = self.config.out_dir / image.path
                url = await store.put_file(local, key, remove_source=True)
                stored.append(StoredImage(path=url, sha256=image.sha256, bytes=image.bytes))
        finally:
            for image in images:
                (self.config.out_dir / image.path).unlink(missing_ok=True)
        return stored

    def _regenerate(self, item: WorkItem) -> None:
        """Send ``item`` back to the generation workers (same seed), ahead of new rows: a
        download slot never waits on the rate limiter."""
        item.expired = True
        item.regenerations += 1
        self.stats.regenerated += 1
        self._gen_queue.put_nowait((_REGENERATE, next(self._order), item))

    async def _keep_paid(self, item: WorkItem) -> None:
        """Record a generation this run paid for and did not download, for the next run."""
        if item.billed_images and item.generation is not None:
            await self._save_generated(item)

    def _stem(self, row: Row, index: int) -> str:
        stem = self._base_stem(row, index)
        if self._fresh_dirs is not None:
            parent = stem.rpartition("/")[0]
            fresh = self._fresh_dirs.get(parent)
            if fresh is None:
                fresh = not os.path.isdir(os.path.join(self.config.out_dir, parent))
                self._fresh_dirs[parent] = fresh
            if fresh:
                return stem
        return unused_stem(self.config.out_dir, stem, row.fingerprint)

    def _base_stem(self, row: Row, index: int) -> str:
        """``images/SHARD/NAME`` of a row's image, before any ``~FP8`` is added."""
        name = self.config.output.name_template.format(id=row.id, index=index)
        # A prompt's variations share its shard directory.
        base_id = (
            row.id.removesuffix(f"-v{row.variation}")
            if self.config.build.variations > 1
            else row.id
        )
        return f"images/{image_shard_dir(base_id)}/{name}"

    # -- records -------------------------------------------------------------------

    async def _save_generated(self, item: WorkItem) -> None:
        """Keep a paid-for generation whose images are not on disk yet, for the next run."""
        if item.generation is None or self._writer is None:
            return
        made_at = item.pending_at or time.time() - item.generation.latency_s
        self._write(
            build_record(
                item.row, "generated", registry=self.registry, item=item, generated_at=made_at
            )
        )

    async def _save_undownloaded(self) -> None:
        """Once the stages are over: keep what was paid for and is not on disk."""
        while not self._dl_queue.empty():
            item = self._dl_queue.get_nowait()
            if item is not None:
                await self._save_generated(item)
        while not self._gen_queue.empty():
            _, _, waiting = self._gen_queue.get_nowait()
            if waiting is not None:
                await self._keep_paid(waiting)

    def _write(self, record: ManifestRecord) -> None:
        assert self._writer is not None
        try:
            self._writer.append(record)
        except OSError as exc:
            if exc.errno in OUTPUT_ERRNOS:
                raise write_failed(exc, self.config.out_dir) from exc
            raise
        self._state.set_status(record["id"], record["fingerprint"], record["status"])
        stats = self.stats
        status = record["status"]
        stats.billed_images += record["billed_images"]
        if status == "generated":
            return
        stats.counts[status] += 1
        if status == "ok":
            stats.images += len(record["images"])
            stats.bytes += sum(image["bytes"] for image in record["images"])
            stats.latency.add(record["latency_s"])
            timings = record["timings"]
            if timings is not None and (inference := timings["inference"]) is not None:
                stats.inference.add(inference)
        elif (error := record["error"]) is not None:
            reason = Reason.of(status, error)
            stats.reasons[reason] += 1
            stats.examples.setdefault(reason, error["message"])

    async def _emit(
        self,
        row: Row,
        status: Status,
        *,
        item: WorkItem | None = None,
        images: Sequence[StoredImage] = (),
        error: SfbatchError | RecordError | None = None,
    ) -> None:
        """Record ``row`` as finished with ``status``, then hand the record on."""
        record = build_record(
            row, status, registry=self.registry, item=item, images=images, error=error
        )
        self._write(record)
        if self._on_record is not None:
            await self._on_record(record)

    # -- the end --------------------------------------------------------------------

    def _finish(self) -> RunResult:
        if self.out_for_today:  # some rows wait for tomorrow: exit 4 even if the rest ran
            self._request_stop("quota", "; ".join(self.out_for_today.values()))
        outcome: Outcome = self._stop_reason or "done"
        summary = self._summary(outcome)
        path = self.config.out_dir / self.config.summary_name
        tmp = path.with_suffix(".json.tmp")
        try:
            tmp.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
            tmp.replace(path)
        except OSError as exc:  # the manifest holds the truth; the summary is its digest
            tmp.unlink(missing_ok=True)
            log.error("could not write %s: %s", path, exc.strerror or exc)
        return RunResult(
            outcome=outcome,
            summary=summary,
            message=self._stop_message,
            errors=self.stats.error_tallies(),
        )

    def _summary(self, outcome: Outcome) -> dict[str, Any]:
        stats = self.stats
        gen = self._generator
        elapsed = max(stats.elapsed_s, 1e-9)
        return {
            "outcome": outcome,
            "message": self._stop_message,
            "finished_at": now_iso(),
            "elapsed_s": round(elapsed, 3),
            "run": {
                **dict(stats.counts),
                "skipped": stats.skipped,
                "skipped_as": dict(stats.skipped_as),
                "rows_read": stats.rows_read,
                "images": stats.images,
                "bytes": stats.bytes,
                "billed_images": stats.billed_images,
                "requests": gen.requests if gen else 0,
                "retries": gen.retries if gen else 0,
                "rate_limited_429": gen.rate_limited if gen else 0,
                "download_retries": self._downloader.retries if self._downloader else 0,
                "regenerated_expired": stats.regenerated,
            },
            "errors": {reason.key: n for reason, n in stats.reasons.most_common()},
            "throughput": {
                "items_per_s": round(stats.finished / elapsed, 3),
                "images_per_min": round(stats.images * 60 / elapsed, 2),
            },
            "latency_s": stats.latency.percentiles(0.5, 0.95, 0.99),
            "inference_s": stats.inference.percentiles(0.5, 0.95, 0.99),
            # Counts of the current input's items; records of rows no longer in it apart.
            "manifest": dict(self._state.counts(matched=True)),
            "history": sum(self._state.counts(matched=False).values())
            if stats.whole_input
            else None,
            "found": {
                "new_or_changed": stats.new_rows if stats.whole_input else None,
                "remade_damaged": stats.remade_damaged,
                "damaged_lines": [
                    f"{d.path.name}:{d.line}" for d in self._state.damaged[:_DAMAGED_LISTED]
                ],
                "damaged_line_count": len(self._state.damaged),
            },
            # What the rows were read with, so `sfbatch status --input` reads them alike.
            "reading": {
                "defaults": self.config.defaults.as_request(),
                "base_seed": self.config.build.base_seed,
                "variations": self.config.build.variations,
            },
            "quota": {
                "ipd": self.config.ipd,
                "billed_today": self._billed_today(),
            },
            "window": dataclasses.asdict(self._window.statistics()),
            "keys": [dataclasses.asdict(key) for key in self._pool.statistics()],
            "outage": dataclasses.asdict(self._outage.statistics()),
        }


def _last_outcome(summary: Path) -> str | None:
    """How the last run in DIR ended (its ``summary.json``), or None if that is not known."""
    try:
        outcome = orjson.loads(summary.read_bytes()).get("outcome")
    except (OSError, orjson.JSONDecodeError, AttributeError):
        return None
    return outcome if isinstance(outcome, str) else None


async def _numbered(rows: Iterable[Row] | AsyncIterable[Row]) -> AsyncIterator[tuple[int, Row]]:
    """``(n, row)`` from 1, from a sync or an async iterable, yielding to the loop now and then."""
    if isinstance(rows, AsyncIterable):
        n = 0
        async for row in rows:
            n += 1
            if n % _YIELD_EVERY_ROWS == 0:
                await asyncio.sleep(0)  # an async iterable need not yield either
            yield n, row
        return
    for n, row in enumerate(rows, start=1):
        if n % _YIELD_EVERY_ROWS == 0:
            await asyncio.sleep(0)  # a queue with room never yields; let the others run
        yield n, row


RowInput = str | Mapping[str, Any] | Row
_BRIDGE_ITEMS = 256
_BRIDGE_END = object()
_NO_ROW = object()  # an empty input (None is a row: an invalid one)


async def generate(
    rows: Iterable[RowInput] | AsyncIterable[RowInput],
    config: RunConfig,
    *,
    registry: ModelRegistry | None = None,
    on_result: Callable[[RunResult], None] | None = None,
) -> AsyncIterator[ManifestRecord]:
    """Generate images for ``rows`` and yield each manifest record as it is written.

    ``rows`` is an iterable or an async iterable of prompt strings, mappings of row
    fields (``prompt``, ``seed``, ``batch_size``, ...; the same as a JSONL line), or
    :class:`~sfbatch.loader.Row` objects (e.g. a :class:`~sfbatch.loader.PromptSource`).
    The records are those of ``config.out_dir``'s manifest, so a second call resumes
    like the command does. ``on_result`` is called with the :class:`RunResult` (outcome,
    the ``summary.json`` figures, errors by reason) when the run ends, before any error
    below is raised; not when the caller stops iterating early::

        results = []
        async for record in sfbatch.generate(rows, config, on_result=results.append):
            print(record["status"], [image["path"] for image in record["images"]])
        print(results[0].summary["throughput"])

    Like the command, it first lists the endpoint's models (``config.model_check``): a
    row naming a model not offered is recorded ``invalid``, and a default model (or one
    with limits of its own) not offered raises :class:`~sfbatch.errors.ConfigError`
    before anything is sent.

    Raises the :class:`~sfbatch.errors.FatalApiError` that stopped the job (bad key,
    wrong base URL), the :class:`~sfbatch.storage.StorageError` of an ``images_to``
    store that refused or failed, or :class:`~sfbatch.errors.QuotaReachedError` once
    the daily quota ends it early, after yielding every record written before.
    """
    if isinstance(rows, str | bytes | Mapping):
        raise TypeError(
            f"rows is one {type(rows).__name__}, not an iterable of rows: pass [rows] "
            "for a single prompt or row"
        )
    registry = registry or ModelRegistry.load(config.models_file)
    # What the command refuses as flags, refused here before anything is sent or created.
    check_defaults(config.defaults, registry, name_of=lambda field: f"RequestDefaults.{field}")
    offer = await check_models(config, registry)
    source: Iterable[Row] | AsyncGenerator[Row, None]
    if isinstance(rows, PromptSource):
        source = rows
    elif isinstance(rows, AsyncIterable):
        source = _as_async_rows(rows, config, registry, offer)
    else:
        source = _as_rows(rows, config, registry, offer)
    records: asyncio.Queue[ManifestRecord | None] = asyncio.Queue(config.queue_size)
    pipeline = Pipeline(config, source, registry=registry, on_record=records.put)

    async def drive() -> RunResult:
        try:
            return await pipeline.run()
        finally:
            await records.put(None)

    task = asyncio.create_task(drive())
    try:
        while (record := await records.get()) is not None:
            yield record
        result = await task
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if isinstance(source, AsyncGenerator):
            await source.aclose()  # stops its worker thread now, not when collected
    if on_result is not None:
        on_result(result)
    if pipeline.fatal_error is not None:
        raise pipeline.fatal_error
    if pipeline.input_error is not None:
        raise pipeline.input_error
    if pipeline.blocked_error is not None:
        raise pipeline.blocked_error
    if pipeline.store_error is not None:
        raise pipeline.store_error
    if result.outcome == "quota":
        raise QuotaReachedError(result.message)


def _source(
    items: Iterable[str | Mapping[str, Any]],
    config: RunConfig,
    registry: ModelRegistry,
    offer: ModelOffer | None,
) -> PromptSource:
    return PromptSource.from_records(
        items,
        defaults=config.defaults,
        registry=registry,
        offer=offer,
        base_seed=config.base_seed,
        variations=config.variations,
        shard=config.shard,
        limit=config.limit,
        dedupe=config.dedupe,
    )


def _as_rows(
    rows: Iterable[RowInput],
    config: RunConfig,
    registry: ModelRegistry,
    offer: ModelOffer | None,
) -> Iterable[Row]:
    """Rows as given, or validated rows built from strings and mappings."""
    items = iter(rows)
    first = next(items, _NO_ROW)
    if first is _NO_ROW:
        return ()
    chained = itertools.chain((first,), items)
    if isinstance(first, Row):
        return chained  # type: ignore[return-value]
    return _source(chained, config, registry, offer)  # type: ignore[arg-type]


async def _as_async_rows(
    rows: AsyncIterable[RowInput],
    config: RunConfig,
    registry: ModelRegistry,
    offer: ModelOffer | None,
) -> AsyncGenerator[Row, None]:
    """:func:`_as_rows` for an async iterable.

    The loader is synchronous (its validation, ids, dedupe and shards are one stateful
    pass), so strings and mappings are validated in a worker thread that reads them
    from a queue the async iterable fills, at most ``_BRIDGE_ITEMS`` ahead.
    """
    items = aiter(rows)
    first = await anext(items, _NO_ROW)
    if first is _NO_ROW:
        return
    if isinstance(first, Row):
        yield first
        async for row in items:
            yield row  # type: ignore[misc]
        return
    loop = asyncio.get_running_loop()
    room = asyncio.Semaphore(_BRIDGE_ITEMS)
    inbox: queue.SimpleQueue[object] = queue.SimpleQueue()

    def fed() -> Iterator[str | Mapping[str, Any]]:  # runs in the worker thread
        while (item := inbox.get()) is not _BRIDGE_END:
            loop.call_soon_threadsafe(room.release)
            yield item  # type: ignore[misc]

    async def pump() -> None:
        try:
            inbox.put(first)
            async for item in items:
                await room.acquire()
                inbox.put(item)
        finally:
            inbox.put(_BRIDGE_END)

    pumping = asyncio.create_task(pump())
    built = iter(_source(fed(), config, registry, offer))

    def next_row() -> Row | None:  # runs in the worker thread
        return next(built, None)

    try:
        while (made := await asyncio.to_thread(next_row)) is not None:
            yield made
        await pumping  # the async iterable's own error, if it raised one
    finally:
        pumping.cancel()
        inbox.put(_BRIDGE_END)  # a worker still waiting for an item returns
