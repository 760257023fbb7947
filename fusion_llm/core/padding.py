"""Token-id rows of different lengths as one padded batch: the one padding helper."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch


def padded(
    rows: Sequence[Sequence[int]], pad: int, side: Literal["left", "right"] = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each [N, L] with L the longest row, on the CPU.

    Left padding (for decoding: every row's last token is in the last column) or right padding
    (for scoring and embedding a whole row). The mask is 1 on real tokens, 0 on padding.
    """
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        columns = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, columns] = torch.tensor(list(row), dtype=torch.long)
        mask[i, columns] = 1
    return ids, mask
