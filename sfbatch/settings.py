"""Declared settings: one dataclass field is one job-file key and one flag.

A configuration part is a frozen, keyword-only dataclass with a ``SECTION`` (its job-file
table) whose fields are declared with :func:`setting`. From those declarations come the
job-file schema (:mod:`sfbatch.jobfile`), the command-line flags (:mod:`sfbatch.cli`) and the
part's own validation (:func:`check`, called from its ``__post_init__``), so adding a field is
a one-place change::

    @dataclass(frozen=True, kw_only=True)
    class Timeouts:
        SECTION: ClassVar[str] = "retry"
        download_timeout_s: float = setting(120.0, help="deadline of one download", above=0)

        def __post_init__(self) -> None:
            check(self)

is the job-file key ``retry.download_timeout_s`` and the flag ``--download-timeout``: the
key is the field name unless ``key`` says otherwise, the flag is the key with its unit
suffix (``_s``, ``_h``) dropped and ``_`` written ``-`` unless ``flag`` says otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sfbatch.errors import ConfigError

__all__ = ["Setting", "Spec", "check", "own_specs", "setting", "specs_of"]

_META = "sfbatch.setting"
_UNIT_SUFFIXES = ("_s", "_h")


@dataclass(frozen=True, kw_only=True)
class Setting:
    """How a field is spelled outside Python, and the bounds its value must keep."""

    help: str
    key: str | None = None
    """Job-file key, when it is not the field name."""
    flag: str | None = None
    """Flag without ``--``, when it is not derived from the key."""
    section: str | None = None
    """Job-file table, when it is not the part's ``SECTION``."""
    above: float | None = None
    """The value must be greater than this."""
    at_least: float | None = None
    """The value must be at least this."""
    at_most: float | None = None
    """The value must be at most this (a typo of many digits is not a setting)."""
    parse: Callable[[str], Any] | None = None
    """Turns the job file's or the flag's text into the value (the field is then text there)."""


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    key: str | None = None,
    flag: str | None = None,
    section: str | None = None,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """A dataclass field with its :class:`Setting`; no ``default``: required (immutable only)."""
    meta = Setting(
        help=help,
        key=key,
        flag=flag,
        section=section,
        above=above,
        at_least=at_least,
        at_most=at_most,
        parse=parse,
    )
    return dataclasses.field(default=default, metadata={_META: meta})


@dataclass(frozen=True, kw_only=True)
class Spec:
    """One settable field, as the job file and the command line see it."""

    part: str | None
    """The :class:`~sfbatch.config.RunConfig` attribute holding the field's part (``None``: on
    RunConfig itself)."""
    name: str
    """The field's name in its dataclass."""
    section: str
    key: str
    flag: str
    kind: type
    """``bool``, ``int``, ``float``, ``str`` or ``Path``: what the value is."""
    optional: bool
    setting: Setting
    default: Any

    @property
    def id(self) -> str:
        """``section.key``, e.g. ``limits.rpm``: unique over a whole schema."""
        return f"{self.section}.{self.key}"

    @property
    def text_kinds(self) -> tuple[type, ...]:
        """What a job file may hold for this field."""
        if self.setting.parse is not None and self.kind is int:
            return (str, int)  # a number, or a word its parse knows ("auto")
        if self.setting.parse is not None or self.kind is Path:
            return (str,)
        return (int, float) if self.kind is float else (self.kind,)


def _kind(hint: Any) -> tuple[type, bool]:
    """``float | None`` as ``(float, True)``; a type the schema does not know is an error."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    optional = type(None) in typing.get_args(hint)
    for candidate in (bool, int, float, str, Path):
        if candidate in args:
            return candidate, optional
    origin = typing.get_origin(args[0])
    if origin is not None:
        return origin, optional  # e.g. tuple[int, int]: given as text and parsed
    raise TypeError(f"no settings kind for {hint!r}")


def specs_of(cls: type) -> tuple[Spec, ...]:
    """Every setting of ``cls``, in field order: its own declared fields, and for a field
    whose type has a ``SECTION`` (a part) the part's declared fields."""
    if cls not in _ALL_SPECS:
        hints = typing.get_type_hints(cls)
        found: list[Spec] = []
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if isinstance(getattr(hint, "SECTION", None), str):
                found.extend(own_specs(hint, part=f.name))
            else:
                found.extend(spec for spec in own_specs(cls) if spec.name == f.name)
        _ALL_SPECS[cls] = tuple(found)
    return _ALL_SPECS[cls]


def own_specs(cls: type, *, part: str | None = None) -> tuple[Spec, ...]:
    """The fields of ``cls`` declared with :func:`setting` (``part``: the attribute that
    holds ``cls`` in its parent, recorded in each spec)."""
    if (cls, part) not in _OWN_SPECS:
        _OWN_SPECS[cls, part] = tuple(_declared(cls, part))
    return _OWN_SPECS[cls, part]


_ALL_SPECS: dict[type, tuple[Spec, ...]] = {}
_OWN_SPECS: dict[tuple[type, str | None], tuple[Spec, ...]] = {}


def _declared(cls: type, part: str | None) -> Iterator[Spec]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_META)
        if not isinstance(meta, Setting):
            continue
        kind, optional = _kind(hints[f.name])
        key = meta.key or f.name
        stem = next((key[: -len(s)] for s in _UNIT_SUFFIXES if key.endswith(s)), key)
        yield Spec(
            part=part,
            name=f.name,
            section=meta.section or str(getattr(cls, "SECTION", "")),
            key=key,
            flag=meta.flag or stem.replace("_", "-"),
            kind=kind,
            optional=optional,
            setting=meta,
            default=f.default,
        )


def _type_problem(value: Any, kind: type) -> bool:
    if kind is bool:
        return not isinstance(value, bool)
    if isinstance(value, bool):
        return True
    if kind is int:
        return not isinstance(value, int)
    if kind is float:
        return not isinstance(value, int | float) or not math.isfinite(value)
    return not isinstance(value, kind)


def _bound(bound: float) -> str:
    """A bound as a user reads it: ``10,000``, ``0.5``."""
    return f"{int(bound):,}" if float(bound).is_integer() else f"{bound:g}"


def check(obj: Any) -> None:
    """Raise :class:`ConfigError` if a declared field of ``obj`` has the wrong type or is out
    of bounds; the message names the job-file key (``rpm must be ...``)."""
    for spec in own_specs(type(obj)):
        value = getattr(obj, spec.name)
        if value is None and spec.optional:
            continue
        meta = spec.setting
        if _type_problem(value, spec.kind):
            what = {int: "a whole number", float: "a number", bool: "true or false"}
            raise ConfigError(
                f"{spec.key} must be {what.get(spec.kind, spec.kind.__name__)}, got {value!r}"
            )
        if meta.above is not None and not value > meta.above:
            raise ConfigError(f"{spec.key} must be more than {meta.above:g}, got {value!r}")
        if meta.at_least is not None and not value >= meta.at_least:
            raise ConfigError(f"{spec.key} must be at least {_bound(meta.at_least)}, got {value!r}")
        if meta.at_most is not None and not value <= meta.at_most:
            raise ConfigError(f"{spec.key} must be at most {_bound(meta.at_most)}, got {value!r}")
