"""The ``sfbatch`` command: argument parsing and exit codes.

Each subcommand's work lives in its own module, which exposes
``register(subparsers) -> None``; the parser it adds sets ``handler``, a callable
``(argparse.Namespace) -> int`` returning the exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["EXIT_AUTH", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_QUOTA", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_QUOTA = 4
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    from sfbatch import __version__
    from sfbatch.emulator import cli as emulator_cli

    parser = argparse.ArgumentParser(
        prog="sfbatch",
        description="Batch image generation for the SiliconFlow images API.",
    )
    parser.add_argument("--version", action="version", version=f"sfbatch {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in (emulator_cli.register,):
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
