"""Job files (``jobs/*.toml``) and how they merge with flags into one :class:`Job`.

A job file describes a whole build; command-line flags override it. The base URL
is taken from ``--base-url``/``--profile``, else ``SILICONFLOW_BASE_URL``, else the job's
``api.base_url``/``api.profile``, else api.siliconflow.cn. Relative paths in a job file
are relative to the job file, so cron can run it from any directory. Every key is
checked: an unknown key or a wrong type is an error naming the key and the file::

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
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from sfbatch.config import BASE_URLS, RequestDefaults, RunConfig, base_url_from_env, parse_shard
from sfbatch.errors import ConfigError
from sfbatch.loader import PromptSource
from sfbatch.models import ModelRegistry

__all__ = ["Job", "build_run", "load_job_file"]

EmulatorMode = Literal["off", "auto", "on"]

# section -> key -> (accepted types, RunConfig/RequestDefaults field or special name)
_SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], str]]] = {
    "job": {
        "name": ((str,), "name"),
        "inputs": ((list, str), "inputs"),
        "out": ((str,), "out_dir"),
        "emulator": ((str, bool), "emulator"),
    },
    "api": {
        "profile": ((str,), "profile"),
        "base_url": ((str,), "base_url"),
        "key_env": ((str,), "key_env"),
    },
    "request": {
        "model": ((str,), "model"),
        "image_size": ((str,), "image_size"),
        "batch_size": ((int,), "batch_size"),
        "num_inference_steps": ((int,), "num_inference_steps"),
        "guidance_scale": ((int, float), "guidance_scale"),
        "cfg": ((int, float), "cfg"),
        "negative_prompt": ((str,), "negative_prompt"),
        "seed": ((int,), "seed"),
        "prompt_enhancement": ((bool,), "prompt_enhancement"),
    },
    "limits": {
        "rpm": ((int, float), "rpm"),
        "ipm": ((int, float), "ipm"),
        "ipd": ((int,), "ipd"),
        "tz_offset_h": ((int, float), "day_utc_offset_h"),
        "concurrency": ((int,), "concurrency"),
        "download_concurrency": ((int,), "download_concurrency"),
    },
    "retry": {
        "max_retries": ((int,), "max_retries"),
        "backoff_base_s": ((int, float), "backoff_base_s"),
        "backoff_cap_s": ((int, float), "backoff_cap_s"),
        "request_timeout_s": ((int, float), "request_timeout_s"),
        "download_timeout_s": ((int, float), "download_timeout_s"),
        "grace_s": ((int, float), "grace_s"),
    },
    "build": {
        "base_seed": ((int,), "base_seed"),
        "variations": ((int,), "variations"),
        "dedupe": ((bool,), "dedupe"),
        "limit": ((int,), "limit"),
        "retry_failed": ((bool,), "retry_failed"),
        "file_naming": ((str,), "name_template"),
        "models_file": ((str,), "models_file"),
        "shard": ((str,), "shard"),
    },
    "emulator": {
        "latency_s": ((int, float), "latency_s"),
        "latency_jitter_s": ((int, float), "latency_jitter_s"),
        "image_px": ((int,), "image_px"),
        "rpm": ((int,), "rpm"),
        "ipm": ((int,), "ipm"),
        "ipd": ((int,), "ipd"),
        "url_ttl_s": ((int, float), "url_ttl_s"),
        "seed": ((int,), "seed"),
    },
}
_REQUEST_FIELDS = set(_SCHEMA["request"])
_PATH_FIELDS = {"out_dir", "models_file"}


@dataclass(frozen=True)
class Job:
    """A resolved run: the config, its inputs, and how to read them."""

    config: RunConfig
    inputs: list[str]
    registry: ModelRegistry
    emulator: EmulatorMode = "off"
    emulator_settings: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    key_env: str = "SILICONFLOW_API_KEY"

    def source(self, path: str) -> PromptSource:
        cfg = self.config
        return PromptSource(
            path,
            defaults=cfg.defaults,
            registry=self.registry,
            base_seed=cfg.base_seed,
            variations=cfg.variations,
            shard=cfg.shard,
            limit=cfg.limit,
            dedupe=cfg.dedupe,
        )


def load_job_file(path: Path) -> dict[str, Any]:
    """A job file's settings as flat ``{field: value}``, paths resolved against its folder."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read job file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    base = path.parent
    settings: dict[str, Any] = {"emulator_settings": {}}
    for section, table in doc.items():
        schema = _SCHEMA.get(section)
        if schema is None:
            known = ", ".join(f"[{s}]" for s in _SCHEMA)
            raise ConfigError(f"{path}: unknown section [{section}] (known: {known})")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{section}] must be a table")
        value: Any
        for key, value in table.items():
            if key not in schema:
                raise ConfigError(
                    f"{path}: unknown key {section}.{key} (known: {', '.join(schema)})"
                )
            types, target = schema[key]
            if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
                names = " or ".join(t.__name__ for t in types)
                raise ConfigError(
                    f"{path}: {section}.{key} must be {names}, got {type(value).__name__} {value!r}"
                )
            if section == "emulator":
                settings["emulator_settings"][target] = value
            elif target in _PATH_FIELDS:
                settings[target] = Path(os.path.normpath(base / str(value)))
            elif target == "inputs":
                items: list[Any] = [value] if isinstance(value, str) else cast(list[Any], value)
                if not items or not all(isinstance(item, str) for item in items):
                    raise ConfigError(f"{path}: job.inputs must be a list of file paths")
                settings["inputs"] = [i if i == "-" else os.path.normpath(base / i) for i in items]
            else:
                settings[target] = value
    return settings


def _emulator_mode(value: Any, source: str) -> EmulatorMode:
    if value is True or value == "on":
        return "on"
    if value is None or value is False or value == "off":
        return "off"
    if value == "auto":
        return "auto"
    raise ConfigError(f"{source}: job.emulator must be off, auto or on, got {value!r}")


def build_run(args: argparse.Namespace) -> Job:
    """Merge flags over the job file (if the input is one) over the environment."""
    job_path = Path(args.input) if str(args.input).endswith(".toml") else None
    settings = load_job_file(job_path) if job_path else {"emulator_settings": {}}
    source = str(job_path) if job_path else "command line"

    flags = {k: v for k, v in vars(args).items() if v is not None}
    for key in ("out", "base_url", "profile"):
        flags.pop(key, None)
    request = {k: settings.pop(k) for k in list(settings) if k in _REQUEST_FIELDS}
    request.update({k: flags.pop(k) for k in list(flags) if k in _REQUEST_FIELDS})

    out = args.out or settings.pop("out_dir", None)
    if out is None:
        raise ConfigError(f"{source}: give an output directory with --out (or job.out)")
    settings.pop("out_dir", None)

    key_env = settings.pop("key_env", "SILICONFLOW_API_KEY")
    profile = args.profile or settings.pop("profile", None)
    settings.pop("profile", None)
    if profile is not None and profile not in BASE_URLS:
        raise ConfigError(f"{source}: api.profile must be cn or com, got {profile!r}")
    # Flags, then the environment (a per-invocation override, e.g. a proxy), then the job.
    base_url = (
        args.base_url
        or (BASE_URLS[profile] if args.profile else None)
        or os.environ.get("SILICONFLOW_BASE_URL")
        or settings.pop("base_url", None)
        or (BASE_URLS[profile] if profile else None)
        or base_url_from_env()
    )
    settings.pop("base_url", None)

    inputs: list[str] = [str(args.input)] if job_path is None else settings.pop("inputs", [])
    if not inputs:
        raise ConfigError(f"{source}: job.inputs names no prompt file")
    emulator = _emulator_mode(flags.pop("emulator", None) or settings.pop("emulator", None), source)
    emulator_settings = settings.pop("emulator_settings")
    name = settings.pop("name", job_path.stem if job_path else "")

    shard = flags.pop("shard", None) or settings.pop("shard", None)
    if isinstance(shard, str):
        try:
            shard = parse_shard(shard)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    run_fields = {f for f in RunConfig.__dataclass_fields__} - {"defaults", "out_dir", "api_key"}
    merged: dict[str, Any] = {k: v for k, v in settings.items() if k in run_fields}
    merged.update({k: v for k, v in flags.items() if k in run_fields})
    if shard is not None:
        merged["shard"] = shard
    try:
        defaults = RequestDefaults(**request)
        config = RunConfig(
            out_dir=Path(out),
            api_key=os.environ.get(key_env, "").strip(),
            base_url=base_url,
            defaults=defaults,
            **merged,
        )
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    except ConfigError as exc:
        if job_path is None:
            raise
        raise ConfigError(f"{job_path} (or a flag overriding it): {exc}") from exc
    registry = ModelRegistry.load(config.models_file)
    return Job(
        config=config,
        inputs=inputs,
        registry=registry,
        emulator=emulator,
        emulator_settings=emulator_settings,
        name=name,
        key_env=key_env,
    )
