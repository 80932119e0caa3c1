"""``sfbatch validate``: check a prompt file or job offline, before paying for anything.

Reads every row exactly as ``run`` would (same flags, same job file), and reports
counts and every problem with its file and line; also limits that can never be met
(a batch larger than the images-per-minute limit, a daily quota smaller than one
request) and a base URL or model that does not fit the endpoint. Exit 0 when all is
well, 2 when anything would fail.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import Any, TextIO
from urllib.parse import urlsplit

from sfbatch.config import BASE_URLS, RunConfig
from sfbatch.errors import SfbatchError
from sfbatch.models import ModelRegistry

__all__ = ["register", "validate_job"]

_MAX_LISTED = 200


def register(subparsers: Any) -> None:
    from sfbatch.cli import add_request_flags

    parser = subparsers.add_parser(
        "validate",
        help="check a prompt file or job offline: rows, model rules, limits, base URL",
        description="Check everything `sfbatch run` would check, without sending a request.",
    )
    add_request_flags(parser)
    parser.set_defaults(handler=_command)


def _command(args: argparse.Namespace) -> int:
    from sfbatch.jobfile import build_run

    if args.out is None:
        args.out = "."  # validate writes nothing; the job's own out is used if it sets one
    try:
        job = build_run(args)
        problems = validate_job(job, out=sys.stdout)
    except SfbatchError as exc:
        print(f"sfbatch validate: {exc}", file=sys.stderr)
        return 2
    return 2 if problems else 0


def _config_problems(config: RunConfig, registry: ModelRegistry) -> list[str]:
    problems: list[str] = []
    url = urlsplit(config.base_url)
    if not url.netloc:
        problems.append(f"base URL {config.base_url!r} has no host")
    elif url.scheme == "http" and url.hostname not in ("127.0.0.1", "localhost", "::1"):
        problems.append(
            f"base URL {config.base_url} is plain http: the API key would travel unencrypted"
        )
    if not url.path.rstrip("/").endswith("/v1"):
        problems.append(f"base URL {config.base_url} should end in /v1 (e.g. {BASE_URLS['cn']})")
    batch = config.defaults.batch_size or 1
    if config.ipm is not None and batch > config.ipm:
        problems.append(
            f"batch_size {batch} can never fit an images-per-minute limit of {config.ipm:g}"
        )
    if config.ipd is not None and batch > config.ipd:
        problems.append(f"batch_size {batch} is more than the daily quota of {config.ipd} images")
    return problems


def _endpoint_family(base_url: str) -> str | None:
    host = urlsplit(base_url).hostname or ""
    for family in BASE_URLS:
        if host.endswith(f"siliconflow.{family}"):
            return family
    return None


def validate_job(job: Any, *, out: TextIO) -> int:
    """Print a report of ``job`` to ``out``; return the number of problems found."""
    config: RunConfig = job.config
    problems = _config_problems(config, job.registry)
    family = _endpoint_family(config.base_url)
    counts: Counter[str] = Counter()
    models: Counter[str] = Counter()
    images = 0
    warnings: list[str] = []

    def report(message: str | None) -> None:
        counts["invalid"] += 1
        if counts["invalid"] <= _MAX_LISTED:
            print(message, file=out)

    for path in job.inputs:
        source = job.source(path)
        for row in source:
            if row.request is None:
                report(row.error)
                continue
            batch = row.request.get("batch_size", 1)
            if config.ipm is not None and batch > config.ipm:
                report(
                    f"{row.file}:{row.line}: batch_size {batch} can never fit an "
                    f"images-per-minute limit of {config.ipm:g}"
                )
                continue
            counts["valid"] += 1
            counts["duplicate"] += row.duplicate_of is not None
            models[row.request["model"]] += 1
            images += batch
        warnings.extend(source.warnings)
    for model in models:
        rule = job.registry.get(model)
        if rule is not None and family is not None and family not in rule.endpoints:
            warnings.append(
                f"model {model} is not listed on the .{family} endpoint "
                f"(the model rules say: {', '.join(rule.endpoints) or 'withdrawn from both'})"
            )
    if counts["invalid"] > _MAX_LISTED:
        print(f"... and {counts['invalid'] - _MAX_LISTED} more invalid rows", file=out)
    for problem in problems:
        print(problem, file=out)
    for warning in warnings:
        print(f"warning: {warning}", file=out)
    duplicates = f", {counts['duplicate']} duplicates" if counts["duplicate"] else ""
    print(
        f"{counts['valid'] + counts['invalid']} rows: {counts['valid']} valid, "
        f"{counts['invalid']} invalid{duplicates}; {images} images to make",
        file=out,
    )
    if config.ipd:
        print(f"at {config.ipd} images a day: about {-(-images // config.ipd)} day(s)", file=out)
    for model, n in models.most_common():
        print(f"  {n:>8}  {model}", file=out)
    return counts["invalid"] + len(problems)
