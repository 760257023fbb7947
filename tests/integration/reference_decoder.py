"""The tests' independent reference for a fused step: every model re-reads the whole sequence
(no KV cache, no batching, no sampler), fused by the same pure `fusion_step`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fusion_llm.core.fusion import AlphaSolver, FusedStep, fusion_step
from fusion_llm.runtime.models import BASE_ADAPTER


@torch.no_grad()
def fused_step_without_cache(
    engine,
    large_ids: list[int],
    small_ids: list[int],
    experts,
    solver: AlphaSolver,
    tokens,
    large_filter: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> FusedStep:
    """The fused step after `large_ids` / `small_ids` followed by the generated `tokens`;
    `large_filter` (e.g. a grammar's mask) is applied to the large model's logits first."""
    models = engine.models

    def last_logits(model, ids, **kw):
        return model(torch.tensor([ids + list(tokens)]), **kw).logits[:, -1]

    large = last_logits(models.large.model, large_ids)
    if large_filter is not None:
        large = large_filter(large)
    small = last_logits(models.small.model, small_ids, adapter_names=[BASE_ADAPTER])
    expert = torch.stack(
        [
            last_logits(models.full_experts[e].model, small_ids)
            if e in models.full_experts
            else last_logits(models.small.model, small_ids, adapter_names=[models.lora_experts[e]])
            for e in experts
        ],
        dim=1,
    )
    return fusion_step(large, small, expert, torch.ones(1, len(experts), dtype=torch.bool), solver)
