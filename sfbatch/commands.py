"""What every ``sfbatch`` subcommand shares: how it is declared and added to the parser.

A subcommand is a :class:`Command`: a name, a handler and flags. The handler's docstring
is the command's text: its first paragraph the one-line help of ``sfbatch --help``, the
rest the description of ``sfbatch NAME --help``. A flag whose value goes to one config
field as given names that ``field``: :func:`given` hands the values to the config, so the
flag is declared once. (``sfbatch run``'s flags come from :mod:`sfbatch.settings` instead,
with job-file keys and checks.)
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from dataclasses import field as _field
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["Command", "Flag", "Handler", "add_command", "flag", "flag_type", "given", "path_arg"]

T = TypeVar("T")

#: A subcommand's handler: the parsed flags in, the exit code out.
Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Flag:
    """One flag (or positional): its name, help and argparse ``options``; with ``field``,
    the config field its value goes to as given (the flag's ``dest``)."""

    name: str
    help: str | None = None
    field: str | None = None
    options: Mapping[str, Any] = _field(default_factory=dict)


def flag(name: str, help: str | None = None, *, field: str | None = None, **options: Any) -> Flag:
    """A :class:`Flag`; ``options`` are :meth:`argparse.ArgumentParser.add_argument`'s."""
    return Flag(name, help, field, options)


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, its handler (whose docstring is its text, with ``{name}``
    filled from ``text_values`` when given) and its flags, in the order ``--help`` lists them."""

    name: str
    handler: Handler
    flags: tuple[Flag, ...] = ()
    text_values: Mapping[str, str] = _field(default_factory=dict)


def add_command(subparsers: Any, command: Command) -> argparse.ArgumentParser:
    """Add the command to the ``sfbatch`` parser; its parser, for flags of other kinds."""
    text = inspect.cleandoc(command.handler.__doc__ or "")
    if command.text_values:
        text = text.format(**command.text_values)
    summary, _, description = text.partition("\n\n")
    parser: argparse.ArgumentParser = subparsers.add_parser(
        command.name, help=summary, description=description or None
    )
    parser.set_defaults(handler=command.handler)
    for f in command.flags:
        dest: dict[str, Any] = {} if f.field is None else {"dest": f.field}
        parser.add_argument(f.name, help=f.help, **dest, **f.options)
    return parser


def given(args: argparse.Namespace, flags: Iterable[Flag]) -> dict[str, Any]:
    """The config fields the flags set as given, with the values parsed."""
    return {f.field: getattr(args, f.field) for f in flags if f.field is not None}


def path_arg(text: str) -> Path:
    """A path flag's value: an empty one (``--out ""``) is a usage error, not the cwd."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    return Path(text)


def flag_type(
    parse: Callable[[str], T], errors: type[Exception] | tuple[type[Exception], ...]
) -> Callable[[str], T]:
    """``parse`` as an argparse ``type``: its ``errors`` become the usage error of the flag."""

    def parse_flag(text: str) -> T:
        try:
            return parse(text)
        except errors as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse_flag
