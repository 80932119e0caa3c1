"""Checks made before paying: the request defaults as flags, the models against the endpoint.

:func:`check_defaults` is offline: the request defaults (flags, a job's ``[request]``)
checked against the rules of the model they apply to. A value no row could use there (a
size the model does not take, steps out of range, a batch too big) is a usage error naming
the flag or key and the whole set of allowed values; what rows may still supply (a prompt,
an edit model's required ``image``) is not. Warnings (a size only *recommended*) are
returned, not raised::

    >>> from sfbatch.config import RequestDefaults
    >>> check_defaults(RequestDefaults(num_inference_steps=500), ModelRegistry.builtin())
    Traceback (most recent call last):
    ...
    sfbatch.errors.ConfigError: --steps 500: num_inference_steps must be 1..100, got 500

:func:`fetch_offer` asks the endpoint once which image models it offers (``GET
/models?type=image``); :meth:`ModelOffer.problem` says why a model is not among them,
listing what is, and where the model rules place it when it belongs to the other platform.
The CLI refuses a run whose default model is not offered (exit 2, nothing sent); a row
naming one is an ``invalid`` row (:class:`~sfbatch.loader.PromptSource` ``offer=``). A
listing that cannot be fetched (404, timeout, 5xx, an odd body) is a warning, and the run
goes on; a 401 is the run's end (exit 3), as it would be at the first generation.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sfbatch.client import SiliconFlowClient
from sfbatch.config import BASE_URLS, RequestDefaults, RunConfig
from sfbatch.errors import ConfigError, FatalApiError, SfbatchError
from sfbatch.inputs import InputChecker, InputImageError, input_kind
from sfbatch.models import DEFAULT_MODEL, IMAGE_FIELDS, ModelRegistry, validate_request

__all__ = [
    "LIST_TIMEOUT_S",
    "ModelOffer",
    "check_defaults",
    "default_model",
    "endpoint_family",
    "fetch_offer",
]

log = logging.getLogger("sfbatch")

#: How long the model list may take before the run goes on without it.
LIST_TIMEOUT_S = 20.0
_PLATFORM_HOSTS = {family: urlsplit(url).hostname or "" for family, url in BASE_URLS.items()}


def endpoint_family(base_url: str) -> str | None:
    """``"cn"`` or ``"com"`` for SiliconFlow's hosts, else ``None`` (a proxy, the emulator)."""
    host = urlsplit(base_url).hostname or ""
    for family in BASE_URLS:
        if host.endswith(f"siliconflow.{family}"):
            return family
    return None


# -- the request defaults, checked as flags ---------------------------------------------------


def _row_can_supply(error: str) -> bool:
    """Errors about what a row brings itself: its prompt, an edit model's input image."""
    return error.startswith("prompt ") or any(
        error.startswith(f"{name} is required by") for name in IMAGE_FIELDS
    )


def check_defaults(
    defaults: RequestDefaults,
    registry: ModelRegistry,
    *,
    name_of: Callable[[str], str] | None = None,
) -> list[str]:
    """Check the request defaults against the rules of their model; return the warnings.

    Raises :class:`ConfigError` naming each wrong value as ``name_of(field)`` says (by
    default its flag: ``--image-size 1280x720``) and everything the model allows. A
    local default ``image`` must be a readable PNG/JPEG/WebP file (relative to the cwd).
    """
    name_of = name_of or _flag_of
    given = defaults.as_request()
    body = {**given, "prompt": "x"}
    checked = validate_request(body, registry, unknown_model="warn")
    errors = [e for e in checked.errors if not _row_can_supply(e)]
    if defaults.image is not None and input_kind(defaults.image) is not None:
        try:
            InputChecker(Path.cwd()).check("image", defaults.image)
        except InputImageError as exc:
            errors.append(str(exc))
    if errors:
        raise ConfigError("; ".join(_attributed(e, given, name_of) for e in errors))
    return list(checked.warnings)


def _flag_of(field: str) -> str:
    return "--steps" if field == "num_inference_steps" else "--" + field.replace("_", "-")


def _attributed(error: str, given: Mapping[str, Any], name_of: Callable[[str], str]) -> str:
    """``error`` prefixed with the flag (or job key) and value it is about."""
    fields = sorted((f for f in given if error.startswith(f)), key=len, reverse=True)
    if not fields:
        return error
    return f"{name_of(fields[0])} {given[fields[0]]}: {error}"


# -- the endpoint's model list ----------------------------------------------------------------


@dataclass(frozen=True)
class ModelOffer:
    """The image models an endpoint lists, in its order."""

    base_url: str
    models: tuple[str, ...]

    def __contains__(self, model: object) -> bool:
        return model in self.models  # a handful of names: a tuple is fast enough

    def problem(self, model: str, registry: ModelRegistry) -> str | None:
        """Why ``model`` cannot be used here (every offered model listed), or ``None``."""
        if model in self:
            return None
        offered = ", ".join(self.models) or "no image model"
        message = f"model {model} is not offered by {self.base_url} (it offers: {offered})"
        close = difflib.get_close_matches(model, self.models, n=1, cutoff=0.8)
        rule = registry.get(model)
        family = endpoint_family(self.base_url)
        if close:
            message += f"; did you mean {close[0]}?"
        elif rule is not None and not rule.endpoints:
            message += (
                "; the model rules say it was withdrawn from api.siliconflow.cn and .com "
                "(see the README's Models section)"
            )
        elif rule is not None and family not in rule.endpoints:
            others = [f for f in rule.endpoints if f != family]
            hosts = " and ".join(_PLATFORM_HOSTS.get(f, f) for f in others)
            message += (
                f"; the model rules list it on {hosts}, a separate platform with its own keys "
                f"(--profile {others[0]})"
            )
        return message


async def fetch_offer(
    client: SiliconFlowClient, *, timeout_s: float = LIST_TIMEOUT_S
) -> ModelOffer | None:
    """The endpoint's image models, or ``None`` (logged as a warning) if it cannot say.

    Raises :class:`~sfbatch.errors.AuthenticationError` on a 401: the key is wrong, and
    every generation would say the same.
    """
    try:
        async with asyncio.timeout(timeout_s):
            models = await client.list_models()
    except FatalApiError as exc:
        if exc.status == 401:
            raise
        reason = str(exc)
    except TimeoutError:
        reason = f"no answer within {timeout_s:.0f} s"
    except SfbatchError as exc:
        reason = str(exc)
    else:
        return ModelOffer(client.base_url, tuple(models))
    log.warning(
        "could not list the endpoint's models (%s); going on without the model check", reason
    )
    return None


async def check_models(config: RunConfig, registry: ModelRegistry) -> ModelOffer | None:
    """The endpoint's models before a run's first request (``None``: not checked, by
    ``config.model_check`` or because the endpoint cannot say). :class:`ConfigError` if a
    model the config names up front (the default, one with limits of its own) is not offered.
    The command and :func:`sfbatch.generate` both start with it."""
    if not config.model_check:
        return None
    async with SiliconFlowClient(
        base_url=config.base_url,
        api_key=config.api_keys[0],  # several keys: the first one's list stands for all
        connect_timeout_s=config.timeouts.connect_timeout_s,
    ) as client:
        offer = await fetch_offer(client)
    if offer is None:
        return None
    problem = offer.problem(default_model(config.defaults), registry)
    if problem is not None:
        raise ConfigError(
            f"{problem}. It is the model of rows that name none: choose one with --model "
            "(or [request] model), or send anyway with --no-model-check (model_check=False)"
        )
    for model in config.limits.models:
        problem = offer.problem(model, registry)
        if problem is not None:
            raise ConfigError(
                f"{problem}. The job sets limits for it ([limits.models]); remove them, or "
                "send anyway with --no-model-check (model_check=False)"
            )
    return offer


def default_model(defaults: RequestDefaults) -> str:
    """The model of rows that name none."""
    return defaults.model or DEFAULT_MODEL
