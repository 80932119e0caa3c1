"""A SiliconFlow images API emulator for tests and benchmarks, on a real loopback port.

    >>> async with Emulator(rpm=60, latency_s=0.5) as emu:       # doctest: +SKIP
    ...     url = emu.base_url                 # http://127.0.0.1:PORT/v1, key emu.api_key
    ...     emu.advance_clock(60)              # slide the rate windows, age the URLs
    ...     emu.set_faults(FaultConfig(p_503=0.1, seed=1))
    ...     emu.stats()["by_status"]

Or out of process: ``sfbatch emulator --port 8765 --rpm 60``, with ``GET /_stats``
and ``POST /_control``. See :mod:`sfbatch.emulator.server` for what it answers.
"""

from sfbatch.emulator.server import Emulator, EmulatorConfig, FaultConfig

__all__ = ["Emulator", "EmulatorConfig", "FaultConfig"]
