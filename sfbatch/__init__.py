"""sfbatch: asyncio batch image generation for the SiliconFlow images API.

>>> import sfbatch
>>> config = sfbatch.RunConfig(out_dir="out", api_key="sk-...")      # doctest: +SKIP
>>> async for record in sfbatch.generate(["a cat", "a dog"], config):  # doctest: +SKIP
...     print(record["status"], record["images"])

The public surface is :data:`__all__`: :func:`generate` and what it takes, yields and
raises (:class:`RunConfig`, :class:`RequestDefaults`, :class:`ManifestRecord` and its
parts, :class:`RunResult`, the whole error tree), and :class:`SiliconFlowClient` for one
request at a time. The stages (``Pipeline``, ``Row``, ``PromptSource``, ``ModelRule``,
...) are importable from their modules but are not promised to stay as they are.
"""

from sfbatch.client import Generation, SiliconFlowClient
from sfbatch.config import RequestDefaults, RunConfig
from sfbatch.errors import (
    ApiError,
    AuthenticationError,
    BadRequestError,
    ConfigError,
    DailyQuotaError,
    DownloadError,
    EndpointNotFoundError,
    ExpiredUrlError,
    FatalApiError,
    ImageTooLargeError,
    InputFileError,
    MalformedResponseError,
    NotAnImageError,
    QuotaReachedError,
    RateLimitError,
    RequestTimeoutError,
    ServerError,
    SfbatchError,
    TransportError,
)
from sfbatch.manifest import ImageEntry, ManifestRecord, RecordError, Status
from sfbatch.pipeline import RunResult, generate

__version__ = "0.1.0"

__all__ = [
    "ApiError",
    "AuthenticationError",
    "BadRequestError",
    "ConfigError",
    "DailyQuotaError",
    "DownloadError",
    "EndpointNotFoundError",
    "ExpiredUrlError",
    "FatalApiError",
    "Generation",
    "ImageEntry",
    "ImageTooLargeError",
    "InputFileError",
    "MalformedResponseError",
    "ManifestRecord",
    "NotAnImageError",
    "QuotaReachedError",
    "RateLimitError",
    "RecordError",
    "RequestDefaults",
    "RequestTimeoutError",
    "RunConfig",
    "RunResult",
    "ServerError",
    "SfbatchError",
    "SiliconFlowClient",
    "Status",
    "TransportError",
    "__version__",
    "generate",
]
