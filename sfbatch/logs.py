"""Where log records go: stderr, as text or JSON, above the live progress line if one is shown.

:func:`configure_logging` installs one :class:`StderrHandler` on the ``sfbatch`` logger
(and one for other libraries' warnings on the root logger). The live display
(:mod:`sfbatch.progress`) draws its line through a :class:`LiveLine` and attaches it
to those handlers, so a record is printed above the line instead of through it::

    configure_logging(level=logging.INFO, json_format=False)
    log.info("made %d images", 3)        # sfbatch: made 3 images
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

import orjson

__all__ = ["LiveLine", "StderrHandler", "attach_live_line", "configure_logging", "json_logging"]

_STANDARD_RECORD_KEYS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# Back to column 0 and erase the whole line: a ^C echoed after the live line goes too.
_CLEAR_LINE = "\r\x1b[2K"


class _TextFormatter(logging.Formatter):
    """``sfbatch: message`` for INFO, ``sfbatch: warning: message`` and so on otherwise."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        text = f"sfbatch: {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, and the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_RECORD_KEYS and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


class LiveLine:
    """One line at the bottom of a terminal, redrawn in place; :meth:`above` prints over it."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._text = ""

    def show(self, text: str) -> None:
        self._text = text
        self.stream.write(_CLEAR_LINE + text)
        self.stream.flush()

    def above(self, text: str) -> None:
        """Print ``text`` on a line of its own, then the live line again below it."""
        self.stream.write(f"{_CLEAR_LINE}{text}\n{self._text}")
        self.stream.flush()

    def close(self) -> None:
        """Leave the last state on screen and move below it."""
        self.stream.write(_CLEAR_LINE + self._text + "\n")
        self.stream.flush()


class StderrHandler(logging.Handler):
    """Writes to the current ``sys.stderr``, above :attr:`live` while a live line is shown."""

    live: LiveLine | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            live = self.live
            if live is not None:
                live.above(text)
            else:
                sys.stderr.write(text + "\n")
                sys.stderr.flush()
        except Exception:
            self.handleError(record)


def _handlers() -> list[StderrHandler]:
    loggers = (logging.getLogger("sfbatch"), logging.getLogger())
    return [h for logger in loggers for h in logger.handlers if isinstance(h, StderrHandler)]


def attach_live_line(live: LiveLine | None) -> None:
    """Print every record above ``live`` from now on (``None``: as plain lines again)."""
    for handler in _handlers():
        handler.live = live


def json_logging() -> bool:
    """Whether :func:`configure_logging` was asked for JSON records."""
    return any(isinstance(h.formatter, _JsonFormatter) for h in _handlers())


def configure_logging(*, level: int = logging.INFO, json_format: bool = False) -> None:
    """Send ``sfbatch`` records (and other libraries' warnings) to stderr.

    ``level`` is ``logging.WARNING`` for ``-q``, ``DEBUG`` for ``-v``. With
    ``json_format`` each record is one JSON object per line.
    """
    formatter = _JsonFormatter() if json_format else _TextFormatter()
    handler = StderrHandler()
    handler.setFormatter(formatter)
    logger = logging.getLogger("sfbatch")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    # Other libraries' warnings (asyncio, aiohttp) in the same format, above the live line.
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, StderrHandler)]:
        root.removeHandler(old)
    root_handler = StderrHandler(logging.WARNING)
    root_handler.setFormatter(formatter)
    root.addHandler(root_handler)
