"""A SiliconFlow images API emulator for tests and benchmarks, on a real loopback port.

It speaks the service as it is today (``shared/api/service-2026.md``)::

    >>> async with Emulator(ipm=60, latency_s=0.5) as emu:       # doctest: +SKIP
    ...     url = emu.base_url                 # http://127.0.0.1:PORT/v1, key emu.api_key
    ...     emu.advance_clock(60)              # slide the rate windows, age the URLs
    ...     emu.set_faults(FaultConfig(p_503=0.1, seed=1))
    ...     emu.stats()["status_counts"]

What tests drive (each also a ``POST /_control`` key and, for fixed settings, a flag
of ``sfbatch emulator``):

- **Model list**: ``GET /v1/models?type=image[&sub_type=text-to-image|image-to-image]``
  lists the offered models: the ``profile``'s (``cn``, the default: Kolors, Qwen-Image,
  Qwen-Image-Edit, Qwen-Image-Edit-2509; not the withdrawn SD3/FLUX models), or
  ``offer=(...)`` / ``--offer MODEL`` / ``emu.set_offer([...])``. A generation for a
  model not offered: 400 ``{"code": 20012, "message": "Model does not exist. Please
  check it carefully.", "data": null}``. ``models_endpoint=False`` /
  ``--no-models-list`` / ``emu.set_models_endpoint(False)``: the list answers 404.
  ``stats()["models_requests"]`` counts list requests apart from
  ``generation_requests``.
- **Image inputs**: ``image``, ``image2``, ``image3`` as a URL or a data URI; data URIs
  are decoded and must be PNG/JPEG/WebP (else 400). ``emu.received_inputs`` (and
  ``GET /_received_inputs``): one dict per admitted request, field →
  ``{"kind", "format", "sha256", "bytes", "url"}``. Edit models take no ``image_size``.
- **Limits per key and per model**: ``rpm``/``ipm``/``rpd``/``ipd`` apply to each
  (key, model) pair; ``model_limits={"M": Limits(ipm=60)}`` / ``--model-limit
  M:ipm=60`` / ``emu.set_model_limits("M", Limits(...))`` give a model its own. A 429
  is ``{"code": 50604, "message": "Request was rejected due to rate limiting. Details:
  IPM limit reached.", "data": null}`` (RPM/IPM/RPD/IPD); ``retry_after_s`` adds
  ``Retry-After`` (default: none). ``emu.usage(key, model=None)``. ``emu.admissions()``
  (``GET /_admissions``): each limit decision, ``[ms since the stats reset, key, images,
  "ok" or the limit that refused]``, what benchmarks measure rates and stalls from.
- **403s**: ``emu.set_account_block("balance" | "verification" | None, key=None)``
  (30001 / 30002; every key, or one key: ``key_blocks``), ``emu.disable_model(name)``
  (30003 "Model disabled." for that model only);
  ``--fault-403 balance|verification|disabled:MODEL``.
- **Outage**: ``emu.set_outage(True)`` closes every API/image connection at once (the
  client sees a reset); ``set_outage(False)`` and the API answers again on the same
  port. ``/_stats``, ``/_received_inputs``, ``/_admissions`` and ``/_control`` answer
  throughout.
- **Secrets**: ``FaultConfig(p_echo_key=1.0)`` / ``--fault-echo-key 1``: a 400 whose
  ``code`` is the caller's key and whose message carries it across character 500.
- **Several keys**: ``api_keys={"k1", "k2"}`` / ``--key`` (repeatable); each key is
  its own account with its own counters; ``key_limits={"k2": Limits(ipd=100)}`` /
  ``--key-limit k2:ipd=100`` / ``emu.set_key_limits(...)`` give one key other limits
  (a model's own limits still win); ``stats()["images_by_key"]``.

Out of process: ``sfbatch emulator --port 8765 --ipm 60 --offer Kwai-Kolors/Kolors``,
with ``GET /_stats`` and ``POST /_control``. See :mod:`sfbatch.emulator.server`.
"""

from sfbatch.emulator.inputs import ReceivedImage
from sfbatch.emulator.limits import Limits
from sfbatch.emulator.server import Emulator, EmulatorConfig, FaultConfig

__all__ = ["Emulator", "EmulatorConfig", "FaultConfig", "Limits", "ReceivedImage"]
