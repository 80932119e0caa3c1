"""The ``sfbatch`` command: argument parsing and exit codes.

Each subcommand's work lives in its own module, which exposes
``register(subparsers) -> None``; the parser it adds sets ``handler``, a callable
``(argparse.Namespace) -> int`` returning the exit code. ``run`` lives here.

Exit codes: 0 all ok; 1 finished with failed or invalid items; 2 usage, config or
input file error; 3 authentication or base-URL failure; 4 daily quota used up
(resumable); 130 interrupted (resumable).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from sfbatch.config import parse_shard
from sfbatch.errors import ConfigError, SfbatchError

__all__ = [
    "EXIT_AUTH",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_QUOTA",
    "EXIT_USAGE",
    "main",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_QUOTA = 4
EXIT_INTERRUPTED = 130

log = logging.getLogger("sfbatch")


def _shard(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_request_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``run`` and ``validate``: the input, request defaults, limits."""
    parser.add_argument(
        "input",
        metavar="PROMPTS|JOB.toml",
        help="prompt file (.txt .jsonl .csv .tsv, optionally .gz; - for stdin) or a job file",
    )
    parser.add_argument(
        "--out", type=Path, help="output directory (required unless the job file sets it)"
    )
    parser.add_argument(
        "--base-url",
        help="API base URL including /v1 (default: $SILICONFLOW_BASE_URL or https://api.siliconflow.cn/v1)",
    )
    parser.add_argument(
        "--profile",
        choices=("cn", "com"),
        help="base URL profile: cn = api.siliconflow.cn, com = api.siliconflow.com",
    )
    parser.add_argument("--model", help="model for rows that do not name one")
    parser.add_argument("--image-size", help="WIDTHxHEIGHT for rows that do not set one")
    parser.add_argument("--batch-size", type=int, help="images per request (1..4)")
    parser.add_argument(
        "--steps", type=int, dest="num_inference_steps", metavar="N", help="num_inference_steps"
    )
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--cfg", type=float, help="cfg, for Qwen/Qwen-Image models")
    parser.add_argument("--negative-prompt")
    parser.add_argument(
        "--seed",
        type=int,
        help="seed for rows without one (else derived from --base-seed and the row id)",
    )
    parser.add_argument("--prompt-enhancement", action="store_true", default=None)
    parser.add_argument(
        "--base-seed", type=int, help="base of the derived per-row seeds (default 0)"
    )
    parser.add_argument(
        "--variations", type=int, help="images per prompt, each with its own derived seed"
    )
    parser.add_argument(
        "--dedupe", action="store_true", default=None, help="make identical prompt+parameters once"
    )
    parser.add_argument(
        "--models-file", type=Path, help="TOML file adding or overriding model rules"
    )
    parser.add_argument("--rpm", type=float, help="requests per minute the account allows")
    parser.add_argument("--ipm", type=float, help="images per minute the account allows")
    parser.add_argument("--ipd", type=int, help="images per day: stop cleanly (exit 4) when made")
    parser.add_argument(
        "--tz-offset",
        type=float,
        dest="day_utc_offset_h",
        metavar="HOURS",
        help="UTC offset in hours of the account's day (default 8)",
    )
    parser.add_argument(
        "--shard", type=_shard, help="I/N: take only the rows whose id hashes to shard I of N"
    )
    parser.add_argument("--limit", type=int, help="read only the first N rows of the input")


def _add_run(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="generate images for a prompt file or job file",
        description="Generate images for every row of PROMPTS (or the job file's inputs), "
        "resuming from DIR/manifest.jsonl. The API key comes from $SILICONFLOW_API_KEY.",
    )
    add_request_flags(parser)
    parser.add_argument("--concurrency", type=int, help="generation requests in flight (default 4)")
    parser.add_argument("--download-concurrency", type=int, help="downloads in flight (default 8)")
    parser.add_argument("--max-retries", type=int, help="retries of a failing request (default 5)")
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        default=None,
        help="try items recorded as failed again",
    )
    parser.add_argument(
        "--emulator",
        action="store_true",
        default=None,
        help="run against an embedded emulator (what the demo job does when no API key is set)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        dest="grace_s",
        metavar="SECONDS",
        help="seconds in-flight work may take after Ctrl-C (default 30)",
    )
    add_output_flags(parser)
    parser.set_defaults(handler=run_command)


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar even on a terminal"
    )


def build_parser() -> argparse.ArgumentParser:
    from sfbatch import __version__, gallery, status, validate
    from sfbatch.emulator import cli as emulator_cli

    parser = argparse.ArgumentParser(
        prog="sfbatch",
        description="Batch image generation for the SiliconFlow images API.",
    )
    parser.add_argument("--version", action="version", version=f"sfbatch {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(subparsers)
    for module in (validate, status, gallery, emulator_cli):
        module.register(subparsers)
    return parser


def setup_logging(args: argparse.Namespace) -> None:
    from sfbatch.progress import configure_logging

    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    configure_logging(level=level, json_format=args.log_format == "json")


def run_command(args: argparse.Namespace) -> int:
    setup_logging(args)
    try:
        from sfbatch.jobfile import build_run

        job = build_run(args)
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    try:
        return asyncio.run(_run(job, args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


async def _run(job: Any, args: argparse.Namespace) -> int:
    from sfbatch.pipeline import Pipeline
    from sfbatch.progress import Progress

    async with _api_endpoint(job) as config:
        if not config.api_key:
            log.error(
                "%s is not set: export your key (or use --emulator to try "
                "sfbatch against the embedded emulator)",
                job.key_env,
            )
            return EXIT_AUTH
        try:
            sources = [job.source(path) for path in job.inputs]
            rows = _chain(sources)
            pipeline = Pipeline(config, rows, registry=job.registry)
        except SfbatchError as exc:
            log.error("%s", exc)
            return EXIT_USAGE
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, _on_signal, pipeline, sig)
        progress = Progress(pipeline, sources=sources, enabled=not (args.no_progress or args.quiet))
        try:
            async with progress:
                result = await pipeline.run()
        except ConfigError as exc:
            log.error("%s", exc)
            return EXIT_USAGE
        except SfbatchError as exc:  # e.g. the input file failed mid-way
            log.error("%s", exc)
            return EXIT_USAGE
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        progress.print_summary(result)
        return result.exit_code


def _on_signal(pipeline: Any, sig: signal.Signals) -> None:
    if pipeline.stopping:
        log.warning("second %s: stopping now; run the same command again to resume", sig.name)
    else:
        log.warning(
            "%s: finishing in-flight work (up to %.0f s; again to stop at once)",
            sig.name,
            pipeline.config.grace_s,
        )
    pipeline.interrupt()


def _chain(sources: Sequence[Any]) -> Any:
    from sfbatch.loader import JobRows

    return JobRows(sources)  # one id space for all the files of a job


@contextlib.asynccontextmanager
async def _api_endpoint(job: Any) -> AsyncIterator[Any]:
    """The run's config, pointed at an embedded emulator when the job asks for one."""
    import dataclasses

    from sfbatch.emulator import Emulator

    config = job.config
    use_emulator = job.emulator == "on" or (job.emulator == "auto" and not config.api_key)
    if not use_emulator:
        yield config
        return
    async with Emulator(**job.emulator_settings) as emulator:
        why = "as asked" if job.emulator == "on" else "no API key set"
        log.info("%s: running against the embedded emulator at %s", why, emulator.base_url)
        yield dataclasses.replace(config, base_url=emulator.base_url, api_key=emulator.api_key)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
