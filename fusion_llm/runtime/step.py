"""The fused step over rows: the large model's last logits and the small-model pool's, fused per
row (`core.fusion.fusion_step`) with each row's own experts and mode.

Rows of one fusion mode are fused together; rows without experts run the large model alone. The
large logits may come from anywhere (the batcher's cache, or vLLM): only the pool is read here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..core.config import FusionConfig
from ..core.fusion import AlphaSolver, FusedStep, fusion_step, make_solver
from .pool import SmallPool
from .rows import RowId

Tensor = torch.Tensor


def fuse_rows(
    large: Tensor,
    pool: SmallPool,
    rows: Sequence[RowId],
    experts: Sequence[Sequence[str]],
    modes: Sequence[str],
    columns: Sequence[str],
    solver_for: Callable[[str, list[str]], AlphaSolver | None],
) -> FusedStep:
    """The fused step of `rows` from the large model's last logits [B, V], with `experts[b]` and
    `modes[b]` per row; alpha over `columns`."""
    vocab = pool.models.vocab_size
    large = large[:, :vocab]
    active = torch.tensor(
        [[c in names for c in columns] for names in experts], dtype=torch.bool, device=large.device
    ).reshape(len(rows), len(columns))  # [B, T]
    groups: dict[str, list[int]] = {}
    for b, (names, mode) in enumerate(zip(experts, modes, strict=True)):
        groups.setdefault(mode if names else "none", []).append(b)
    parts = []
    for mode, members in groups.items():
        index = torch.tensor(members, device=large.device)
        if mode == "none":
            step = fusion_step(large[index], None, None, active[index], None)
        else:
            small, expert = pool.logits([rows[b] for b in members], columns)
            device = large.device
            step = fusion_step(
                large[index], small.to(device), expert.to(device), active[index],
                solver_for(mode, list(columns)),
            )  # fmt: skip
        parts.append((index, step))
    return _scatter(parts, len(rows), len(columns), large)


class ConfigSolvers:
    """The alpha solver of each (mode, experts) under one config's weights and bounds, built once."""

    def __init__(self, config: FusionConfig):
        self.config = config
        self._built: dict[tuple[str, tuple[str, ...]], AlphaSolver | None] = {}

    def __call__(self, mode: str, experts: list[str]) -> AlphaSolver | None:
        key = (mode, tuple(experts))
        if key not in self._built:
            weights = {e.name: e.alpha for e in self.config.experts}
            self._built[key] = make_solver(
                mode, torch.tensor([weights[e] for e in experts]), self.config.fusion
            )
        return self._built[key]


def _scatter(parts, batch: int, width: int, like: Tensor) -> FusedStep:
    """One FusedStep over all rows from the steps of row groups."""
    if len(parts) == 1 and parts[0][1].alpha.shape[1] == width:
        return parts[0][1]
    logits = like.new_empty(batch, like.shape[1], dtype=torch.float32)
    alpha = like.new_zeros(batch, width, dtype=torch.float32)
    fallback = torch.zeros(batch, dtype=torch.bool, device=like.device)
    fault = torch.zeros_like(fallback)
    for index, step in parts:
        logits[index] = step.logits
        if step.alpha.shape[1] == width:
            alpha[index] = step.alpha.to(alpha)
        fallback[index], fault[index] = step.fallback, step.fault
    return FusedStep(logits, alpha, fallback, fault)
