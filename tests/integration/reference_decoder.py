"""The tests' independent reference for a fused step: every model re-reads the whole sequence
(no KV cache, no batching, no sampler), fused by the same pure `fusion_step`."""

from __future__ import annotations

import torch

from fusion_llm.core.fusion import AlphaSolver, FusedStep, fusion_step
from fusion_llm.runtime.models import BASE_ADAPTER


@torch.no_grad()
def fused_step_without_cache(
    engine, large_ids: list[int], small_ids: list[int], experts, solver: AlphaSolver, tokens
) -> FusedStep:
    """The fused step after `large_ids` / `small_ids` followed by the generated `tokens`."""
    models = engine.models

    def last_logits(model, ids, **kw):
        return model(torch.tensor([ids + list(tokens)]), **kw).logits[:, -1]

    large = last_logits(models.large.model, large_ids)
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
