"""A scripted causal LM for decode-path tests without a model.

Its KV cache holds the token ids it read (keys; values are random), and its next token is
    (sum of the ids the row attends to + the row's position id + offset) mod VOCAB,
so a wrong attention mask, position id or cache row changes what it says. `continuation` is the
same script in plain Python: what a row decodes greedily when it runs alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import LlamaConfig, PreTrainedTokenizerFast
from transformers.modeling_outputs import CausalLMOutputWithPast

from fusion_llm.runtime.models import LoadedModel

VOCAB = 17
PAD = 0


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ids 0..VOCAB-1 ("t0" is the pad)."""
    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")), pad_token="t0"
    )


def continuation(prompt: Sequence[int], new_tokens: int, offset: int = 0) -> list[int]:
    """The tokens a ScriptedLM with `offset` generates greedily after `prompt`."""
    sequence, out = list(prompt), []
    for _ in range(new_tokens):
        out.append((sum(sequence) + len(sequence) - 1 + offset) % VOCAB)
        sequence.append(out[-1])
    return out


class ScriptedLM:
    """See the module docstring. `adapter_offsets`: extra offset per peft adapter name (rows of a
    mixed-LoRA forward); `fault(attended)` may raise; rows for which `poisoned(attended)` holds
    get NaN logits."""

    def __init__(self, offset: int = 0, adapter_offsets: dict[str, int] | None = None):
        self.config = LlamaConfig(
            num_hidden_layers=1,
            hidden_size=4,
            intermediate_size=4,
            num_attention_heads=1,
            num_key_value_heads=1,
            vocab_size=VOCAB,
        )
        self.offset = offset
        self.adapter_offsets = adapter_offsets or {}
        self.forwards: list[tuple[int, int]] = []  # (rows, tokens per row) of every forward
        self.values: list[torch.Tensor] = []  # the values each forward wrote [N, 1, S, 1]
        self.fault: Callable[[list[list[int]]], None] | None = None
        self.poisoned: Callable[[list[int]], bool] = lambda attended: False

    def __call__(
        self, input_ids, attention_mask, position_ids, use_cache, logits_to_keep, **kwargs
    ):
        adapters = kwargs.pop("adapter_names", None)
        (cache,) = kwargs.values()  # under the keyword this transformers version reads
        rows, width = input_ids.shape
        self.forwards.append((rows, width))
        generator = torch.Generator().manual_seed(len(self.values))
        values = torch.randn(rows, 1, width, 1, generator=generator)
        self.values.append(values)
        keys, _ = cache.update(input_ids.float()[:, None, :, None], values, 0)
        attended = [
            [int(t) for t, m in zip(ids, mask, strict=True) if m]
            for ids, mask in zip(keys[:, 0, :, 0].tolist(), attention_mask.tolist(), strict=True)
        ]
        if self.fault is not None:
            self.fault(attended)
        logits = torch.full((rows, 1, VOCAB), -10.0)
        for b, ids in enumerate(attended):
            shift = self.offset + (self.adapter_offsets.get(adapters[b], 0) if adapters else 0)
            logits[b, 0, (sum(ids) + int(position_ids[b, -1]) + shift) % VOCAB] = 10.0
            if self.poisoned(ids):
                logits[b] = torch.nan
        return CausalLMOutputWithPast(logits=logits)


def loaded(model, name: str = "large", tokens=None) -> LoadedModel:
    """`model` as the runtime holds a loaded model (on the CPU)."""
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokens if tokens is not None else tokenizer(),
        input_device=torch.device("cpu"),
        context_window=None,
        logits_size=VOCAB,
    )
