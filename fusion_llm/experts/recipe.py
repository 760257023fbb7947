"""The fine-tuning recipe shared by `train_expert` and the zoo build: data order, batches, optimiser,
schedule.

One definition, so an expert rebuilt with `train_expert` from its task's data and seed follows the
same steps as the shipped one did: each epoch a `random.Random(seed)` shuffle of the rows cut into
consecutive batches (the last one of an epoch may be short); AdamW with betas (0.9, 0.98) and one
weight decay on every trained tensor; a linear warmup over a share of the steps, then cosine decay
to 10 % of the peak learning rate. Batches are right-padded; prompt tokens and padding carry no loss.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence

import torch

IGNORE = -100  # label of tokens that carry no loss
BETAS = (0.9, 0.98)
FINAL_LR_SHARE = 0.1  # the cosine ends at this share of the peak learning rate


def epoch_batches(rows: int, batch_size: int, epochs: float, seed: int) -> list[list[int]]:
    """Row indices of every training step, in order.

    Whole epochs are seeded shuffles cut into batches; a fractional `epochs` keeps the first
    round(epochs * batches per epoch) batches (at least one).
    """
    rng = random.Random(seed)
    per_epoch = math.ceil(rows / batch_size)
    batches: list[list[int]] = []
    for _ in range(math.ceil(epochs)):
        order = list(range(rows))
        rng.shuffle(order)
        batches += [order[i : i + batch_size] for i in range(0, rows, batch_size)]
    return batches[: max(1, round(epochs * per_epoch))]


class Collator:
    """Rows of token ids and labels as right-padded [B, S] tensors; padding is not attended."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # [B, S]
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # [B, S]
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, S]
        for row, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[row, :n] = torch.tensor(r["input_ids"])
            labels[row, :n] = torch.tensor(r["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def warmup_steps(total: int, share: float) -> int:
    """Steps of linear warmup: `share` of `total`, rounded down, at least one unless share is 0."""
    return max(1, int(total * share + 1e-9)) if share > 0 else 0


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier after `step` optimiser steps.

    step < warmup:  (step + 1) / warmup
    otherwise:      0.1 + 0.9 * (1 + cos(pi * (step - warmup) / (total - warmup))) / 2
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return FINAL_LR_SHARE + (1 - FINAL_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * progress))


def optimiser(
    params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, total: int, warmup: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `params` and its warmup + cosine schedule over `total` steps."""
    adamw = torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay, betas=BETAS)
    schedule = torch.optim.lr_scheduler.LambdaLR(adamw, lambda s: lr_factor(s, total, warmup))
    return adamw, schedule
