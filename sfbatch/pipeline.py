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
- 401/403/404 from the API: cancelled at once; outcome ``fatal`` (exit 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import orjson

from sfbatch.client import Generation, SiliconFlowClient
from sfbatch.config import RunConfig
from sfbatch.downloader import Downloader, StoredImage, clean_tmp
from sfbatch.errors import (
    ConfigError,
    ExpiredUrlError,
    FatalApiError,
    InputFileError,
    QuotaReachedError,
    SfbatchError,
)
from sfbatch.generator import DailyQuota, Generator, Stopped, WorkItem
from sfbatch.identity import unused_stem
from sfbatch.limiter import RateLimiter
from sfbatch.loader import JobRows, PromptSource, Row, image_shard_dir
from sfbatch.manifest import ManifestWriter, day_start_iso, now_iso
from sfbatch.models import ModelRegistry, effective_params
from sfbatch.resume import ResumeIndex, read_index
from sfbatch.retry import RetryPolicy

__all__ = ["Outcome", "Pipeline", "RunResult", "RunStats", "error_key", "generate"]

Outcome = Literal["done", "quota", "interrupted", "fatal", "input_error"]
_YIELD_EVERY_ROWS = 256
# A "generated" record's URLs are reused only while this much of their lifetime is left.
_URL_MARGIN_S = 120.0


class _Reservoir:
    """A fixed-size uniform sample of a stream of numbers (for percentiles)."""

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

    def percentiles(self, *qs: float) -> dict[str, float | None]:
        ordered = sorted(self._values)
        out: dict[str, float | None] = {}
        for q in qs:
            key = f"p{int(q * 100)}"
            out[key] = (
                round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) if ordered else None
            )
        return out


@dataclass
class RunStats:
    """Counters of this run (trio-style ``statistics()``)."""

    started: float = field(default_factory=time.monotonic)
    counts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    rows_read: int = 0
    images: int = 0
    bytes: int = 0
    billed_images: int = 0
    regenerated: int = 0
    latency: _Reservoir = field(default_factory=_Reservoir)
    inference: _Reservoir = field(default_factory=_Reservoir)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def finished(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class RunResult:
    """How a run ended, and the summary written to ``summary.json``."""

    outcome: Outcome
    summary: dict[str, Any]
    message: str = ""

    @property
    def exit_code(self) -> int:
        if self.outcome == "fatal":
            return 3
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

    Create it inside the running loop; call :meth:`run` once. ``on_record`` is awaited
    with every record after it is in the manifest (the library's :func:`generate`
    uses it; so does the progress display).
    """

    def __init__(
        self,
        config: RunConfig,
        rows: Iterable[Row],
        *,
        registry: ModelRegistry | None = None,
        on_record: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self.registry = registry or ModelRegistry.load(config.models_file)
        self.stats = RunStats()
        self._rows = rows
        self._on_record = on_record
        self._gen_queue: asyncio.Queue[WorkItem | None] = asyncio.Queue(config.queue_size)
        self._dl_queue: asyncio.Queue[WorkItem | None] = asyncio.Queue(
            2 * config.download_concurrency
        )
        self._stop_reason: Outcome | None = None
        self._stop_message = ""
        self._interrupts = 0
        self._stages: asyncio.Task[None] | None = None
        self._cancelled_by_us = False
        self._writer: ManifestWriter | None = None
        self._state = ResumeIndex()
        self._limiter: RateLimiter | None = None
        self._generator: Generator | None = None
        self._downloader: Downloader | None = None
        self._quota: DailyQuota | None = None
        self.fatal_error: FatalApiError | None = None
        self.input_error: BaseException | None = None

    # -- control ---------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop_reason is not None

    def interrupt(self) -> None:
        """First call: stop taking rows, let in-flight work land for ``grace_s``; second: now."""
        self._interrupts += 1
        if self._interrupts == 1:
            self._request_stop("interrupted", "interrupted: finishing in-flight work")
            asyncio.get_running_loop().call_later(self.config.grace_s, self._cancel_stages)
        else:
            self._request_stop("interrupted", "interrupted twice: stopping now")
            self._cancel_stages()

    def _request_stop(self, reason: Outcome, message: str) -> None:
        if self._stop_reason is None or reason in ("fatal", "input_error"):
            self._stop_reason, self._stop_message = reason, message

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
            "requests": gen.requests if gen else 0,
            "retries": gen.retries if gen else 0,
            "rate_limited": gen.rate_limited if gen else 0,
            "in_generation_queue": self._gen_queue.qsize(),
            "in_download_queue": self._dl_queue.qsize(),
            "limiter": self._limiter.statistics() if self._limiter else {},
            "quota_remaining": self._quota.remaining if self._quota else None,
            "stopping": self._stop_reason,
        }

    # -- run ----------------------------------------------------------------------

    async def run(self) -> RunResult:
        """Run the job to its end; never raises for item-level failures."""
        cfg = self.config
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        clean_tmp(cfg.out_dir)
        manifest_path = cfg.out_dir / cfg.manifest_name
        self._state = read_index([manifest_path], day_start=day_start_iso(cfg.day_utc_offset_h))
        if isinstance(self._rows, JobRows | PromptSource):
            self._rows.legacy = self._state  # rows made by an older sfbatch keep their ids
        if cfg.ipd is not None:
            self._quota = DailyQuota(
                limit=cfg.ipd, used=self._state.billed_today, utc_offset_h=cfg.day_utc_offset_h
            )
        # Rows may set their own batch_size: size the limiter for the largest any model takes.
        max_batch = max(rule.max_batch_size for rule in self.registry)
        self._limiter = RateLimiter(rpm=cfg.rpm, ipm=cfg.ipm, max_batch_size=max_batch)
        self._limiter.check_batch_size(cfg.defaults.batch_size or 1)
        self._writer = ManifestWriter(manifest_path)
        api_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=cfg.concurrency), raise_for_status=False
        )
        dl_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=cfg.download_concurrency)
        )
        client = SiliconFlowClient(
            base_url=cfg.base_url,
            api_key=cfg.api_key,
            session=api_session,
            request_timeout_s=cfg.request_timeout_s,
            connect_timeout_s=cfg.connect_timeout_s,
        )
        retry = RetryPolicy(
            max_retries=cfg.max_retries, base_s=cfg.backoff_base_s, cap_s=cfg.backoff_cap_s
        )
        self._generator = Generator(
            client=client,
            limiter=self._limiter,
            retry=retry,
            quota=self._quota,
            stopping=lambda: self.stopping,
        )
        self._downloader = Downloader(
            out_dir=cfg.out_dir,
            session=dl_session,
            timeout_s=cfg.download_timeout_s,
            max_bytes=cfg.max_image_bytes,
            retry=retry,
            fsync=cfg.fsync_images,
        )
        try:
            await self._run_stages()
        except* FatalApiError as group:
            fatal = group.exceptions[0]
            assert isinstance(fatal, FatalApiError)
            self.fatal_error = fatal
            self._request_stop("fatal", str(fatal))
        except* InputFileError as group:
            # The file broke mid-way (corrupt gzip, no CSV header): what was made is kept.
            self.input_error = group.exceptions[0]
            self._request_stop("input_error", str(self.input_error))
        finally:
            await self._save_undownloaded()
            self._writer.close()
            await api_session.close()
            await dl_session.close()
            clean_tmp(cfg.out_dir)
        return self._finish()

    async def _run_stages(self) -> None:
        self._stages = asyncio.create_task(self._stages_body())
        try:
            await self._stages
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not self._cancelled_by_us or (current is not None and current.cancelling()):
                raise

    async def _stages_body(self) -> None:
        cfg = self.config
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._load())
            generators = [tg.create_task(self._generate_worker()) for _ in range(cfg.concurrency)]
            for _ in range(cfg.download_concurrency):
                tg.create_task(self._download_worker())
            tg.create_task(self._close_downloads_after(generators))

    async def _close_downloads_after(self, generators: list[asyncio.Task[None]]) -> None:
        await asyncio.wait(generators)
        for _ in range(self.config.download_concurrency):
            await self._dl_queue.put(None)

    # -- stages -------------------------------------------------------------------

    async def _load(self) -> None:
        state, stats = self._state, self.stats
        for n, row in enumerate(self._rows, start=1):
            stats.rows_read = n
            if n % _YIELD_EVERY_ROWS == 0:
                await asyncio.sleep(0)  # a queue with room never yields; let the others run
            if self.stopping:
                break
            status = state.status(row.id, row.fingerprint)
            if status == "ok" or (status == "failed" and not self.config.retry_failed):
                stats.skipped += 1
                continue
            if not row.valid:
                if status == "invalid":
                    stats.skipped += 1
                else:
                    await self._emit(self._record(row, "invalid", error=_invalid(row)))
                continue
            unfit = self._batch_problem(row)
            if unfit is not None:
                await self._emit(self._record(row, "invalid", error=_invalid(row, unfit)))
                continue
            if row.duplicate_of is not None:
                if status == "duplicate":
                    stats.skipped += 1
                else:
                    await self._emit(self._record(row, "duplicate"))
                continue
            item = WorkItem(row=row)
            if status == "generated":
                self._attach_pending(item, state.generated_record(row.id, row.fingerprint))
            await self._gen_queue.put(item)
        # Only on the way out through the end of input or a stop: after an error the
        # TaskGroup cancels the workers, and a put into a full queue would never return.
        for _ in range(self.config.concurrency):
            await self._gen_queue.put(None)

    def _batch_problem(self, row: Row) -> str | None:
        """Why the limiter can never admit this row's batch, if it cannot."""
        assert self._limiter is not None and row.request is not None
        try:
            self._limiter.check_batch_size(row.request.get("batch_size", 1))
        except ConfigError as exc:
            return f"{row.file}:{row.line}: {exc}"
        return None

    def _attach_pending(self, item: WorkItem, record: dict[str, Any] | None) -> None:
        if not record:
            return
        made_at = float(record.get("generated_at") or 0)
        if time.time() - made_at < self.config.url_ttl_s - _URL_MARGIN_S:
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
        assert self._generator is not None
        while True:
            item = await self._gen_queue.get()
            if item is None:
                return
            if self.stopping:
                continue  # never sent, so nothing is lost: the next run takes it
            item.started = time.monotonic()
            if item.generation is None:
                try:
                    await self._generator.generate(item)
                except Stopped:
                    continue
                except QuotaReachedError as exc:
                    self._request_stop("quota", str(exc))
                    continue
                except FatalApiError:
                    raise
                except SfbatchError as exc:
                    await self._emit(self._record(item.row, "failed", item=item, error=exc))
                    continue
            await self._dl_queue.put(item)

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

    async def _download_item(self, item: WorkItem) -> None:
        assert self._downloader is not None and self._generator is not None
        regenerations = 0
        while True:
            generation = item.generation
            assert generation is not None
            try:
                images = [
                    await self._downloader.fetch(url, self._stem(item.row, index))
                    for index, url in enumerate(generation.urls)
                ]
            except ExpiredUrlError as exc:
                regenerations += 1
                self.stats.regenerated += 1
                if regenerations > self.config.max_retries:
                    await self._emit(self._record(item.row, "failed", item=item, error=exc))
                    return
                try:
                    await self._generator.generate(item)
                except (Stopped, QuotaReachedError):
                    await self._save_generated(item)  # expired URLs: the next run regenerates
                    return
                except SfbatchError as gen_exc:
                    if isinstance(gen_exc, FatalApiError):
                        raise
                    await self._emit(self._record(item.row, "failed", item=item, error=gen_exc))
                    return
                continue
            except SfbatchError as exc:
                await self._emit(self._record(item.row, "failed", item=item, error=exc))
                return
            await self._emit(self._record(item.row, "ok", item=item, images=images))
            return

    def _stem(self, row: Row, index: int) -> str:
        name = self.config.name_template.format(id=row.id, index=index)
        # A prompt's variations share its shard directory.
        base_id = (
            row.id.removesuffix(f"-v{row.variation}") if self.config.variations > 1 else row.id
        )
        return unused_stem(
            self.config.out_dir, f"images/{image_shard_dir(base_id)}/{name}", row.fingerprint
        )

    # -- records -------------------------------------------------------------------

    async def _save_generated(self, item: WorkItem) -> None:
        """Keep a paid-for generation whose images are not on disk yet, for the next run."""
        if item.generation is None or self._writer is None:
            return
        record = self._record(item.row, "generated", item=item)
        record["urls"] = list(item.generation.urls)
        record["generated_at"] = item.pending_at or time.time() - item.generation.latency_s
        self._write(record)

    async def _save_undownloaded(self) -> None:
        while not self._dl_queue.empty():
            item = self._dl_queue.get_nowait()
            if item is not None:
                await self._save_generated(item)

    def _write(self, record: dict[str, Any]) -> None:
        assert self._writer is not None
        self._writer.append(record)
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
            inference = (record.get("timings") or {}).get("inference")
            if inference is not None:
                stats.inference.add(inference)
        elif record["error"]:
            stats.errors[error_key(status, record["error"])] += 1

    async def _emit(self, record: dict[str, Any]) -> None:
        self._write(record)
        if self._on_record is not None:
            await self._on_record(record)

    def _record(
        self,
        row: Row,
        status: str,
        *,
        item: WorkItem | None = None,
        images: list[StoredImage] | None = None,
        error: SfbatchError | dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        request = row.request or {}
        params = effective_params(request, self.registry) if row.request else {}
        generation = item.generation if item else None
        trace_id = generation.trace_id if generation else getattr(error, "trace_id", None)
        return {
            # FRONT_FIELDS first, in order: resume.read_index reads them without a full parse.
            "id": row.id,
            "status": status,
            "finished_at": now_iso(),
            "billed_images": item.billed_images if item else 0,
            "fingerprint": row.fingerprint,
            "line": row.line,
            "file": row.file,
            "variation": row.variation,
            "prompt": request.get("prompt", row.prompt),
            "negative_prompt": request.get("negative_prompt"),
            "model": params.get("model"),
            "image_size": params.get("image_size"),
            "batch_size": params.get("batch_size"),
            "num_inference_steps": params.get("num_inference_steps"),
            "guidance_scale": params.get("guidance_scale"),
            "prompt_enhancement": params.get("prompt_enhancement"),
            "requested_seed": request.get("seed"),
            "seed": generation.seed if generation else None,
            "timings": {"inference": generation.inference_s} if generation else None,
            "images": [image.as_record() for image in images or ()],
            "attempts": item.attempts if item else 0,
            "latency_s": round(time.monotonic() - item.started, 3) if item else 0.0,
            "trace_id": trace_id,
            "error": error.to_record() if isinstance(error, SfbatchError) else error,
            "duplicate_of": row.duplicate_of,
        }

    # -- the end --------------------------------------------------------------------

    def _finish(self) -> RunResult:
        outcome: Outcome = self._stop_reason or "done"
        summary = self._summary(outcome)
        path = self.config.out_dir / self.config.summary_name
        tmp = path.with_suffix(".json.tmp")
        tmp.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
        tmp.replace(path)
        return RunResult(outcome=outcome, summary=summary, message=self._stop_message)

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
            "errors": dict(stats.errors.most_common()),
            "throughput": {
                "items_per_s": round(stats.finished / elapsed, 3),
                "images_per_min": round(stats.images * 60 / elapsed, 2),
            },
            "latency_s": stats.latency.percentiles(0.5, 0.95, 0.99),
            "inference_s": stats.inference.percentiles(0.5, 0.95, 0.99),
            "manifest": dict(self._state.counts()),
            "quota": {
                "ipd": self.config.ipd,
                "billed_today": self._quota.used if self._quota else None,
            },
        }


def _invalid(row: Row, message: str | None = None) -> dict[str, Any]:
    return {"status": None, "code": "invalid", "message": message or row.error}


def error_key(status: str, error: dict[str, Any]) -> str:
    """A short key to count errors by: ``failed: 400 20012``, ``failed: DownloadError``."""
    parts = [str(part) for part in (error.get("status"), error.get("code")) if part is not None]
    return f"{status}: {' '.join(parts) or 'unknown'}"


async def generate(
    rows: Iterable[str | Mapping[str, Any]] | Iterable[Row],
    config: RunConfig,
    *,
    registry: ModelRegistry | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Generate images for ``rows`` and yield each manifest record as it is written.

    ``rows`` are prompt strings, mappings of row fields (``prompt``, ``seed``,
    ``batch_size``, ...; the same as a JSONL line), or :class:`~sfbatch.loader.Row`
    objects (e.g. a :class:`~sfbatch.loader.PromptSource`). The records are those of
    ``config.out_dir``'s manifest, so a second call resumes like the command does::

        async for record in sfbatch.generate(["a cat", {"prompt": "a dog", "seed": 7}], config):
            print(record["status"], record["images"])

    Raises the :class:`~sfbatch.errors.FatalApiError` that stopped the job (bad key,
    wrong base URL) or :class:`~sfbatch.errors.QuotaReachedError` once the daily
    quota ends it early, after yielding every record written before.
    """
    registry = registry or ModelRegistry.load(config.models_file)
    source = rows if isinstance(rows, PromptSource) else _as_rows(rows, config, registry)
    records: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(config.queue_size)
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
    if pipeline.fatal_error is not None:
        raise pipeline.fatal_error
    if pipeline.input_error is not None:
        raise pipeline.input_error
    if result.outcome == "quota":
        raise QuotaReachedError(result.message)


def _as_rows(
    rows: Iterable[str | Mapping[str, Any]] | Iterable[Row],
    config: RunConfig,
    registry: ModelRegistry,
) -> Iterable[Row]:
    """Rows as given, or validated rows built from strings and mappings."""
    items = iter(rows)
    first = next(items, None)
    if first is None:
        return ()
    chained = itertools.chain((first,), items)
    if isinstance(first, Row):
        return chained  # type: ignore[return-value]
    return PromptSource.from_records(
        chained,  # type: ignore[arg-type]
        defaults=config.defaults,
        registry=registry,
        base_seed=config.base_seed,
        variations=config.variations,
        shard=config.shard,
        limit=config.limit,
        dedupe=config.dedupe,
    )
