"""``sfbatch validate``: check a prompt file or job offline, before paying for anything.

Reads every row exactly as ``run`` would (same flags and job file; ``cli.py`` parses them),
and reports counts and every problem with its file and line; also limits that can never be met
(a batch larger than the images-per-minute limit, a daily quota smaller than one
request) and a base URL or model that does not fit the endpoint. Exit 0 when all is
well, 2 when anything would fail.

Offline means offline: the request defaults are checked as flags (``jobfile.merge`` runs
:func:`sfbatch.modelcheck.check_defaults`: a wrong one is exit 2 before any row is read)
and every input image is opened and sniffed, but the endpoint's model list is not asked
for; a model the rules place on the other platform (or withdrawn) is a warning here, and
``run`` checks the list itself before its first request.
"""

from __future__ import annotations

from collections import Counter
from typing import TextIO
from urllib.parse import urlsplit

from sfbatch.config import BASE_URLS, RunConfig
from sfbatch.figures import plural
from sfbatch.jobfile import Job
from sfbatch.limiter import batch_fit_problem
from sfbatch.loader import JobRows
from sfbatch.modelcheck import endpoint_family

__all__ = ["validate_job"]

_MAX_LISTED = 200


def _config_problems(config: RunConfig) -> list[str]:
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
    # A default batch that can never fit the ipm limit is refused by RunConfig itself.
    batch, ipd = config.defaults.batch_size or 1, config.limits.ipd
    if ipd is not None and batch > ipd:
        problems.append(f"batch_size {batch} is more than the daily quota of {ipd} images")
    return problems


def validate_job(job: Job, *, out: TextIO) -> int:
    """Print a report of ``job`` to ``out``; return the number of problems found."""
    config = job.config
    problems = _config_problems(config)
    family = endpoint_family(config.base_url)
    counts: Counter[str] = Counter()
    models: Counter[str] = Counter()
    images = 0
    warnings: list[str] = []

    # Rows are the file's lines: with variations one line gives several items, and a bad
    # line is bad in each of them; it is listed and counted once.
    invalid_lines: set[tuple[str, int]] = set()
    valid_lines: set[tuple[str, int]] = set()

    def report(where: tuple[str, int], message: str | None) -> None:
        if where in invalid_lines:
            return
        invalid_lines.add(where)
        if len(invalid_lines) <= _MAX_LISTED:
            print(message, file=out)

    # One pass over the job's files with one id space, as ``run`` reads them: an id
    # repeated across files is reported with both file:line places.
    sources = [job.source(path) for path in job.inputs]
    for row in JobRows(sources):
        where = (row.file, row.line)
        if row.request is None:
            report(where, row.error)
            continue
        batch = row.request.get("batch_size", 1)
        unfit = batch_fit_problem(batch, config.limits.ipm)
        if unfit is not None:
            report(where, f"{row.file}:{row.line}: {unfit}")
            continue
        valid_lines.add(where)
        counts["items"] += 1
        counts["duplicate"] += row.duplicate_of is not None
        models[row.request["model"]] += 1
        images += batch
    for source in sources:
        warnings.extend(source.warnings)
    counts["valid"] = len(valid_lines - invalid_lines)
    counts["invalid"] = len(invalid_lines)
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
    duplicates = f", {plural(counts['duplicate'], 'duplicate')}" if counts["duplicate"] else ""
    variations = config.build.variations
    items = f" ({plural(counts['items'], 'item')}, {variations} per row)" if variations > 1 else ""
    print(
        f"{plural(counts['valid'] + counts['invalid'], 'row')}: {counts['valid']} valid, "
        f"{counts['invalid']} invalid{duplicates}{items}; "
        f"{plural(images, 'image')} to make",
        file=out,
    )
    ipd = config.limits.ipd
    if ipd:
        print(f"at {ipd} images a day: about {plural(-(-images // ipd), 'day')}", file=out)
    for model, n in models.most_common():
        print(f"  {n:>8}  {model}", file=out)
    return counts["invalid"] + len(problems)
