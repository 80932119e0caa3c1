"""The one ``async with`` protocol of sfbatch's resources (client, stores, emulator, progress)."""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["AsyncResource"]


class AsyncResource:
    """Entering awaits :meth:`_open` and gives the object itself; leaving awaits
    :meth:`aclose`, whether the block raised or not. Subclasses override the two."""

    async def _open(self) -> None:
        """Acquire what the object needs; nothing by default."""

    async def aclose(self) -> None:
        """Release what the object holds; nothing by default."""

    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
