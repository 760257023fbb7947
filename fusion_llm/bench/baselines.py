"""What fusion-llm is measured against: the large model's own `generate`, and the proxy-tuning-style
loop of the reference implementations (each model called in turn with its own cache, fused in Python).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..runtime.cache import cache_argument


@torch.no_grad()
def hf_generate(
    model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, pad: int
) -> torch.Tensor:
    """The large model alone through transformers' `generate` (greedy, exactly `new_tokens`)."""
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )


@torch.no_grad()
def proxy_tuning_generate(
    large, small, experts: list, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int
) -> torch.Tensor:
    """Greedy decoding with  z_large + sum_t (z_t - z_small)  (alpha = 1), one model at a time."""
    everyone = [large, small, *experts]
    caches = [DynamicCache(config=m.config) for m in everyone]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    step_ids, out = ids, []
    for _ in range(new_tokens):
        logits = [
            m(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=positions,
                **cache_argument(c),
                use_cache=True,
                logits_to_keep=1,
            )
            .logits[:, -1]
            .float()
            for m, c in zip(everyone, caches, strict=True)
        ]
        fused = logits[0] + sum(z - logits[1] for z in logits[2:])
        token = fused.argmax(-1)
        out.append(token)
        step_ids = token[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        positions = positions[:, -1:] + 1
    return torch.stack(out, dim=1)
