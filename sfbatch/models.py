"""Per-model request rules, kept as data, and the one validation function.

The provider adds and retires models without notice, so the rules live in
``sfbatch/data/models.toml`` and users can add or override models with a file of
their own. :func:`validate_request` is shared by the engine (before any request is
paid for) and by the emulator (to answer 400 exactly where the API would)::

    >>> registry = ModelRegistry.builtin()
    >>> v = validate_request({"prompt": "a cat", "batch_size": 9}, registry)
    >>> v.errors
    ('batch_size must be 1..4, got 9',)
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from sfbatch.errors import ConfigError

__all__ = [
    "DEFAULT_MODEL",
    "IMAGE_FIELDS",
    "REQUEST_FIELDS",
    "SEED_MAX",
    "ModelRegistry",
    "ModelRule",
    "Validation",
    "effective_params",
    "validate_request",
]

DEFAULT_MODEL = "Kwai-Kolors/Kolors"
SEED_MAX = 9_999_999_999
REQUEST_FIELDS = (
    "model",
    "prompt",
    "negative_prompt",
    "image_size",
    "batch_size",
    "seed",
    "num_inference_steps",
    "guidance_scale",
    "cfg",
    "prompt_enhancement",
    "image",
    "image2",
    "image3",
)
#: The request fields that carry an input image (a URL or a data URI), in the order records
#: and digests list them.
IMAGE_FIELDS = ("image", "image2", "image3")
_SIZE_RE = re.compile(r"^([1-9][0-9]{1,4})x([1-9][0-9]{1,4})$")
_RULE_KEYS = {
    "image_sizes",
    "sizes_recommended",
    "max_pixels",
    "soft_max_pixels",
    "takes_size",
    "default_size",
    "steps",
    "fixed_steps",
    "default_steps",
    "guidance_field",
    "guidance",
    "default_guidance",
    "batch_size",
    "takes_image",
    "image_fields",
    "image_required",
    "endpoints",
}


@dataclass(frozen=True, kw_only=True)
class ModelRule:
    """What one model accepts.

    Sizes: ``image_sizes`` lists the sizes; with ``sizes_recommended`` they are only
    the provider's recommendation (another size passes with a warning), else they are
    the only ones allowed. ``image_sizes=None`` allows any size up to ``max_pixels``.
    ``soft_max_pixels`` is a cap known only from observation: above it, a warning (the
    server's 400 is the final word). ``takes_size=False``: the model takes no
    ``image_size`` (an edit model's output follows its input image).

    Image inputs: ``image_fields`` are the input-image fields the model takes (``()``
    for text-to-image), ``image_required`` those it cannot do without.
    """

    name: str
    image_sizes: tuple[str, ...] | None = None
    sizes_recommended: bool = False
    max_pixels: int | None = None
    soft_max_pixels: int | None = None
    default_size: str | None = "1024x1024"
    takes_size: bool = True
    steps: tuple[int, int] = (1, 50)
    fixed_steps: int | None = None
    default_steps: int = 20
    guidance_field: str = "guidance_scale"
    guidance: tuple[float, float] = (0.0, 20.0)
    default_guidance: float | None = 7.5
    batch_size: tuple[int, int] = (1, 4)
    image_fields: tuple[str, ...] = ()
    image_required: tuple[str, ...] = ()
    endpoints: tuple[str, ...] = ("cn", "com")

    def __post_init__(self) -> None:
        if self.takes_size and self.image_sizes is None and self.max_pixels is None:
            raise ConfigError(f"model {self.name}: give image_sizes or max_pixels")
        if not self.takes_size:
            object.__setattr__(self, "default_size", None)
        if self.guidance_field not in ("guidance_scale", "cfg", ""):
            raise ConfigError(
                f"model {self.name}: guidance_field must be guidance_scale, cfg or empty, "
                f"got {self.guidance_field!r}"
            )
        lo, hi = self.batch_size
        if not 1 <= lo <= hi:
            raise ConfigError(f"model {self.name}: batch_size range {lo}..{hi} is empty")
        lo, hi = self.steps
        if not 1 <= lo <= hi:
            raise ConfigError(f"model {self.name}: steps range {lo}..{hi} is empty")
        if not lo <= self.default_steps <= hi:
            raise ConfigError(
                f"model {self.name}: default_steps {self.default_steps} is outside steps {lo}..{hi}"
            )
        if self.guidance[0] > self.guidance[1]:
            raise ConfigError(f"model {self.name}: guidance range {self.guidance} is empty")
        unknown = [f for f in self.image_fields if f not in IMAGE_FIELDS]
        if unknown:
            raise ConfigError(
                f"model {self.name}: image_fields may hold {', '.join(IMAGE_FIELDS)}, "
                f"got {unknown[0]!r}"
            )
        extra = [f for f in self.image_required if f not in self.image_fields]
        if extra:
            raise ConfigError(f"model {self.name}: required image field {extra[0]!r} not taken")

    @property
    def max_batch_size(self) -> int:
        return self.batch_size[1]

    @property
    def takes_image(self) -> bool:
        """An image-to-image (edit) model: it takes at least one input image."""
        return bool(self.image_fields)


# Used for a model the registry does not know: the loosest rules the API documents
# (it may be a new edit model, so input images are taken but not required).
def _generic_rule(name: str) -> ModelRule:
    return ModelRule(name=name, max_pixels=4096 * 4096, steps=(1, 100), image_fields=IMAGE_FIELDS)


class ModelRegistry:
    """An immutable mapping of model name to :class:`ModelRule`.

    >>> reg = ModelRegistry.builtin()
    >>> reg.get("Qwen/Qwen-Image").guidance_field
    'cfg'
    """

    def __init__(self, rules: Mapping[str, ModelRule]) -> None:
        self._rules = dict(rules)

    @classmethod
    def builtin(cls) -> ModelRegistry:
        """The models shipped with sfbatch."""
        text = resources.files("sfbatch").joinpath("data/models.toml").read_text("utf-8")
        return cls(_parse_rules(text, "sfbatch/data/models.toml"))

    @classmethod
    def load(cls, path: Path | None) -> ModelRegistry:
        """The built-in models, extended and overridden by the models in ``path``."""
        registry = cls.builtin()
        if path is None:
            return registry
        try:
            text = Path(path).read_text("utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read models file: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{path}: not valid UTF-8 (byte {exc.start}): not a TOML file"
            ) from exc
        return registry.merged(_parse_rules(text, str(path)))

    def merged(self, rules: Mapping[str, ModelRule]) -> ModelRegistry:
        return ModelRegistry({**self._rules, **rules})

    def get(self, name: str) -> ModelRule | None:
        return self._rules.get(name)

    def rule_for(self, name: str) -> ModelRule:
        """The model's rule, or the generic rule for a model we do not know."""
        return self._rules.get(name) or _generic_rule(name)

    def __contains__(self, name: object) -> bool:
        return name in self._rules

    def __iter__(self) -> Iterator[ModelRule]:
        return iter(self._rules.values())

    def names(self) -> list[str]:
        return sorted(self._rules)


def _parse_rules(text: str, source: str) -> dict[str, ModelRule]:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    models = doc.get("models")
    if not isinstance(models, dict):
        raise ConfigError(f'{source}: expected [models."NAME"] tables')
    rules: dict[str, ModelRule] = {}
    for name, spec in models.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"{source}: models.{name} must be a table")
        unknown = set(spec) - _RULE_KEYS
        if unknown:
            raise ConfigError(f"{source}: models.{name}: unknown key {sorted(unknown)[0]!r}")
        try:
            rules[name] = _rule_from_spec(name, spec)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: models.{name}: {exc}") from exc
    return rules


def _rule_from_spec(name: str, spec: dict[str, Any]) -> ModelRule:
    kwargs: dict[str, Any] = {"name": name}
    for key, value in spec.items():
        if key in ("image_sizes", "endpoints", "image_fields", "image_required"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"{key} must be a list of text, got {value!r}")
            kwargs[key] = tuple(value)
        elif key == "takes_image":  # the older spelling: one required `image`
            if not isinstance(value, bool):
                raise TypeError(f"takes_image must be true or false, got {value!r}")
            if value:
                kwargs.setdefault("image_fields", ("image",))
                kwargs.setdefault("image_required", ("image",))
        elif key in ("steps", "batch_size", "guidance"):
            number = float if key == "guidance" else int
            if (
                not isinstance(value, list)
                or len(value) != 2
                or not all(_is_number(v, number) for v in value)
            ):
                what = "numbers" if number is float else "whole numbers"
                raise TypeError(f"{key} must be [low, high], two {what}, got {value!r}")
            kwargs[key] = (number(value[0]), number(value[1]))
        elif key in ("takes_size", "sizes_recommended") and not isinstance(value, bool):
            raise TypeError(f"{key} must be true or false, got {value!r}")
        else:
            _check_type(key, value)
            kwargs[key] = value
    if kwargs.get("guidance_field") == "":
        kwargs.setdefault("default_guidance", None)
    if "fixed_steps" in kwargs:
        kwargs.setdefault("default_steps", kwargs["fixed_steps"])
    return ModelRule(**kwargs)


# The plain keys of a models file and what each holds (None: may be left out by ``null``
# in code only; TOML has no null, so the key is simply absent).
_PLAIN_KINDS: dict[str, tuple[type, ...]] = {
    "max_pixels": (int,),
    "soft_max_pixels": (int,),
    "default_size": (str,),
    "fixed_steps": (int,),
    "default_steps": (int,),
    "guidance_field": (str,),
    "default_guidance": (int, float),
}


def _is_number(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int | float) if kind is float else isinstance(value, int)


def _check_type(key: str, value: Any) -> None:
    kinds = _PLAIN_KINDS.get(key)
    if kinds is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
        what = "a whole number" if kinds == (int,) else "a number" if float in kinds else "text"
        raise TypeError(f"{key} must be {what}, got {value!r}")


@dataclass(frozen=True)
class Validation:
    """The outcome of :func:`validate_request`: a request to send, or why not."""

    request: dict[str, Any] | None
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.errors


def _as_int(name: str, value: Any, errors: list[str]) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        errors.append(f"{name} must be an integer, got {value!r}")
        return None
    if isinstance(value, float):
        if not value.is_integer():
            errors.append(f"{name} must be an integer, got {value!r}")
            return None
        return int(value)
    return value


def _as_number(name: str, value: Any, errors: list[str]) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        errors.append(f"{name} must be a number, got {value!r}")
        return None
    return value


def _check_range(name: str, value: float, lo: float, hi: float, errors: list[str]) -> None:
    if not lo <= value <= hi:
        allowed = _num(lo) if lo == hi else f"{_num(lo)}..{_num(hi)}"
        errors.append(f"{name} must be {allowed}, got {_num(value)}")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def validate_request(
    body: Mapping[str, Any],
    registry: ModelRegistry,
    *,
    unknown_model: Literal["warn", "error"] = "warn",
) -> Validation:
    """Check a request body against the rules of its model.

    Returns the body to send (fields that are ``None`` dropped, the model filled in)
    or every error found, each naming the field, the allowed range and the value.
    A model the registry does not know is checked against the generic rules and
    passes with a warning, unless ``unknown_model="error"`` (the emulator's choice).
    """
    errors: list[str] = []
    warnings: list[str] = []
    out: dict[str, Any] = {k: v for k, v in body.items() if v is not None}

    model = out.setdefault("model", DEFAULT_MODEL)
    if not isinstance(model, str) or not model:
        return Validation(None, (f"model must be a non-empty string, got {model!r}",))
    rule = registry.get(model)
    if rule is None:
        if unknown_model == "error":
            errors.append(f"Model does not exist: {model}")
        else:
            warnings.append(
                f"model {model!r} is not in the model rules; checked with generic rules "
                "(check its spelling, or describe it in a file given with --models-file)"
            )
        rule = _generic_rule(model)

    prompt = out.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        errors.append("prompt must be a non-empty string")

    negative = out.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        errors.append(f"negative_prompt must be a string, got {negative!r}")
    elif negative == "":
        del out["negative_prompt"]

    size = out.get("image_size")
    if size is not None and not rule.takes_size:
        # The service ignores it (U); dropping it keeps the record true to what was made.
        warnings.append(
            f"image_size is not taken by {model} (the output follows the input image); not sent"
        )
        del out["image_size"]
    elif size is not None:
        _check_size(size, rule, errors, warnings)

    if "batch_size" in out:
        batch = _as_int("batch_size", out["batch_size"], errors)
        if batch is not None:
            out["batch_size"] = batch
            _check_range("batch_size", batch, *rule.batch_size, errors)

    if "seed" in out:
        seed = _as_int("seed", out["seed"], errors)
        if seed is not None:
            out["seed"] = seed
            _check_range("seed", seed, 0, SEED_MAX, errors)

    if "num_inference_steps" in out:
        steps = _as_int("num_inference_steps", out["num_inference_steps"], errors)
        if steps is not None:
            out["num_inference_steps"] = steps
            if rule.fixed_steps is not None:
                if steps != rule.fixed_steps:
                    errors.append(
                        f"num_inference_steps is fixed at {rule.fixed_steps} for {model}, "
                        f"got {steps}"
                    )
                else:
                    del out["num_inference_steps"]
            else:
                _check_range("num_inference_steps", steps, *rule.steps, errors)

    for name in ("guidance_scale", "cfg"):
        if name not in out:
            continue
        value = _as_number(name, out[name], errors)
        if value is None:
            continue
        if rule.guidance_field != name:
            takes = f"takes {rule.guidance_field}" if rule.guidance_field else "takes no guidance"
            errors.append(f"{name} is not accepted by {model} (it {takes})")
        else:
            _check_range(name, value, *rule.guidance, errors)

    enhance = out.get("prompt_enhancement")
    if enhance is not None and not isinstance(enhance, bool):
        errors.append(f"prompt_enhancement must be true or false, got {enhance!r}")

    _check_images(out, rule, errors)

    if errors:
        return Validation(None, tuple(errors), tuple(warnings))
    return Validation(out, (), tuple(warnings))


def _check_size(size: Any, rule: ModelRule, errors: list[str], warnings: list[str]) -> None:
    match = _SIZE_RE.match(size) if isinstance(size, str) else None
    if match is None:
        errors.append(f"image_size must look like WIDTHxHEIGHT, got {size!r}")
        return
    if rule.image_sizes is not None and size not in rule.image_sizes:
        allowed = ", ".join(rule.image_sizes)
        if not rule.sizes_recommended:
            errors.append(f"image_size {size} is not offered by {rule.name} (one of: {allowed})")
            return
        warnings.append(
            f"image_size {size} is not one of {rule.name}'s recommended sizes ({allowed}); "
            "sent anyway, the server has the last word"
        )
    pixels = int(match.group(1)) * int(match.group(2))
    if rule.max_pixels is not None and pixels > rule.max_pixels:
        errors.append(f"image_size {size} has {pixels} pixels, above {rule.max_pixels}")
    elif rule.soft_max_pixels is not None and pixels > rule.soft_max_pixels:
        warnings.append(
            f"image_size {size} has {pixels} pixels, above the {rule.soft_max_pixels} the "
            f"service is reported to allow for {rule.name}; sent anyway"
        )


def _check_images(out: Mapping[str, Any], rule: ModelRule, errors: list[str]) -> None:
    """Input images: strings (URL, data URI, or a local path the engine will encode)."""
    for name in IMAGE_FIELDS:
        value = out.get(name)
        if value is None:
            if name in rule.image_required:
                errors.append(
                    f"{name} is required by {rule.name} (an edit model): "
                    "give a URL, a data URI or a local image file"
                )
        elif name not in rule.image_fields:
            takes = ", ".join(rule.image_fields) if rule.image_fields else "no input image"
            errors.append(f"{name} is not accepted by {rule.name} (it takes {takes})")
        elif not isinstance(value, str) or not value.strip():
            errors.append(f"{name} must be a URL, a data URI or a file path, got {value!r}")


def effective_params(request: Mapping[str, Any], registry: ModelRegistry) -> dict[str, Any]:
    """The parameters the server will use: the request's, else the model's defaults.

    This is what the manifest records, so a record says exactly what was made.
    """
    model = request.get("model", DEFAULT_MODEL)
    rule = registry.rule_for(model)
    steps = rule.fixed_steps or request.get("num_inference_steps", rule.default_steps)
    guidance = None
    if rule.guidance_field:
        guidance = request.get(rule.guidance_field, rule.default_guidance)
    size = request.get("image_size", rule.default_size) if rule.takes_size else None
    return {
        "model": model,
        "image_size": size,
        "batch_size": request.get("batch_size", 1),
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "prompt_enhancement": bool(request.get("prompt_enhancement", False)),
    }
