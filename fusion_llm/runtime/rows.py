"""What a row is, in one vocabulary for the whole decode path.

The words, as every module of the runtime uses them:
    row        one prompt being decoded; named by a `RowId`, unique within its decoder
    position   the index of a row (or slot) inside a batch or a cache, as tensors are indexed:
               positions change whenever rows leave or join, ids never do
    index      the index of a row within its own request (`RowEvent.row`, `StreamChunk.row`)
    slot       one forward row of one model: a row read by the model's own weights, or (on the
               small base that carries the LoRA experts) by one LoRA adapter
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, NewType

RowId = NewType("RowId", int)


class Slot(NamedTuple):
    """A row as one model's forward reads it."""

    row: RowId
    adapter: str | None = None  # the LoRA expert this slot runs; None: the model's own weights


@dataclass
class RowPrompt:
    """One row as the models read it: its id, token ids per model, and its experts."""

    row: RowId
    large: list[int]
    small: list[int]  # empty for a row that fuses no expert
    experts: list[str]
    expert_prompts: dict[str, list[int]] = field(default_factory=dict)  # own renderings

    def prompt(self, expert: str | None) -> list[int]:
        """What `expert` reads (None: the small base): its own rendering, else the small one."""
        return self.small if expert is None else self.expert_prompts.get(expert, self.small)
