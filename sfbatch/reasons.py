"""Why an item failed, named once: the key ``summary.json`` counts by, its label, its group.

A :class:`Reason` is the record's status with the error's HTTP status and code (or the
error class's name when no HTTP status came back)::

    >>> reason = Reason.of("failed", {"status": 400, "code": 20012, "message": "bad size"})
    >>> reason.key, reason.label
    ('failed: 400 20012', 'HTTP 400 (code 20012)')
    >>> Reason.of("failed", {"status": None, "code": "RequestTimeoutError", "message": ""}).label
    'request timeout'

``key`` is what ``summary.json``'s ``errors`` and ``sfbatch status --json``'s ``errors``
count by; ``label`` is what the closing summary and the gallery show;
:meth:`Reason.group` adds the message with its particulars blanked
(:func:`message_class`), which is how ``sfbatch status`` lists reasons.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Reason", "ReasonTally", "message_class"]

_FILE_LINE = re.compile(r"^[^\s:]+:\d+: ")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_HEXISH = re.compile(r"\b[0-9a-fA-F-]{16,}\b")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_MESSAGE_CLASS_LEN = 72


def message_class(message: str) -> str:
    """An error message with its particulars blanked, so alike failures group together.

    >>> message_class("prompts.jsonl:12: batch_size must be 1..4, got 9")
    'batch_size must be N..N, got N'
    """
    text = _FILE_LINE.sub("", message.strip(), count=1)
    text = _QUOTED.sub("'…'", text)
    text = _HEXISH.sub("…", text)
    text = _NUMBER.sub("N", text)
    text = " ".join(text.split())
    if len(text) > _MESSAGE_CLASS_LEN:
        text = text[: _MESSAGE_CLASS_LEN - 1] + "…"
    return text


@dataclass(frozen=True)
class Reason:
    """The cause of a ``failed`` or ``invalid`` record, at the grain errors are counted."""

    status: str
    http_status: int | None = None
    code: int | str | None = None

    @classmethod
    def of(cls, status: str, error: Mapping[str, Any] | None) -> Reason:
        """The reason of a record with ``status`` and ``error`` (``None`` if none was kept)."""
        if not isinstance(error, Mapping):
            return cls(status)
        http = error.get("status")
        code = error.get("code")
        return cls(
            status,
            http if isinstance(http, int) and not isinstance(http, bool) else None,
            code if isinstance(code, int | str) and code != "" else None,
        )

    @property
    def head(self) -> str:
        """``400 20012``, ``RequestTimeoutError``, ``invalid``; empty when nothing is known."""
        return " ".join(str(part) for part in (self.http_status, self.code) if part is not None)

    @property
    def key(self) -> str:
        """``failed: 400 20012``: what ``summary.json``'s ``errors`` counts by."""
        return f"{self.status}: {self.head or 'unknown'}"

    @property
    def label(self) -> str:
        """``HTTP 400 (code 20012)``, ``HTTP 503``, ``request timeout``, ``invalid``."""
        if self.http_status is not None:
            label = f"HTTP {self.http_status}"
            return f"{label} (code {self.code})" if self.code is not None else label
        if self.code is None:
            return self.status
        name = re.sub(r"Error$", "", str(self.code))
        return re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower() or str(self.code)

    def group(self, message: str) -> str:
        """``400 20012: prompt '…' too long: N > N``: the reason with its message's class."""
        text = message_class(message)
        head = self.head
        return f"{head}: {text}" if head and text else head or text or "(no error recorded)"

    def describe(self, message: str) -> str:
        """``HTTP 400 (code 20012): the full message``, for one item."""
        message = message.strip()
        return f"{self.label}: {message}" if message else self.label


@dataclass(frozen=True)
class ReasonTally:
    """How many records of this run failed for ``reason``, and one message as an example."""

    reason: Reason
    count: int
    example: str
