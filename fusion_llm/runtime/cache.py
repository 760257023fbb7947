"""BatchCache: one model's KV cache over a batch of slots, and every operation on it.

Every KV operation of the decode path happens here, and only this module knows transformers' cache
layout (`DynamicCache`: per layer, `keys` and `values` [N, H, W, D]).

Layout: the N slots share W columns; slot b's tokens fill its last `W - left_padding[b]` columns,
so every slot's newest token is in the last column. Everything else derives from that state:
    attention_mask[b, c] = 1 if c >= left_padding[b] else 0        [N, W]
    position id of slot b's next token = W - left_padding[b]        (the tokens it has read)
The operations, each keeping that layout:
    prefill  left pad the prompts (`core.padding.padded`) and read them;
    step     every slot reads one token: W grows by one;
    filter   keep the slots at the given positions, in that order, then trim;
    trim     drop the left columns that every slot pads: W -= min(left_padding);
    extend   append another cache's slots; the narrower cache is left padded to the wider
             (zero keys and values, masked out).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
import transformers
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..core.errors import ModelLoadError
from ..core.padding import padded
from .models import LoadedModel
from .rows import RowId, Slot

Tensor = torch.Tensor


def cache_argument(cache) -> dict:
    """The keyword that hands a KV cache to a model's forward: transformers 5.24 renamed
    `past_key_values` to `cache` (the old name warns); earlier 5.x ignore `cache` silently, which
    would decode every step without its context."""
    return {_CACHE_KEYWORD: cache}


_CACHE_KEYWORD = (
    "cache"
    if tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= (5, 24)
    else "past_key_values"
)


class BatchCache:
    """One model's KV cache over slots that join and leave at step boundaries; see the module
    docstring. `adapters`: peft's adapter name of each slot, for a mixed-LoRA batch."""

    def __init__(self, model: LoadedModel, adapters: Sequence[str] | None = None):
        self.model = model
        self.cache = DynamicCache(config=model.model.config)
        _require_sliceable(self.cache, model.name)
        # Per slot, aligned by position:
        self.slots: list[Slot] = []
        self.adapters = None if adapters is None else list(adapters)
        self.left_padding: list[int] = []  # host copy: trimming reads no device
        self.last_logits: Tensor | None = None  # [N, V] logits after each slot's newest token
        self.width = 0  # W
        self._left_padding = torch.zeros(0, dtype=torch.long)  # [N] on the input device

    def __len__(self) -> int:
        return len(self.slots)

    def positions_of(self, rows: Collection[RowId]) -> list[int]:
        """Positions of the slots that belong to `rows`, in batch order."""
        return [i for i, slot in enumerate(self.slots) if slot.row in rows]

    def prefill(self, prompts: Sequence[Sequence[int]], slots: Sequence[Slot]) -> Tensor:
        """Read the prompts (one per slot) into this empty cache; the last logits [N, V]."""
        tokens, _ = padded(prompts, self.model.tokenizer.pad_token_id)
        self.slots = list(slots)
        self.width = tokens.shape[1]
        self._set_left_padding([self.width - len(p) for p in prompts])
        mask = self._attention_mask()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [N, W]
        return self._forward(tokens.to(self.model.input_device), mask, positions)

    def step(self, tokens: Tensor) -> Tensor:
        """Every slot reads its token (`tokens` [N]); the next logits [N, V]."""
        positions = (self.width - self._left_padding)[:, None]  # [N, 1]
        self.width += 1
        tokens = tokens.to(self.model.input_device)[:, None]
        return self._forward(tokens, self._attention_mask(), positions)

    def filter(self, positions: Sequence[int]) -> None:
        """Keep only the slots at `positions` (in that order), then trim the shared padding."""
        if list(positions) == list(range(len(self.slots))):
            return  # every slot stays where it is: no copy
        self.slots = [self.slots[i] for i in positions]
        if self.adapters is not None:
            self.adapters = [self.adapters[i] for i in positions]
        index = torch.tensor(positions, dtype=torch.long, device=self._left_padding.device)
        self.cache.batch_select_indices(index)
        self.last_logits = self.last_logits[index.to(self.last_logits.device)]
        self._set_left_padding([self.left_padding[i] for i in positions])
        self.trim()

    def trim(self) -> None:
        """Drop the left columns that no slot attends to."""
        unused = min(self.left_padding, default=0)
        if unused == 0:
            return
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[..., unused:, :], layer.values[..., unused:, :]
        self.width -= unused
        self._set_left_padding([p - unused for p in self.left_padding])

    def extend(self, other: BatchCache) -> None:
        """Append `other`'s slots (a cache of the same model; both hold slots)."""
        width = max(self.width, other.width)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat(
                [_left_pad(mine.values, width), _left_pad(theirs.values, width)]
            )
        self._set_left_padding(
            [p + width - self.width for p in self.left_padding]
            + [p + width - other.width for p in other.left_padding]
        )
        self.width = width
        self.slots += other.slots
        if self.adapters is not None:
            self.adapters += other.adapters
        self.last_logits = torch.cat([self.last_logits, other.last_logits])

    def _set_left_padding(self, left_padding: list[int]) -> None:
        self.left_padding = left_padding
        self._left_padding = torch.tensor(
            left_padding, dtype=torch.long, device=self.model.input_device
        )

    def _attention_mask(self) -> Tensor:
        columns = torch.arange(self.width, device=self._left_padding.device)
        return (columns >= self._left_padding[:, None]).long()  # [N, W]

    def _forward(self, tokens: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        adapters = {} if self.adapters is None else {"adapter_names": self.adapters}
        out = self.model.model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            **cache_argument(self.cache),
            use_cache=True,
            logits_to_keep=1,
            **adapters,
        )
        self.last_logits = out.logits[:, -1, :]
        return self.last_logits


def _left_pad(tensor: Tensor, width: int) -> Tensor:
    """`tensor` [N, H, W', D] with zero columns prepended up to `width`."""
    missing = width - tensor.shape[-2]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[-2] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=-2)


def _require_sliceable(cache: DynamicCache, name: str) -> None:
    """Rows join, leave and are re-padded by slicing each layer's keys and values: a cache layer
    that keeps other state (recurrent, quantized, static) cannot be batched that way."""
    kinds = {type(layer).__name__ for layer in cache.layers if not isinstance(layer, DynamicLayer)}
    if kinds:
        msg = (
            f"the {name} keeps KV cache layers of kind {', '.join(sorted(kinds))}, which the "
            "in-process decoder cannot batch (it needs transformers' DynamicLayer: keys and "
            "values per layer); run this model with backend: vllm, or choose an attention-only one"
        )
        raise ModelLoadError(msg)
