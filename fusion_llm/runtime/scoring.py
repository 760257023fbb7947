"""Teacher-forced scoring: the fused log-likelihood of given continuations, no generation.

For a prompt x and continuation y_1..y_m, every model reads x + y in ONE full-sequence forward
(the small base and LoRA experts as rows of one peft forward); at every continuation position i
the fused distribution P~_i is built from that position's logits exactly as decoding builds it
(`core.fusion.fusion_step` with the same solver), so

    total = sum_i log P~_i(y_i),    greedy = all_i [ y_i = argmax P~_i ],

with the large model alone (`solver` None) giving its plain log P_i(y_i). Dimensions: T the
continuation tokens of all rows concatenated, E experts, V the models' common vocabulary. A token
outside that vocabulary cannot be emitted by fusion: its log-probability is -inf.

Inputs are token ids already fitted to the windows (the engine fits prompts with
`validation.fit_to_window`, reserving each continuation's length); callers hold the run lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from peft import PeftModel

from ..core.fusion import AlphaSolver, fusion_step, log_probs
from ..core.padding import padded
from .models import BASE_ADAPTER, LoadedModel, ModelSet
from .request import PromptBatch

Tensor = torch.Tensor


@dataclass
class Score:
    """The fused teacher-forced log-likelihood of one continuation."""

    total: float  # sum of `token_logprobs` (nats)
    token_logprobs: list[float]  # log P~_i(y_i) per continuation token
    tokens: list[int]  # the continuation's ids y_1..y_m, as the large model's tokenizer reads it
    is_greedy: bool  # every y_i is the fused argmax: greedy decoding would emit this continuation


class TeacherForced(NamedTuple):
    """Every model's logits at the positions that predict the continuation tokens."""

    large: Tensor  # [T, V]
    small: Tensor | None  # [T, V]; None without experts
    experts: Tensor | None  # [T, E, V]; None without experts
    targets: Tensor  # [T] the continuation tokens, rows concatenated


def teacher_forced_logits(
    models: ModelSet,
    prompts: PromptBatch,
    continuations: Sequence[Sequence[int]],
    experts: Sequence[str] = (),
) -> TeacherForced:
    """The logits of the large model, the small base and each of `experts` that predict every
    continuation token; `prompts` holds each model's fitted prompt ids (`prompts.experts[name]`
    for an expert with a rendering of its own, else `prompts.small`)."""
    vocab = models.vocab_size
    z_large = _continuation_logits(models.large, prompts.large, continuations)  # [T, V']
    device = z_large.device
    targets = torch.tensor([t for ids in continuations for t in ids], device=device)  # [T]
    if not experts:
        return TeacherForced(z_large[:, :vocab], None, None, targets)
    small, n = models.small, len(continuations)
    lora = [e for e in experts if e in models.lora_experts]
    lora_rows = [BASE_ADAPTER] * n + [models.lora_experts[e] for e in lora for _ in range(n)]
    lora_ids = [*prompts.small, *(i for e in lora for i in prompts.experts.get(e, prompts.small))]
    if lora or isinstance(small.model, PeftModel):
        rows = lora_rows if lora else [BASE_ADAPTER] * n
        both = _continuation_logits(small, lora_ids, [*continuations] * (len(lora) + 1), rows)
    else:
        both = _continuation_logits(small, prompts.small, continuations)
    # positions are laid out row by row: the small base's block first, then one per LoRA expert
    z_small, *z_lora = both.chunk(len(lora) + 1)
    by_name = dict(zip(lora, z_lora, strict=True))
    for name in experts:
        if name not in by_name:
            ids = prompts.experts.get(name, prompts.small)
            by_name[name] = _continuation_logits(models.full_experts[name], ids, continuations)
    z_experts = torch.stack([by_name[e].to(device)[:, :vocab] for e in experts], dim=1)
    return TeacherForced(z_large[:, :vocab], z_small.to(device)[:, :vocab], z_experts, targets)


def fused_logits(forced: TeacherForced, solver: AlphaSolver | None) -> Tensor:
    """[T, V] the fused step's logits at every position, as decoding's `fusion_step` builds them
    with `solver` (None: the large model alone)."""
    width = 0 if forced.experts is None else forced.experts.shape[1]
    active = torch.ones(len(forced.targets), width, dtype=torch.bool, device=forced.large.device)
    return fusion_step(forced.large, forced.small, forced.experts, active, solver).logits


def target_log_probs(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """([T] log softmax(logits)[y], [T] whether y is the argmax) for logits [T, V] and targets
    y [T]; -inf and False for a y outside the vocabulary V."""
    logp = log_probs(logits)  # [T, V]
    counted = targets < logits.shape[-1]
    safe = torch.where(counted, targets, 0)[:, None]
    token = torch.where(counted, logp.gather(-1, safe)[:, 0], -torch.inf)  # [T]
    greedy = counted & (logp.argmax(-1) == targets)  # [T]
    return token, greedy


def score_rows(
    models: ModelSet,
    prompts: PromptBatch,
    continuations: Sequence[Sequence[int]],
    experts: Sequence[str],
    solver: AlphaSolver | None,
) -> list[Score]:
    """One `Score` per continuation (each non-empty), fused with `experts` under `solver`."""
    forced = teacher_forced_logits(models, prompts, continuations, experts if solver else ())
    token, greedy = target_log_probs(fused_logits(forced, solver), forced.targets)
    lengths = [len(c) for c in continuations]
    return [
        Score(float(logp.sum()), logp.tolist(), list(ids), bool(best.all()))
        for ids, logp, best in zip(
            continuations, token.cpu().split(lengths), greedy.cpu().split(lengths), strict=True
        )
    ]


def _continuation_logits(
    loaded: LoadedModel,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    adapter_names: list[str] | None = None,
) -> Tensor:
    """The float32 logits that predict each continuation token, rows concatenated: [T, V'].

    Left padding puts every continuation at the end of its row, so one `logits_to_keep` window
    holds all of them.
    """
    sequences = [[*p, *c] for p, c in zip(prompts, continuations, strict=True)]
    ids, mask = padded(sequences, loaded.tokenizer.pad_token_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = max(len(c) for c in continuations) + 1
    extra = {"adapter_names": adapter_names} if adapter_names is not None else {}
    device = loaded.input_device
    logits = loaded.model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        logits_to_keep=keep,
        **extra,
    ).logits  # [B, keep, V']: position j predicts the token at width - keep + j + 1
    parts = [logits[row, keep - 1 - len(c) : keep - 1] for row, c in enumerate(continuations)]
    return torch.cat(parts).float()
