"""From data to a measured expert: train a small expert from JSONL rows (`train_expert`) and give it
a verdict on whether fusing it helps the large model (`gate_experts`).

Exports load lazily, so that `fusion-llm --help` and the router's card reading do not import the
training stack.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "TrainSettings": "trainer",
    "TrainResult": "trainer",
    "train_expert": "trainer",
    "gate_experts": "gate",
    "reference_log_likelihoods": "gate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fusion_llm.experts' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
