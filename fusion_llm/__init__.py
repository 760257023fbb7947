"""fusion-llm: decode a large language model with the knowledge of small expert models.

At every step the large model's logits are shifted by the experts' differences from their small
base, with weights solved per token (dynamic logit fusion). See `FusionEngine`.
"""

from .config import ExpertSpec, FusionConfig, FusionSpec, GenerationSpec, ModelSpec
from .engine import FusionEngine, FusionPrompt, Generation, StreamChunk
from .errors import (
    AdapterMismatchError,
    ConfigError,
    ContextWindowError,
    DeviceError,
    FusionError,
    ModelLoadError,
    ModelNotFoundError,
    NumericalFaultError,
    RequestError,
    UnknownExpertError,
    VocabularyMismatchError,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterMismatchError",
    "ConfigError",
    "ContextWindowError",
    "DeviceError",
    "ExpertSpec",
    "FusionConfig",
    "FusionEngine",
    "FusionError",
    "FusionPrompt",
    "FusionSpec",
    "Generation",
    "GenerationSpec",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelSpec",
    "NumericalFaultError",
    "RequestError",
    "StreamChunk",
    "UnknownExpertError",
    "VocabularyMismatchError",
]
