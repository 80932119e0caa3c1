"""Job files (``jobs/*.toml``): :func:`load` reads one, :func:`merge` lays overrides over it.

A job file describes a whole build; the command line overrides it (``sfbatch.cli`` turns
its flags into :class:`Overrides`; this module never sees a command line). The schema is not a table
of its own: every :class:`~sfbatch.config.RunConfig` field is a key (see
:mod:`sfbatch.settings`), plus the job's own keys below (what to read, which endpoint, the
variable holding its key) and the embedded emulator's ``[emulator]`` table. An unknown key
or a wrong type is an error naming the key and the file. Relative paths in a job file are
relative to the job file, so cron can run it from any directory::

    [job]
    inputs = ["prompts.jsonl"]      # one or more prompt files
    out = "../data/nightly"         # output directory
    emulator = "off"                # off | auto (emulator when no API key) | on

    [api]
    profile = "cn"                  # cn = api.siliconflow.cn, com = api.siliconflow.com
    # base_url = "https://..."      # instead of profile
    key_env = "SILICONFLOW_API_KEY" # the variable holding this endpoint's key

    [request]                       # defaults for rows that do not set them
    model = "Kwai-Kolors/Kolors"
    image_size = "1024x1024"

    [limits]
    rpm = 2
    ipm = 2
    ipd = 400
    tz_offset_h = 8

    [build]
    base_seed = 20261124
    variations = 1

The base URL is ``--base-url``/``--profile``, else ``SILICONFLOW_BASE_URL``, else the job's
``api.base_url``/``api.profile``, else api.siliconflow.cn.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

from sfbatch.config import (
    BASE_URLS,
    DEFAULT_BASE_URL,
    DEFAULT_KEY_ENV,
    MODEL_LIMITS_ID,
    Environment,
    Limits,
    RunConfig,
)
from sfbatch.errors import ConfigError
from sfbatch.inputs import input_kind
from sfbatch.loader import PromptSource
from sfbatch.modelcheck import check_defaults
from sfbatch.models import ModelRegistry
from sfbatch.settings import Spec, check, own_specs, setting, specs_of

if TYPE_CHECKING:
    from sfbatch.modelcheck import ModelOffer

__all__ = ["EmulatorSettings", "Job", "JobFile", "Overrides", "job_keys", "load", "merge"]

EmulatorMode = Literal["off", "auto", "on"]


@dataclass(frozen=True, kw_only=True)
class EmulatorSettings:
    """The ``[emulator]`` table: how the embedded emulator behaves, when a job runs one."""

    SECTION: ClassVar[str] = "emulator"

    # The bounds are the emulator's own (sfbatch.emulator.server), checked here so that
    # validate says what run would stop on.
    latency_s: float | None = setting(None, help="seconds per generation", at_least=0)
    latency_jitter_s: float | None = setting(None, help="± seconds of random latency", at_least=0)
    image_px: int | None = setting(
        None, help="side of the square images served", at_least=1, at_most=4096
    )
    rpm: int | None = setting(None, help="the emulated account's requests per minute", at_least=1)
    ipm: int | None = setting(None, help="the emulated account's images per minute", at_least=1)
    ipd: int | None = setting(None, help="the emulated account's images per day", at_least=1)
    url_ttl_s: float | None = setting(None, help="how long image URLs live", above=0)
    seed: int | None = setting(None, help="seed of the server-picked seeds and latencies")

    def __post_init__(self) -> None:
        check(self)

    def as_overrides(self) -> dict[str, Any]:
        """The fields the job sets, as :class:`~sfbatch.emulator.Emulator` keywords."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: value for name, value in values.items() if value is not None}


# The job's own keys, which are not RunConfig fields: section -> key -> accepted TOML types.
_JOB_KEYS: dict[str, dict[str, tuple[type, ...]]] = {
    "job": {"name": (str,), "inputs": (list, str), "emulator": (str, bool)},
    "api": {"profile": (str,), "key_env": (str,), "key_envs": (list,)},
}


def _schema() -> dict[str, dict[str, tuple[tuple[type, ...], Spec | None]]]:
    schema: dict[str, dict[str, tuple[tuple[type, ...], Spec | None]]] = {
        section: {key: (types, None) for key, types in keys.items()}
        for section, keys in _JOB_KEYS.items()
    }
    for spec in (*specs_of(RunConfig), *own_specs(EmulatorSettings)):
        schema.setdefault(spec.section, {})[spec.key] = (spec.text_kinds, spec)
    return schema


_SCHEMA = _schema()


def job_keys() -> list[str]:
    """Every key a job file may hold, as ``section.key``."""
    return [f"{section}.{key}" for section, keys in _SCHEMA.items() for key in keys]


@dataclass(frozen=True, kw_only=True)
class JobFile:
    """A job file's contents, checked: RunConfig settings by spec id (``limits.rpm``), with
    paths resolved against the file's folder, and the job's own keys."""

    path: Path
    settings: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    inputs: tuple[str, ...] = ()
    emulator: EmulatorMode | None = None
    profile: str | None = None
    key_env: str | None = None
    key_envs: tuple[str, ...] = ()
    """``api.key_envs``: variables holding one key each, of separate accounts."""
    emulator_settings: EmulatorSettings = field(default_factory=EmulatorSettings)


@dataclass(frozen=True, kw_only=True)
class Overrides:
    """What the command line sets over a job file (``None``/empty: not set)."""

    settings: Mapping[str, Any] = field(default_factory=dict)
    """RunConfig settings by spec id, e.g. ``{"limits.rpm": 60.0}``."""
    input: str | None = None
    """A prompt file to read instead of a job file's inputs."""
    profile: str | None = None
    emulator: bool = False
    """``--emulator``: run against the embedded emulator whatever the job says."""
    key_env: str | None = None
    """``--key-env``: the variable holding the API key, over the job's ``api.key_env``."""


@dataclass(frozen=True)
class Job:
    """A resolved run: the config, its inputs, and how to read them."""

    config: RunConfig
    inputs: list[str]
    registry: ModelRegistry
    emulator: EmulatorMode = "off"
    emulator_settings: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    key_env: str = DEFAULT_KEY_ENV

    def source(self, path: str, *, offer: ModelOffer | None = None) -> PromptSource:
        """The rows of ``path``; with ``offer``, a row naming a model not offered is invalid."""
        cfg = self.config
        return PromptSource(
            path,
            defaults=cfg.defaults,
            registry=self.registry,
            base_seed=cfg.build.base_seed,
            variations=cfg.build.variations,
            shard=cfg.output.shard,
            limit=cfg.build.limit,
            dedupe=cfg.build.dedupe,
            offer=offer,
        )


def load(path: Path) -> JobFile:
    """Read and check the job file at ``path``; raise :class:`ConfigError` naming the key."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read job file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {exc.start}): not a TOML file") from exc
    settings: dict[str, Any] = {}
    own: dict[str, Any] = {}
    emulator: dict[str, Any] = {}
    problems: list[str] = []  # every mistake of the file at once, not one per attempt
    for section, table in doc.items():
        schema = _SCHEMA.get(section)
        if schema is None:
            known = ", ".join(f"[{s}]" for s in _SCHEMA)
            problems.append(f"{path}: unknown section [{section}] (known: {known})")
            continue
        if not isinstance(table, dict):
            problems.append(f"{path}: [{section}] must be a table")
            continue
        for key, value in table.items():
            if section == "limits" and key == "models":
                try:
                    settings[MODEL_LIMITS_ID] = _model_limits(value, path)
                except ConfigError as exc:
                    problems.append(str(exc))
                continue
            if key not in schema:
                close = difflib.get_close_matches(key, list(schema), n=1)
                hint = f"did you mean {section}.{close[0]}?" if close else ""
                problems.append(
                    f"{path}: unknown key {section}.{key} ({hint or 'known: ' + ', '.join(schema)})"
                )
                continue
            types, spec = schema[key]
            if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
                names = " or ".join(t.__name__ for t in types)
                problems.append(
                    f"{path}: {section}.{key} must be {names}, got {type(value).__name__} {value!r}"
                )
            elif spec is None:
                own[key] = value
            elif section == EmulatorSettings.SECTION:
                emulator[spec.name] = value
            else:
                try:
                    settings[spec.id] = _value(spec, value, path)
                except ConfigError as exc:
                    problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))
    try:
        return JobFile(
            path=path,
            settings=settings,
            name=own.get("name"),
            inputs=_inputs(own.get("inputs"), path),
            emulator=None if "emulator" not in own else _emulator_mode(own["emulator"]),
            profile=own.get("profile") if _profile_url(own.get("profile")) else None,
            key_env=own.get("key_env"),
            key_envs=_key_envs(own.get("key_envs")),
            emulator_settings=EmulatorSettings(**emulator),
        )
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _value(spec: Spec, value: Any, path: Path) -> Any:
    if spec.kind is Path:
        if not str(value).strip():
            raise ConfigError(f"{spec.id} is empty")
        return Path(os.path.normpath(path.parent / str(value)))
    if spec.id == "request.image" and isinstance(value, str) and input_kind(value) == "path":
        # A local input image, like every path in a job, is relative to the job file.
        return os.path.normpath(path.parent / os.path.expanduser(value))
    if spec.setting.parse is not None:
        try:
            return spec.setting.parse(value)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {spec.id}: {exc}") from exc
    return value


def _model_limits(value: Any, path: Path) -> dict[str, Limits]:
    """``[limits.models."Qwen/Qwen-Image"]`` tables: rpm, ipm, ipd of one model (per key)."""
    if not isinstance(value, dict):
        raise ConfigError(f'{path}: limits.models must hold tables like [limits.models."MODEL"]')
    models: dict[str, Limits] = {}
    for model, table in value.items():
        where = f'limits.models."{model}"'
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {where} must be a table with rpm, ipm or ipd")
        unknown = set(table) - {"rpm", "ipm", "ipd"}
        if unknown:
            raise ConfigError(
                f"{path}: unknown key {where}.{sorted(unknown)[0]} (known: rpm, ipm, ipd)"
            )
        try:
            models[model] = Limits(**table)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {where}: {exc}") from exc
    return models


def _key_envs(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not value or not all(isinstance(item, str) and item for item in value):
        raise ConfigError("api.key_envs must be a list of environment variable names")
    return tuple(value)


def _inputs(value: Any, path: Path) -> tuple[str, ...]:
    if value is None:
        return ()
    items: list[Any] = [value] if isinstance(value, str) else cast(list[Any], value)
    if not items or not all(isinstance(item, str) for item in items):
        raise ConfigError("job.inputs must be a list of file paths")
    return tuple(i if i == "-" else os.path.normpath(path.parent / i) for i in items)


def _emulator_mode(value: Any) -> EmulatorMode:
    if value is True or value == "on":
        return "on"
    if value is False or value == "off":
        return "off"
    if value == "auto":
        return "auto"
    raise ConfigError(f"job.emulator must be off, auto or on, got {value!r}")


def _profile_url(profile: str | None) -> str | None:
    if profile is None:
        return None
    if profile not in BASE_URLS:
        raise ConfigError(f"api.profile must be cn or com, got {profile!r}")
    return BASE_URLS[profile]


_REQUEST_SPECS = {spec.name: spec for spec in specs_of(RunConfig) if spec.part == "defaults"}


def _namer(job: JobFile, overrides: Overrides) -> Callable[[str], str]:
    """How a usage error names a request default: its flag, or its key in the job file."""

    def name_of(field_name: str) -> str:
        spec = _REQUEST_SPECS[field_name]
        if spec.id in overrides.settings or spec.id not in job.settings:
            return f"--{spec.flag}"
        return f"{job.path}: {spec.id}"

    return name_of


def merge(job: JobFile | None, overrides: Overrides, env: Environment | None = None) -> Job:
    """The run that ``overrides`` over ``job`` (if any) over ``env`` describe.

    ``env`` defaults to :meth:`Environment.read` with the job's ``api.key_env``.
    """
    source = str(job.path) if job else "command line"
    given = job
    job = job or JobFile(path=Path())
    key_env = overrides.key_env or job.key_env or DEFAULT_KEY_ENV
    key_envs = () if overrides.key_env else job.key_envs  # a flag's variable wins
    env = env or Environment.read(key_env, key_envs=key_envs)
    values = {**job.settings, **overrides.settings}
    if values.get("job.out") is None:
        raise ConfigError(f"{source}: give an output directory with --out (or job.out)")
    inputs = (overrides.input,) if overrides.input is not None else job.inputs
    if not inputs:
        raise ConfigError(f"{source}: job.inputs names no prompt file")
    # Flags, then the environment (a per-invocation override, e.g. a proxy), then the job.
    values["api.base_url"] = (
        overrides.settings.get("api.base_url")
        or _profile_url(overrides.profile)
        or env.base_url
        or job.settings.get("api.base_url")
        or _profile_url(job.profile)
        or DEFAULT_BASE_URL
    )
    try:
        config = RunConfig.from_settings(values, api_key=env.api_key)
    except ConfigError as exc:
        if given is None:
            raise
        raise ConfigError(f"{source} (or a flag overriding it): {exc}") from exc
    registry = ModelRegistry.load(config.models_file)
    check_defaults(config.defaults, registry, name_of=_namer(job, overrides))
    return Job(
        config=config,
        inputs=list(inputs),
        registry=registry,
        emulator="on" if overrides.emulator else job.emulator or "off",
        emulator_settings=job.emulator_settings.as_overrides(),
        name=job.name or (given.path.stem if given else ""),
        key_env=key_env,
    )
