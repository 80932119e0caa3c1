"""sfbatch: asyncio batch image generation for the SiliconFlow images API.

>>> import sfbatch
>>> config = sfbatch.RunConfig(out_dir="out", api_key="sk-...")      # doctest: +SKIP
>>> async for record in sfbatch.generate(["a cat", "a dog"], config):  # doctest: +SKIP
...     print(record["status"], record["images"])

The public surface is :data:`__all__`: :func:`generate` and what it takes, yields and
raises (:class:`RunConfig`, :class:`RequestDefaults`, :class:`ManifestRecord` and its
parts, :class:`RunResult`, the whole error tree), :class:`SiliconFlowClient` for one
request at a time, and :class:`Emulator`, the embedded emulator as an async context
manager (``async with sfbatch.Emulator() as emu:`` gives ``emu.base_url`` and
``emu.api_key``) for trying things out and for users' own tests. The stages
(``Pipeline``, ``Row``, ``PromptSource``, ``ModelRule``, ...) are importable from their
modules but are not promised to stay as they are.
"""

from typing import TYPE_CHECKING, Any

from sfbatch import errors as _errors
from sfbatch.client import Generation, SiliconFlowClient
from sfbatch.config import RequestDefaults, RunConfig
from sfbatch.errors import *  # noqa: F403  (the whole error tree: errors.__all__)
from sfbatch.manifest import ImageEntry, ManifestRecord, RecordError, Status
from sfbatch.pipeline import RunResult, generate

if TYPE_CHECKING:
    from sfbatch.emulator import Emulator

__version__ = "0.1.0"

__all__ = [
    # every exception of errors.py's tree, without its helpers and constants
    *(
        name
        for name in _errors.__all__
        if isinstance(getattr(_errors, name), type)
        and issubclass(getattr(_errors, name), BaseException)
    ),
    "Emulator",
    "Generation",
    "ImageEntry",
    "ManifestRecord",
    "RecordError",
    "RequestDefaults",
    "RunConfig",
    "RunResult",
    "SiliconFlowClient",
    "Status",
    "__version__",
    "generate",
]


def __getattr__(name: str) -> Any:
    # The emulator (aiohttp's server side) is imported on first use: `sfbatch run` never
    # needs it, and start-up is part of every run's CPU.
    if name == "Emulator":
        from sfbatch.emulator import Emulator

        return Emulator
    raise AttributeError(f"module 'sfbatch' has no attribute {name!r}")
