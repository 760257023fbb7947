"""SmallPool: the small base and the experts over the running rows, each forward only where used.

Slots of ONE peft forward (`shared`): `Slot(row)` runs the small base for every fused row,
`Slot(row, e)` runs LoRA expert e for the rows that fuse e (peft's `adapter_names` per slot). A full
expert runs its own model over the rows that use it (`full[e]`). Rows are named by their `RowId`:
each cache keeps its own positions. The pool is fed one step at a time, whatever produced the large
model's logits (the vLLM backend's processor reuses it).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from .cache import BatchCache
from .models import BASE_ADAPTER, ModelSet
from .rows import RowId, RowPrompt, Slot

Tensor = torch.Tensor


class SmallPool:
    """See the module docstring."""

    def __init__(self, models: ModelSet):
        self.models = models
        self.shared: BatchCache | None = None
        self.full: dict[str, BatchCache] = {}

    def prefill(self, rows: Sequence[RowPrompt]) -> None:
        """Read the prompts of `rows` into this (empty) pool; rows without experts skip it."""
        fused = [r for r in rows if r.experts]
        if not fused:
            return
        lora = self.models.lora_experts
        slots = [Slot(r.row) for r in fused]
        slots += [Slot(r.row, e) for r in fused for e in r.experts if e in lora]
        by_row = {r.row: r for r in fused}
        adapters = [BASE_ADAPTER if s.adapter is None else lora[s.adapter] for s in slots]
        self.shared = BatchCache(self.models.small, adapters if lora else None)
        self.shared.prefill([by_row[s.row].prompt(s.adapter) for s in slots], slots)
        for name in dict.fromkeys(e for r in fused for e in r.experts if e not in lora):
            users = [r for r in fused if name in r.experts]
            self.full[name] = BatchCache(self.models.full_experts[name])
            self.full[name].prefill([r.prompt(name) for r in users], [Slot(r.row) for r in users])

    def extend(self, other: SmallPool) -> None:
        """Take over `other`'s rows (a pool prefilled for joining rows)."""
        if other.shared is not None:
            self.shared = _extended(self.shared, other.shared)
        for name, cache in other.full.items():
            self.full[name] = _extended(self.full.get(name), cache)

    def step(self, rows: Sequence[RowId], tokens: Tensor) -> None:
        """Every slot reads its row's token (`tokens` [B], the token of `rows[b]`)."""
        position = {row: b for b, row in enumerate(rows)}
        for cache in self._caches():
            index = torch.tensor([position[s.row] for s in cache.slots], device=tokens.device)
            cache.step(tokens[index])

    def keep_rows(self, rows: Collection[RowId]) -> None:
        """Drop the slots of every row not in `rows`; a cache left without slots goes."""
        for cache in self._caches():
            cache.filter(cache.positions_of(rows))
        self.full = {name: cache for name, cache in self.full.items() if len(cache)}
        if self.shared is not None and not len(self.shared):
            self.shared = None

    def logits(self, rows: Sequence[RowId], columns: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(small base [B, V], experts [B, T, V]) of fused `rows` over the common vocabulary; an
        expert a row does not use reads as the small base (a zero shift)."""
        vocab = self.models.vocab_size
        shared = self.shared.last_logits[:, :vocab]
        where = {slot: i for i, slot in enumerate(self.shared.slots)}
        small = shared[[where[Slot(row)] for row in rows]]  # [B, V]
        experts = small[:, None, :].repeat(1, len(columns), 1)  # [B, T, V]
        for t, name in enumerate(columns):
            if name in self.models.lora_experts:
                source = shared
                position = {row: where[Slot(row, name)] for row in rows if Slot(row, name) in where}
            elif name in self.full:
                source = self.full[name].last_logits[:, :vocab]
                position = {slot.row: i for i, slot in enumerate(self.full[name].slots)}
            else:
                continue
            users = [b for b, row in enumerate(rows) if row in position]
            if users:
                experts[users, t] = source[[position[rows[b]] for b in users]].to(experts)
        return small, experts

    def _caches(self) -> list[BatchCache]:
        return [c for c in (self.shared, *self.full.values()) if c is not None]


def _extended(running: BatchCache | None, joining: BatchCache) -> BatchCache:
    if running is None:
        return joining
    running.extend(joining)
    return running
