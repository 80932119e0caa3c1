"""What the user sees while a run goes: logging set-up, progress, the closing summary."""

from __future__ import annotations

import logging
import sys
from types import TracebackType
from typing import Any

__all__ = ["Progress", "configure_logging"]

log = logging.getLogger("sfbatch")


def configure_logging(*, level: int = logging.INFO, json_format: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("sfbatch: %(levelname)s: %(message)s"))
    root = logging.getLogger("sfbatch")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class Progress:
    """Shows how a run is going (a placeholder until the progress bar lands)."""

    def __init__(self, pipeline: Any, *, sources: Any, enabled: bool = True) -> None:
        self._pipeline = pipeline

    async def __aenter__(self) -> Progress:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def print_summary(self, result: Any) -> None:
        log.info("%s: %s", result.outcome, result.summary.get("run"))
