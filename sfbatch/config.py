"""Run configuration: frozen, keyword-only dataclasses validated on creation.

A :class:`RunConfig` is everything one run needs. The CLI builds it from flags and a
job file (:mod:`sfbatch.jobfile`); library users build it directly::

    >>> cfg = RunConfig(out_dir=Path("out"), api_key="sk-test", rpm=60)
    >>> cfg.base_url
    'https://api.siliconflow.cn/v1'
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sfbatch.errors import ConfigError

__all__ = [
    "BASE_URLS",
    "DEFAULT_BASE_URL",
    "RequestDefaults",
    "RunConfig",
    "base_url_from_env",
    "parse_shard",
]

BASE_URLS = {
    "cn": "https://api.siliconflow.cn/v1",
    "com": "https://api.siliconflow.com/v1",
}
DEFAULT_BASE_URL = BASE_URLS["cn"]


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` as ``(I, N)``, 0-based: ``parse_shard("0/4") == (0, 4)``."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"shard must be I/N (e.g. 0/4), got {text!r}") from None
    if not (count >= 1 and 0 <= index < count):
        raise ConfigError(f"shard I/N needs 0 <= I < N, got {text!r}")
    return index, count


def base_url_from_env() -> str:
    return os.environ.get("SILICONFLOW_BASE_URL") or DEFAULT_BASE_URL


@dataclass(frozen=True, kw_only=True)
class RequestDefaults:
    """Request fields applied to every row that does not set them itself.

    ``None`` means "do not send": the server's (model's) default applies.
    """

    model: str | None = None
    image_size: str | None = None
    batch_size: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    cfg: float | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    prompt_enhancement: bool | None = None
    #: An input image (path, URL or data URI) for rows that give none; a relative path
    #: is taken from the current directory (see :mod:`sfbatch.inputs`).
    image: str | None = None

    def as_request(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }


def _positive(name: str, value: float | None, *, allow_none: bool = True) -> None:
    if value is None:
        if not allow_none:
            raise ConfigError(f"{name} is required")
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything one run needs. Rates are per minute (``rpm``, ``ipm``) or per day (``ipd``)."""

    out_dir: Path
    api_key: str = field(repr=False)
    base_url: str = field(default_factory=base_url_from_env)
    defaults: RequestDefaults = field(default_factory=RequestDefaults)
    models_file: Path | None = None

    rpm: float | None = None
    ipm: float | None = None
    ipd: int | None = None
    day_utc_offset_h: float = 8.0

    concurrency: int = 4
    download_concurrency: int = 8
    queue_size: int = 256
    max_retries: int = 5
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    request_timeout_s: float = 300.0
    connect_timeout_s: float = 30.0
    download_timeout_s: float = 120.0
    max_image_bytes: int = 64 * 1024 * 1024
    url_ttl_s: float = 3600.0
    fsync_images: bool = True
    grace_s: float = 30.0

    limit: int | None = None
    retry_failed: bool = False
    base_seed: int = 0
    variations: int = 1
    dedupe: bool = False
    shard: tuple[int, int] | None = None
    name_template: str = "{id}_{index}"

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"base URL must start with http:// or https://, got {self.base_url!r}"
            )
        for name in ("rpm", "ipm"):
            _positive(name, getattr(self, name))
        if self.ipd is not None and (isinstance(self.ipd, bool) or self.ipd < 0):
            raise ConfigError(f"ipd must be zero or a positive integer, got {self.ipd!r}")
        for name in ("concurrency", "download_concurrency", "queue_size", "variations"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a whole number of at least 1, got {value!r}")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ConfigError(f"max_retries must be 0 or more, got {self.max_retries!r}")
        for name in (
            "backoff_base_s",
            "backoff_cap_s",
            "request_timeout_s",
            "connect_timeout_s",
            "download_timeout_s",
            "url_ttl_s",
            "grace_s",
        ):
            _positive(name, getattr(self, name), allow_none=False)
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"limit must be 0 or more, got {self.limit!r}")
        if self.shard is not None:
            index, count = self.shard
            if not (count >= 1 and 0 <= index < count):
                raise ConfigError(f"shard must be i/N with 0 <= i < N, got {index}/{count}")
        if "{id}" not in self.name_template or "{index}" not in self.name_template:
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

    @property
    def summary_name(self) -> str:
        return self.manifest_name.replace("manifest", "summary").replace(".jsonl", ".json")
