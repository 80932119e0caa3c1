"""sfbatch: asyncio batch image generation for the SiliconFlow images API."""

from sfbatch.config import RequestDefaults, RunConfig
from sfbatch.errors import SfbatchError
from sfbatch.models import ModelRegistry, ModelRule, validate_request

__version__ = "0.1.0"

__all__ = [
    "ModelRegistry",
    "ModelRule",
    "RequestDefaults",
    "RunConfig",
    "SfbatchError",
    "__version__",
    "validate_request",
]
