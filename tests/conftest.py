"""Shared fixtures: the SiliconFlow emulator on 127.0.0.1, on a free port.

``emulator`` is one with the defaults (key ``sk-emulator``, zero latency, no limits,
no faults); ``emulator_factory(**config_fields)`` is an async context manager for any
other configuration, e.g. ``async with emulator_factory(rpm=2, latency_s=0.05) as emu``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest

from sfbatch.emulator import Emulator, EmulatorConfig

EmulatorFactory = Callable[..., AbstractAsyncContextManager[Emulator]]


@pytest.fixture
def emulator_factory() -> EmulatorFactory:
    """``factory(config=None, **overrides)``: an async context manager running an Emulator.

    The overrides are :class:`EmulatorConfig` fields; the host is always 127.0.0.1 and
    the port a free one.
    """

    @asynccontextmanager
    async def factory(
        config: EmulatorConfig | None = None, **overrides: Any
    ) -> AsyncIterator[Emulator]:
        overrides.update(host="127.0.0.1", port=0)
        async with Emulator(config, **overrides) as emulator:
            yield emulator

    return factory


@pytest.fixture
async def emulator(emulator_factory: EmulatorFactory) -> AsyncIterator[Emulator]:
    """An emulator with the defaults: key ``sk-emulator``, no latency, limits or faults."""
    async with emulator_factory() as emu:
        yield emu
