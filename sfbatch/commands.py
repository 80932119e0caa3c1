"""What every ``sfbatch`` subcommand shares: how it is added to the parser, and flag types.

A subcommand is its handler: the handler's docstring is the command's text, its first
paragraph the one-line help of ``sfbatch --help`` and the rest the description of
``sfbatch NAME --help``.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Handler", "add_command", "flag_type"]

T = TypeVar("T")

#: A subcommand's handler: the parsed flags in, the exit code out.
Handler = Callable[[argparse.Namespace], int]


def add_command(
    subparsers: Any, name: str, handler: Handler, **fields: str
) -> argparse.ArgumentParser:
    """Add subcommand ``name``, run by ``handler`` and described by its docstring (with
    ``{field}`` filled from ``fields`` when given); the new parser, for its flags."""
    text = inspect.cleandoc(handler.__doc__ or "")
    if fields:
        text = text.format(**fields)
    summary, _, description = text.partition("\n\n")
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=summary, description=description or None
    )
    parser.set_defaults(handler=handler)
    return parser


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
