"""fusion-llm: decode a large language model with the knowledge of small expert models.

At every step the large model's logits are shifted by the experts' differences from their small
base, with weights solved per token (dynamic logit fusion). See `FusionEngine`.

The package imports lazily: `import fusion_llm` (and the CLI's argument parsing and config
validation) loads neither torch nor transformers; the engine's names load them on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .core.errors import (
    AdapterMismatchError,
    ConfigError,
    ContextWindowError,
    DataError,
    DecoderFaultError,
    DeviceError,
    FusionError,
    ModelLoadError,
    ModelNotFoundError,
    NumericalFaultError,
    RequestError,
    UnknownExpertError,
    VocabularyMismatchError,
)

if TYPE_CHECKING:
    from .core.config import ExpertSpec, FusionConfig, FusionSpec, GenerationSpec, ModelSpec
    from .engine import FusionEngine, FusionPrompt, Generation, StreamChunk, TokenLogprob

__version__ = "0.1.0"

# name -> submodule that defines it, imported on first access (PEP 562)
_LAZY = {
    **dict.fromkeys(
        ("ExpertSpec", "FusionConfig", "FusionSpec", "GenerationSpec", "ModelSpec"), "core.config"
    ),
    **dict.fromkeys(
        ("FusionEngine", "FusionPrompt", "Generation", "StreamChunk", "TokenLogprob"), "engine"
    ),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        msg = f"module 'fusion_llm' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


__all__ = [
    "AdapterMismatchError",
    "ConfigError",
    "ContextWindowError",
    "DataError",
    "DecoderFaultError",
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
    "TokenLogprob",
    "UnknownExpertError",
    "VocabularyMismatchError",
]
