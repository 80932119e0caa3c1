"""The ``sfbatch`` command: argument parsing and exit codes.

Each subcommand's work lives in its own module, which declares its ``COMMANDS``
(:class:`sfbatch.commands.Command`: name, handler, flags); the handler, a callable
``(argparse.Namespace) -> int``, returns the exit code. ``run`` lives here.

Exit codes: 0 all ok; 1 finished with failed or invalid items; 2 usage, config or
input file error (also a model the endpoint does not offer, found before any request);
3 authentication or base-URL failure; 4 daily quota used up
(resumable); 130 interrupted (resumable).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import importlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sfbatch import jobfile
from sfbatch.commands import Command, add_command, flag_type, path_arg
from sfbatch.config import BASE_URLS, DEFAULT_KEY_ENV, KEYS_ENV, RunConfig
from sfbatch.errors import ConfigError, FatalApiError, SfbatchError
from sfbatch.jobfile import Job
from sfbatch.models import DEFAULT_MODEL
from sfbatch.settings import Spec, own_specs, specs_of

__all__ = [
    "EXIT_AUTH",
    "EXIT_BLOCKED",
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
EXIT_BLOCKED = 5  # something outside the run must be fixed (disk, balance, outage)
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a tool killed by it would end
# The subcommands declared here, and the modules that declare the others (``COMMANDS``)
_BUILTIN_COMMANDS = ("run", "validate")
_COMMAND_MODULES = ("sfbatch.status", "sfbatch.gallery", "sfbatch.emulator.cli", "sfbatch.export")
# Allocations between two young-generation collections during a run (Python's default: 700)
_GC_GEN0 = 20_000

log = logging.getLogger("sfbatch")


def _flag_type(spec: Spec) -> Callable[[str], Any]:
    parse = spec.setting.parse
    if parse is None:
        converter: Callable[[str], Any] = path_arg if spec.kind is Path else spec.kind
        return converter
    return flag_type(parse, ConfigError)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """The input and one flag per :class:`~sfbatch.config.RunConfig` setting (``--rpm``,
    ``--download-timeout``, ...); each flag's ``dest`` is its spec id (``limits.rpm``)."""
    parser.add_argument(
        "input",
        metavar="PROMPTS|JOB.toml",
        help="prompt file (.txt .jsonl .csv .tsv, optionally .gz; - for stdin) or a job file",
    )
    parser.add_argument(
        "--profile",
        choices=tuple(BASE_URLS),
        help="base URL profile: cn = api.siliconflow.cn, com = api.siliconflow.com",
    )
    for spec in specs_of(RunConfig):
        help_text = spec.setting.help
        shown = _default_text(spec)
        if shown is not None and "default" not in help_text:
            help_text += f" (default {shown})"
        options: dict[str, Any] = {"dest": spec.id, "default": None, "help": help_text}
        if spec.kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = _flag_type(spec)
            options["metavar"] = _METAVARS.get(spec.key[-2:], spec.flag.upper().replace("-", "_"))
        parser.add_argument(f"--{spec.flag}", **options)


_METAVARS = {"_s": "SECONDS", "_h": "HOURS"}


def _default_text(spec: Spec) -> str | None:
    """How ``--help`` shows ``spec``'s default: ``4``, ``on``, ``no limit``..."""
    value = spec.default
    if value is None or value is dataclasses.MISSING:
        return _UNSET_DEFAULTS.get(spec.id)
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


# What an unset (None) setting means, for --help: the help shows every default.
_UNSET_DEFAULTS = {
    "request.model": f"{DEFAULT_MODEL}",
    "request.image_size": "the model's own",
    "request.batch_size": "1",
    "request.num_inference_steps": "the model's own",
    "request.guidance_scale": "the model's own",
    "request.cfg": "the model's own",
    "request.negative_prompt": "none",
    "request.prompt_enhancement": "the model's own",
    "limits.rpm": "no limit",
    "limits.ipm": "no limit",
    "limits.ipd": "no limit",
    "build.limit": "every row",
    "build.shard": "all rows",
    "build.models_file": "the built-in rules",
    "limits.concurrency": "auto",
}


# The job file's own keys (not RunConfig settings), for the README's table.
_JOB_KEY_HELP = {
    "job.name": "the job's name (default: the file's name without .toml)",
    "job.inputs": "prompt files, relative to the job file",
    "job.emulator": "off, auto (the embedded emulator when no API key is set) or on; "
    "flag --emulator",
    "api.profile": "cn or com: which base URL; flag --profile",
    "api.key_env": f"environment variable holding the API key (default {DEFAULT_KEY_ENV}); "
    "flag --key-env",
    "api.key_envs": "environment variables holding one key each, of separate accounts "
    "(default: SILICONFLOW_API_KEYS=key1,key2 when the key variable is unset)",
}


def job_keys_table() -> str:
    """Every job-file key as a Markdown table, as README.md shows it (a test holds them equal:
    ``python3 -c 'from sfbatch.cli import job_keys_table; print(job_keys_table())'``)."""
    from sfbatch.jobfile import EmulatorSettings, job_keys

    rows = [(key, _JOB_KEY_HELP.get(key, "")) for key in job_keys() if key in _JOB_KEY_HELP]
    for spec in specs_of(RunConfig):
        shown = _default_text(spec)
        text = spec.setting.help
        if shown is not None and "default" not in text:
            text += f" (default {shown})"
        rows.append((spec.id, f"{text}; flag --{spec.flag}"))
    for spec in own_specs(EmulatorSettings):
        rows.append((spec.id, f"{spec.setting.help} (only when the embedded emulator runs)"))
    lines = ["| key | what it sets |", "|---|---|"]
    lines += [f"| `{key}` | {text.replace('|', '/')} |" for key, text in rows]
    return "\n".join(lines)


def job_from_args(args: argparse.Namespace) -> Job:
    """The job the parsed flags describe: a job file (if the input is one) under the flags."""
    given = str(args.input)
    job_file = jobfile.load(Path(given)) if given.endswith(".toml") else None
    overrides = jobfile.Overrides(
        settings={
            spec.id: value
            for spec in specs_of(RunConfig)
            if (value := getattr(args, spec.id)) is not None
        },
        input=None if job_file else given,
        profile=args.profile,
        emulator=bool(getattr(args, "emulator", False)),
        key_env=getattr(args, "key_env", None),
    )
    return jobfile.merge(job_file, overrides)


def _add_run(subparsers: Any) -> None:
    parser = add_command(subparsers, Command("run", run_command))
    add_config_flags(parser)
    _add_run_flags(parser)


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """``run``'s own flags (key variable, emulator, output); ``validate`` takes them too,
    so a run's command line with ``run`` changed to ``validate`` checks as it is."""
    parser.add_argument(
        "--key-env",
        metavar="NAME",
        help=f"environment variable holding the API key (default {DEFAULT_KEY_ENV}, "
        "or the job's api.key_env)",
    )
    parser.add_argument(
        "--emulator",
        action="store_true",
        default=None,
        help="run against an embedded emulator (what the demo job does when no API key is set)",
    )
    add_output_flags(parser)


def _add_validate(subparsers: Any) -> None:
    parser = add_command(subparsers, Command("validate", validate_command))
    add_config_flags(parser)
    _add_run_flags(parser)


def validate_command(args: argparse.Namespace) -> int:
    """check a prompt file or job offline: rows, model rules, limits, base URL

    Check everything `sfbatch run` would check, without sending a request.
    """
    from sfbatch.validate import validate_job

    if getattr(args, "job.out") is None:
        setattr(args, "job.out", Path("."))  # validate writes nothing
    # The report lists every warning itself, on stdout: not a second time on stderr.
    logger = logging.getLogger("sfbatch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        job = job_from_args(args)
        problems = validate_job(job, out=sys.stdout)
    except SfbatchError as exc:
        print(f"sfbatch validate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        logger.setLevel(level)
    return EXIT_USAGE if problems else EXIT_OK


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar even on a terminal"
    )


def build_parser(*, all_commands: bool = True) -> argparse.ArgumentParser:
    """The ``sfbatch`` parser; without ``all_commands`` only ``run`` and ``validate``, whose
    parser needs none of the other commands' modules (importing them is start-up CPU)."""
    from sfbatch import __version__

    parser = argparse.ArgumentParser(
        prog="sfbatch",
        description="Batch image generation for the SiliconFlow images API.",
    )
    parser.add_argument("--version", action="version", version=f"sfbatch {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(subparsers)
    _add_validate(subparsers)
    if not all_commands:
        return parser
    for name in _COMMAND_MODULES:
        for command in importlib.import_module(name).COMMANDS:
            add_command(subparsers, command)
    return parser


def setup_logging(args: argparse.Namespace) -> None:
    from sfbatch.logs import configure_logging

    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    configure_logging(level=level, json_format=args.log_format == "json")


def run_command(args: argparse.Namespace) -> int:
    """generate images for a prompt file or job file

    Generate images for every row of PROMPTS (or the job file's inputs), resuming from
    DIR/manifest.jsonl. The API key comes from $SILICONFLOW_API_KEY (or --key-env NAME).
    Every job-file key is in README.md's job-file table.
    """
    setup_logging(args)
    try:
        job = job_from_args(args)
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    try:
        with _run_gc():
            return asyncio.run(_run(job, args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


@contextlib.contextmanager
def _run_gc() -> Iterator[None]:
    """The collector during a run: off what start-up made, and less often; as before after
    (``main()`` may be called in a process that goes on)."""
    threshold = gc.get_threshold()
    # The modules and the job are loaded for good: keep the collector off them, and let it
    # run less often (a run allocates a few containers per item, and frees them soon).
    gc.freeze()
    gc.set_threshold(_GC_GEN0, *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


async def _run(job: Job, args: argparse.Namespace) -> int:
    from sfbatch.modelcheck import check_models
    from sfbatch.pipeline import Pipeline
    from sfbatch.progress import Progress
    from sfbatch.summary import print_summary

    async with _api_endpoint(job) as config:
        if not config.api_keys:
            what = (
                f"the keys given ({job.key_env} or {KEYS_ENV}) are only commas or spaces"
                if config.api_key
                else f"{job.key_env} is not set"
            )
            log.error(
                "%s: export your key (or use --emulator to try sfbatch against the "
                "embedded emulator)",
                what,
            )
            return EXIT_AUTH
        try:
            offer = await check_models(config, job.registry)
            sources = [job.source(path, offer=offer) for path in job.inputs]
            rows = _chain(sources)
            pipeline = Pipeline(config, rows, registry=job.registry)
        except FatalApiError as exc:  # a 401 to the model list
            log.error("%s", exc)
            return EXIT_AUTH
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
            if pipeline.input_error is not None and not isinstance(
                pipeline.input_error, SfbatchError
            ):
                raise pipeline.input_error  # the loader's own bug, not the input's: shown whole
        except ConfigError as exc:
            log.error("%s", exc)
            return EXIT_USAGE
        except SfbatchError as exc:  # e.g. the input file failed mid-way
            log.error("%s", exc)
            return EXIT_USAGE
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        print_summary(result, config)
        return result.exit_code


def _on_signal(pipeline: Any, sig: signal.Signals) -> None:
    if pipeline.stopping:
        log.warning("second %s: stopping now; run the same command again to resume", sig.name)
    else:
        log.warning(
            "%s: finishing in-flight work (up to %.0f s; again to stop at once)",
            sig.name,
            pipeline.config.timeouts.grace_s,
        )
    pipeline.interrupt()


def _chain(sources: Sequence[Any]) -> Any:
    from sfbatch.loader import JobRows

    return JobRows(sources)  # one id space for all the files of a job


@contextlib.asynccontextmanager
async def _api_endpoint(job: Job) -> AsyncIterator[RunConfig]:
    """The run's config, pointed at an embedded emulator when the job asks for one."""
    config = job.config
    use_emulator = job.emulator == "on" or (job.emulator == "auto" and not config.api_key)
    if not use_emulator:
        yield config
        return
    from sfbatch.emulator import Emulator

    async with Emulator(**job.emulator_settings) as emulator:
        why = "as asked" if job.emulator == "on" else "no API key set"
        log.info("%s: running against the embedded emulator at %s", why, emulator.base_url)
        px = emulator.config.image_px
        if px is not None:
            # The manifest records the image_size asked for; say what is served instead.
            log.info(
                "the emulator draws small %d×%d placeholder images whatever image_size asks "
                "(set [emulator] image_px to change that)",
                px,
                px,
            )
        yield dataclasses.replace(config, base_url=emulator.base_url, api_key=emulator.api_key)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(all_commands=not argv or argv[0] not in _BUILTIN_COMMANDS)
        args = parser.parse_args(argv)
        code: int = args.handler(args)
    except KeyboardInterrupt:  # Ctrl-C before a run is under way (or in another command)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `sfbatch status DIR | head`: the reader has what it wanted
        # Python flushes stdout once more on the way out: let that go nowhere, quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return code


if __name__ == "__main__":
    sys.exit(main())
