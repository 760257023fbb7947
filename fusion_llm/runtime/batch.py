"""DecodeBatch: the running rows and all their per-row state, aligned by position.

One object holds, for every running row: who it is and what it has generated (`rows`), how it
samples (`sampling`), the grammar it follows (`grammars`), and its KV caches (the large model's
`large`, the small-model pool). Rows
join only by `extend` and leave only by `filter`, which every part follows at once, so position b
means the same row in each of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..core.config import GenerationSpec
from ..core.fusion import AlphaSolver, FusedStep
from .cache import BatchCache
from .grammar import GrammarRows
from .models import ModelSet
from .pool import SmallPool
from .request import Ticket
from .rows import RowId, Slot
from .sampler import SamplingBatch
from .step import fuse_rows

Tensor = torch.Tensor


@dataclass
class DecodeRow:
    """One running row: its id, the ticket it belongs to, its experts, what it has generated."""

    id: RowId
    ticket: Ticket
    index: int  # the row's index in its ticket's request
    experts: list[str]
    tokens: list[int] = field(default_factory=list)

    @property
    def spec(self) -> GenerationSpec:
        return self.ticket.request.spec


class DecodeBatch:
    """See the module docstring."""

    def __init__(
        self,
        rows: list[DecodeRow],
        sampling: SamplingBatch,
        grammars: GrammarRows,
        large: BatchCache,
        pool: SmallPool,
    ):
        self.rows = rows
        self.sampling = sampling
        self.grammars = grammars
        self.large = large
        self.pool = pool

    @classmethod
    def prefilled(cls, models: ModelSet, rows: list[DecodeRow]) -> DecodeBatch:
        """The joining `rows` read their prompts, in fresh caches ready to `extend` a batch."""
        prompts = [r.ticket.request.row_prompt(r.index, r.id) for r in rows]
        large = BatchCache(models.large)
        large.prefill([p.large for p in prompts], [Slot(p.row) for p in prompts])
        pool = SmallPool(models)
        pool.prefill(prompts)
        sampling = SamplingBatch.of([r.spec for r in rows], [r.ticket.seeds[r.index] for r in rows])
        grammars = GrammarRows.of([r.ticket.request.grammar for r in rows], models.vocab_size)
        return cls(rows, sampling, grammars, large, pool)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def ids(self) -> list[RowId]:
        return [r.id for r in self.rows]

    @property
    def columns(self) -> list[str]:
        """Every expert some row fuses, in order of first use: alpha's columns."""
        return list(dict.fromkeys(e for r in self.rows for e in r.experts))

    def fuse(self, solver_for: Callable[[str, list[str]], AlphaSolver | None]) -> FusedStep:
        """The fused logits of every row from the models' last logits (alpha over `columns`);
        a constrained row's grammar masks its large row before fusion and its fused row after."""
        large = self.large.last_logits
        mask = self.grammars.mask()
        if mask is not None:
            large = mask.apply(large.clone())  # the cache keeps the model's own logits
        fused = fuse_rows(
            large,
            self.pool,
            self.ids,
            [r.experts for r in self.rows],
            [r.ticket.request.mode for r in self.rows],
            self.columns,
            solver_for,
        )
        if mask is not None:
            fused = fused._replace(logits=mask.apply(fused.logits))
        return fused

    def step(self, tokens: Tensor) -> None:
        """Every model reads each row's token (`tokens` [B])."""
        self.large.step(tokens)
        self.pool.step(self.ids, tokens)

    def filter(self, positions: Sequence[int]) -> None:
        """Keep only the rows at `positions`, in that order."""
        rows = [self.rows[i] for i in positions]
        self.sampling.filter(positions)
        self.grammars.filter(positions)
        self.large.filter(positions)
        self.pool.keep_rows({r.id for r in rows})
        self.rows = rows  # last: if a cache raised, `rows` still names every row it held

    def extend(self, other: DecodeBatch) -> None:
        """Append `other`'s rows."""
        self.rows += other.rows
        self.sampling.extend(other.sampling)
        self.grammars.extend(other.grammars)
        self.large.extend(other.large)
        self.pool.extend(other.pool)
