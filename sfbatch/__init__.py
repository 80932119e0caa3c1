"""sfbatch: asyncio batch image generation for the SiliconFlow images API.

>>> import sfbatch
>>> config = sfbatch.RunConfig(out_dir="out", api_key="sk-...")      # doctest: +SKIP
>>> async for record in sfbatch.generate(["a cat", "a dog"], config):  # doctest: +SKIP
...     print(record["status"], record["images"])
"""

from sfbatch.client import Generation, SiliconFlowClient
from sfbatch.config import RequestDefaults, RunConfig
from sfbatch.errors import SfbatchError
from sfbatch.loader import PromptSource, Row
from sfbatch.models import ModelRegistry, ModelRule, validate_request
from sfbatch.pipeline import Pipeline, RunResult, generate

__version__ = "0.1.0"

__all__ = [
    "Generation",
    "ModelRegistry",
    "ModelRule",
    "Pipeline",
    "PromptSource",
    "RequestDefaults",
    "Row",
    "RunConfig",
    "RunResult",
    "SfbatchError",
    "SiliconFlowClient",
    "__version__",
    "generate",
    "validate_request",
]
