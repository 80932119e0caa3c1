"""Run configuration: small frozen, keyword-only parts, each validated once, on creation.

A :class:`RunConfig` is everything one run needs, in parts: :class:`Limits`,
:class:`Workers`, the :class:`~sfbatch.retry.RetryPolicy`, :class:`Timeouts`,
:class:`Output`, :class:`Build` and the :class:`RequestDefaults`. Every field is declared
with :func:`sfbatch.settings.setting`, which makes it a job-file key and a flag too (see
:mod:`sfbatch.settings`). Library users pass parts, or the flat keywords of old, or both
(flat keywords are applied over the parts)::

    >>> cfg = RunConfig(out_dir="out", api_key="sk-test", rpm=60)
    >>> cfg.limits.rpm, cfg.workers.concurrency, cfg.out_dir   # concurrency None: auto
    (60, None, PosixPath('out'))
    >>> RunConfig(out_dir="out", api_key="k", limits=Limits(ipd=400)) == RunConfig(
    ...     out_dir="out", api_key="k", ipd=400)
    True

The environment is read in one place, :meth:`Environment.read`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import string
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import yarl

from sfbatch.errors import ConfigError, redact_each
from sfbatch.limiter import batch_fit_problem
from sfbatch.retry import RetryPolicy
from sfbatch.settings import check, setting, specs_of

__all__ = [
    "BASE_URLS",
    "DEFAULT_BASE_URL",
    "MODEL_LIMITS_ID",
    "Build",
    "Environment",
    "Limits",
    "Output",
    "RequestDefaults",
    "RunConfig",
    "Timeouts",
    "Workers",
    "parse_concurrency",
    "parse_images_to",
    "parse_shard",
    "split_keys",
]

BASE_URLS = {
    "cn": "https://api.siliconflow.cn/v1",
    "com": "https://api.siliconflow.com/v1",
}
DEFAULT_BASE_URL = BASE_URLS["cn"]
DEFAULT_KEY_ENV = "SILICONFLOW_API_KEY"
# The job file's per-model limits (``[limits.models."MODEL"]``), not a flag.
MODEL_LIMITS_ID = "limits.models"
# Several keys (of separate accounts), comma-separated: the run spreads its work over them.
KEYS_ENV = "SILICONFLOW_API_KEYS"


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` as ``(I, N)``, 0-based: ``parse_shard("0/4") == (0, 4)``."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"shard must be I/N (e.g. 0/4), got {text!r}") from None
    return _checked_shard((index, count))


def parse_images_to(text: str) -> str:
    """An ``s3://bucket[/prefix]`` URL for ``images_to``, checked (no trailing ``/``)."""
    if not text.startswith("s3://"):
        raise ConfigError(f"images_to must be an s3://bucket/prefix URL, got {text!r}")
    bucket = text[len("s3://") :].partition("/")[0]
    if not bucket:
        raise ConfigError(f"images_to has no bucket: {text!r} (expected s3://bucket/prefix)")
    return text.rstrip("/")


def parse_concurrency(value: str | int) -> int | None:
    """``"auto"`` (None: the window sizes itself) or a whole number of requests in flight."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"concurrency must be auto or a whole number, got {value!r}") from None


def _checked_shard(shard: tuple[int, ...]) -> tuple[int, int]:
    if len(shard) != 2 or not all(type(n) is int for n in shard):
        raise ConfigError(f"shard must be (I, N), got {shard!r}")
    index, count = shard
    if not (count >= 1 and 0 <= index < count):
        raise ConfigError(f"shard I/N needs 0 <= I < N, got {index}/{count}")
    return index, count


@dataclass(frozen=True, kw_only=True)
class Environment:
    """What sfbatch takes from the environment: the API key(s) and ``SILICONFLOW_BASE_URL``.

    ``api_key`` holds one key, or several separated by commas (``SILICONFLOW_API_KEYS``,
    read when the job's key variable is unset or empty).
    """

    api_key: str = ""
    base_url: str | None = None

    @classmethod
    def read(cls, key_env: str = DEFAULT_KEY_ENV, *, key_envs: tuple[str, ...] = ()) -> Environment:
        """The key from ``key_env`` (a job's ``api.key_env``), or the keys of ``key_envs``
        (a job's ``api.key_envs``, those set), and the base-URL override."""
        if key_envs:
            keys = (os.environ.get(name, "").strip() for name in key_envs)
            return cls(
                api_key=",".join(key for key in keys if key),
                base_url=os.environ.get("SILICONFLOW_BASE_URL") or None,
            )
        return cls(
            api_key=os.environ.get(key_env, "").strip() or os.environ.get(KEYS_ENV, "").strip(),
            base_url=os.environ.get("SILICONFLOW_BASE_URL") or None,
        )


@dataclass(frozen=True, kw_only=True)
class RequestDefaults:
    """Request fields applied to every row that does not set them itself.

    ``None`` means "do not send": the server's (model's) default applies. The values are
    checked against the model's rules by the loader, like a row's own.
    """

    SECTION: ClassVar[str] = "request"

    model: str | None = setting(None, help="model for rows that do not name one")
    image_size: str | None = setting(None, help="WIDTHxHEIGHT for rows that do not set one")
    batch_size: int | None = setting(None, help="images per request (1..4)")
    num_inference_steps: int | None = setting(None, flag="steps", help="num_inference_steps")
    guidance_scale: float | None = setting(None, help="guidance_scale")
    cfg: float | None = setting(None, help="cfg, for Qwen/Qwen-Image models")
    negative_prompt: str | None = setting(None, help="negative_prompt")
    seed: int | None = setting(
        None, help="seed for rows without one (else derived from --base-seed and the row id)"
    )
    prompt_enhancement: bool | None = setting(None, help="prompt_enhancement")
    #: An input image for rows that give none (see :mod:`sfbatch.inputs`).
    image: str | None = setting(
        None,
        help="input image (path, URL or data URI) for edit-model rows that give none; "
        "a relative path is taken from the current directory",
    )

    def __post_init__(self) -> None:
        check(self)

    def as_request(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }


@dataclass(frozen=True, kw_only=True)
class Limits:
    """The account's limits: per minute (``rpm``, ``ipm``) and per day (``ipd``)."""

    SECTION: ClassVar[str] = "limits"

    rpm: float | None = setting(None, help="requests per minute the account allows", above=0)
    ipm: float | None = setting(None, help="images per minute the account allows", above=0)
    ipd: int | None = setting(
        None, help="images per day: stop cleanly (exit 4) when made", at_least=0, at_most=1e12
    )
    day_utc_offset_h: float = setting(
        8.0,
        key="tz_offset_h",
        help="UTC offset in hours of the account's day (default 8)",
        at_least=-14,  # every time zone on Earth is within -12..+14
        at_most=14,
    )
    #: A model's own rpm/ipm/ipd (job file ``[limits.models."MODEL"]``); what it leaves
    #: out is the run's. All limits apply per (key, model).
    models: Mapping[str, Limits] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        check(self)
        for model_limits in self.models.values():
            if not isinstance(model_limits, Limits):
                raise ConfigError(f"limits.models values must be Limits, got {model_limits!r}")

    def for_model(self, model: str) -> Limits:
        """``model``'s limits: its own where it sets them, else the run's."""
        own = self.models.get(model)
        if own is None:
            return self
        return Limits(
            rpm=self.rpm if own.rpm is None else own.rpm,
            ipm=self.ipm if own.ipm is None else own.ipm,
            ipd=self.ipd if own.ipd is None else own.ipd,
            day_utc_offset_h=self.day_utc_offset_h,
        )


# More requests or downloads in flight than any account's limit can use; a typo of many
# digits would otherwise start that many tasks.
_MAX_IN_FLIGHT = 10_000


@dataclass(frozen=True, kw_only=True)
class Workers:
    """Pool sizes and the loader's queue (job-file table ``[limits]``)."""

    SECTION: ClassVar[str] = "limits"

    concurrency: int | None = setting(
        None,
        parse=parse_concurrency,
        help="generation requests in flight: auto (sized from the rate and the latency, up to "
        "max_concurrency) or a fixed N",
        at_least=1,
        at_most=_MAX_IN_FLIGHT,
    )
    max_concurrency: int = setting(
        256,
        help="most generation requests in flight with auto (default 256)",
        at_least=1,
        at_most=_MAX_IN_FLIGHT,
    )
    download_concurrency: int = setting(
        8, help="downloads in flight (default 8)", at_least=1, at_most=_MAX_IN_FLIGHT
    )
    queue_size: int = setting(
        256, help="rows read ahead of the workers (default 256)", at_least=1, at_most=1_000_000
    )

    def __post_init__(self) -> None:
        check(self)

    @property
    def generation_workers(self) -> int:
        """How many generation workers run: N when fixed, else the window's ceiling."""
        return self.concurrency or self.max_concurrency


@dataclass(frozen=True, kw_only=True)
class Timeouts:
    """How long things may take, in seconds (job-file table ``[retry]``)."""

    SECTION: ClassVar[str] = "retry"

    request_timeout_s: float = setting(300.0, help="deadline of one API request, s", above=0)
    connect_timeout_s: float = setting(30.0, help="deadline of one connection, s", above=0)
    download_timeout_s: float = setting(120.0, help="deadline of one image download, s", above=0)
    url_ttl_s: float = setting(3600.0, help="how long image URLs live, s", above=0)
    grace_s: float = setting(
        30.0, help="seconds in-flight work may take after Ctrl-C (default 30)", above=0
    )
    outage_timeout_s: float = setting(
        1800.0,
        help="seconds the API may stay unreachable before the run stops (exit 5; default 1800)",
        above=0,
    )

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True, kw_only=True)
class Output:
    """How images and manifests are written (job-file table ``[build]``)."""

    SECTION: ClassVar[str] = "build"

    name_template: str = setting(
        "{id}_{index}", key="file_naming", help="image file name, with {id} and {index}"
    )
    fsync_images: bool = setting(True, help="fsync each image before it is recorded")
    max_image_bytes: int = setting(64 * 1024 * 1024, help="largest image accepted", at_least=1)
    shard: tuple[int, int] | None = setting(
        None,
        parse=parse_shard,
        help="I/N: take only the rows whose id hashes to shard I of N",
    )
    images_to: str | None = setting(
        None,
        section="output",
        parse=parse_images_to,
        help="s3://bucket/prefix: upload each image there (the manifest stays in --out)",
    )

    def __post_init__(self) -> None:
        check(self)
        if self.shard is not None:
            _checked_shard(self.shard)
        if self.images_to is not None:
            parse_images_to(self.images_to)
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(self.name_template) if f}
        except ValueError as exc:
            raise ConfigError(f"file naming {self.name_template!r}: {exc}") from exc
        if not {"id", "index"} <= fields:  # with a format spec too: {index:03d}
            raise ConfigError(
                f"file naming must contain {{id}} and {{index}}, got {self.name_template!r}"
            )
        try:
            name = self.name_template.format(id="x", index=0)
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"file naming {self.name_template!r} may use only {{id}} and {{index}}: {exc!r}"
            ) from exc
        if "/" in name or "\\" in name:
            raise ConfigError(f"file naming must not contain a path separator: {name!r}")

    @property
    def manifest_name(self) -> str:
        """``manifest.jsonl``, or ``manifest-I-of-N.jsonl`` for a shard."""
        if self.shard is None:
            return "manifest.jsonl"
        index, count = self.shard
        return f"manifest-{index}-of-{count}.jsonl"


@dataclass(frozen=True, kw_only=True)
class Build:
    """Which rows are made, and with which seeds (job-file table ``[build]``)."""

    SECTION: ClassVar[str] = "build"

    base_seed: int = setting(
        0,
        help="base of the derived per-row seeds (default 0)",
        at_least=-(2**63),  # a record keeps it: JSON readers take 64 bits
        at_most=2**63 - 1,
    )
    variations: int = setting(
        1, help="images per prompt, each with its own derived seed", at_least=1, at_most=10_000
    )
    dedupe: bool = setting(False, help="make identical prompt+parameters once")
    limit: int | None = setting(
        None, help="read only the first N rows of the input", at_least=0, at_most=2**62
    )
    retry_failed: bool = setting(False, help="try items recorded as failed again")

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True, kw_only=True, init=False)
class RunConfig:
    """Everything one run needs, in parts; see the module docstring for how to build one."""

    # RunConfig writes its own __init__ (flat keywords): these calls only declare settings.
    out_dir: Path = setting(section="job", key="out", help="output directory")  # noqa: RUF009
    api_key: str = dataclasses.field(repr=False)
    base_url: str = setting(
        section="api",
        help="API base URL including /v1 (default: $SILICONFLOW_BASE_URL or "
        "https://api.siliconflow.cn/v1)",
    )
    models_file: Path | None = setting(  # noqa: RUF009
        None, section="build", help="TOML file adding or overriding model rules"
    )
    model_check: bool = setting(
        True,
        section="api",
        help="list the endpoint's models before the first request and refuse models it does "
        "not offer (--no-model-check: send anyway)",
    )
    defaults: RequestDefaults
    limits: Limits
    workers: Workers
    retry: RetryPolicy
    timeouts: Timeouts
    output: Output
    build: Build

    def __init__(
        self,
        *,
        out_dir: str | Path,
        api_key: str,
        base_url: str | None = None,
        models_file: str | Path | None = None,
        model_check: bool = True,
        defaults: RequestDefaults | None = None,
        limits: Limits | None = None,
        workers: Workers | None = None,
        retry: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
        output: Output | None = None,
        build: Build | None = None,
        **flat: Any,
    ) -> None:
        given: dict[str, Any] = {
            "defaults": defaults,
            "limits": limits,
            "workers": workers,
            "retry": retry,
            "timeouts": timeouts,
            "output": output,
            "build": build,
        }
        routed: dict[str, dict[str, Any]] = {}
        for name, value in flat.items():
            if name not in _FLAT:
                raise TypeError(f"RunConfig() got an unexpected keyword argument {name!r}")
            part, field_name = _FLAT[name]
            routed.setdefault(part, {})[field_name] = value
        for part, cls in _PART_TYPES.items():
            value = given[part] if given[part] is not None else cls()
            if part in routed:
                value = dataclasses.replace(value, **routed[part])
            object.__setattr__(self, part, value)
        if base_url is None:
            base_url = Environment.read().base_url or DEFAULT_BASE_URL
        if not isinstance(api_key, str):
            raise TypeError(
                "api_key must be a str (one key, or several separated by commas), "
                f"not {type(api_key).__name__}"
            )
        object.__setattr__(self, "out_dir", Path(out_dir))
        object.__setattr__(self, "api_key", api_key)
        object.__setattr__(self, "base_url", str(base_url).rstrip("/"))
        object.__setattr__(self, "models_file", None if models_file is None else Path(models_file))
        object.__setattr__(self, "model_check", model_check)
        check(self)
        _check_keys(self.api_keys)
        _check_base_url(self.base_url, self.api_keys)
        unfit = batch_fit_problem(self.defaults.batch_size or 1, self.limits.ipm)
        if unfit is not None:
            raise ConfigError(unfit)

    @classmethod
    def from_settings(cls, values: Mapping[str, Any], *, api_key: str) -> RunConfig:
        """A config from ``{spec id: value}`` (``{"limits.rpm": 2, "job.out": ...}``), as
        :mod:`sfbatch.jobfile` merges them; missing ones keep their defaults."""
        top: dict[str, Any] = {}
        parts: dict[str, dict[str, Any]] = {}
        if MODEL_LIMITS_ID in values:
            parts["limits"] = {"models": values[MODEL_LIMITS_ID]}
        for spec in specs_of(cls):
            if spec.id not in values:
                continue
            if spec.part is None:
                top[spec.name] = values[spec.id]
            else:
                parts.setdefault(spec.part, {})[spec.name] = values[spec.id]
        built = {part: _PART_TYPES[part](**kwargs) for part, kwargs in parts.items()}
        return cls(api_key=api_key, **top, **built)

    def __getattr__(self, name: str) -> Any:
        """Flat reads of old (``config.rpm``); new code reads the part (``config.limits.rpm``)."""
        if name not in _FLAT:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        part, field_name = _FLAT[name]
        return getattr(object.__getattribute__(self, part), field_name)

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The run's keys: ``api_key`` holds one, or several (see :func:`split_keys`)."""
        return split_keys(self.api_key)

    @property
    def manifest_name(self) -> str:
        """``manifest.jsonl``, or ``manifest-I-of-N.jsonl`` for a shard."""
        return self.output.manifest_name

    @property
    def summary_name(self) -> str:
        return self.manifest_name.replace("manifest", "summary").replace(".jsonl", ".json")


_KEY_SEPARATORS = re.compile(r"[,\s]+")


def split_keys(api_key: str) -> tuple[str, ...]:
    """The keys in ``api_key``: one, or several separated by commas or white space (a
    key file's lines), empty pieces dropped.

    >>> split_keys(" sk-a, sk-b,,\\nsk-c\\n")
    ('sk-a', 'sk-b', 'sk-c')
    """
    return tuple(key for key in _KEY_SEPARATORS.split(api_key) if key)


def _check_keys(keys: tuple[str, ...]) -> None:
    """Refuse keys no request could carry, and a key listed twice (its account's limits
    would count twice). Keys are named by their position in the list, never shown."""
    first_at: dict[str, int] = {}
    for index, key in enumerate(keys):
        if not (key.isascii() and key.isprintable()):
            raise ConfigError(
                f"API key #{index} (counting from 0) has a control character or a character "
                "that is not ASCII in it; copy the key again"
            )
        if key in first_at:
            raise ConfigError(
                f"API keys #{first_at[key]} and #{index} (counting from 0) are the same key: "
                "each key is an account with limits of its own, so list each key once"
            )
        first_at[key] = index


def _check_base_url(base_url: str, keys: tuple[str, ...]) -> None:
    """Refuse a base URL no request could go to; the message never shows a key (a key
    given where the base URL goes is not unheard of)."""

    def shown(text: str) -> str:
        return redact_each(text, keys)

    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(shown(f"base URL must start with http:// or https://, got {base_url!r}"))
    try:
        url = yarl.URL(base_url)
        has_port = url.port is not None
    except ValueError as exc:
        raise ConfigError(shown(f"base URL {base_url!r} is not a URL: {exc}")) from None
    if not url.host or not has_port:
        raise ConfigError(shown(f"base URL {base_url!r} names no host"))
    if url.user is not None or url.password is not None:
        raise ConfigError(
            "base URL must not carry a user name or password (the key goes in the "
            f"Authorization header): use {shown(str(url.with_user(None)))}"
        )


_PART_TYPES: dict[str, Any] = {
    f.name: hint
    for f in fields(RunConfig)
    if isinstance(getattr(hint := typing.get_type_hints(RunConfig)[f.name], "SECTION", None), str)
}


def _flat_names() -> dict[str, tuple[str, str]]:
    """Flat keyword -> (part, field): each field's name, and its job-file key where it differs
    (``backoff_base_s`` for ``retry.base_s``). Request defaults stay in their part."""
    names: dict[str, tuple[str, str]] = {}
    for spec in specs_of(RunConfig):
        if spec.part is None or spec.part == "defaults":
            continue
        for name in {spec.name, spec.key}:
            if name in names:
                raise RuntimeError(f"two RunConfig settings are both called {name!r}")
            names[name] = (spec.part, spec.name)
    return names


_FLAT = _flat_names()
