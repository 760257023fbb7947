"""BatchCache alone: its KV surgery on a scripted LM's cache (token ids as keys, random values),
compared with tensors built by hand, then one check against a tiny real Llama."""

from __future__ import annotations

import pytest
import torch
from scripted_lm import PAD, VOCAB, ScriptedLM, continuation, loaded, tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from fusion_llm.core.errors import ModelLoadError
from fusion_llm.runtime.cache import BatchCache
from fusion_llm.runtime.rows import RowId, Slot


def slots(n: int, first: int = 0) -> list[Slot]:
    return [Slot(RowId(first + i)) for i in range(n)]


def keys(cache: BatchCache) -> list[list[int]]:
    """The token ids the scripted LM stored, per slot and column."""
    return cache.cache.layers[0].keys[:, 0, :, 0].long().tolist()


def values(cache: BatchCache) -> torch.Tensor:
    return cache.cache.layers[0].values


def next_tokens(cache: BatchCache) -> list[int]:
    return cache.last_logits.argmax(-1).tolist()


def prefilled(lm: ScriptedLM, prompts: list[list[int]], first: int = 0) -> BatchCache:
    cache = BatchCache(loaded(lm))
    cache.prefill(prompts, slots(len(prompts), first))
    return cache


def test_prefill_left_pads_every_row_and_reads_it_at_its_own_positions():
    lm = ScriptedLM()
    cache = prefilled(lm, [[3, 4, 5], [6]])
    assert keys(cache) == [[3, 4, 5], [PAD, PAD, 6]]
    assert torch.equal(values(cache), lm.values[0])
    assert (cache.width, cache.left_padding) == (3, [0, 2])
    assert next_tokens(cache) == [continuation([3, 4, 5], 1)[0], continuation([6], 1)[0]]


def test_a_step_appends_one_column_and_keeps_every_row_on_its_script():
    lm = ScriptedLM()
    cache = prefilled(lm, [[3, 4, 5], [6]])
    first = next_tokens(cache)
    cache.step(torch.tensor(first))
    assert keys(cache) == [[3, 4, 5, first[0]], [PAD, PAD, 6, first[1]]]
    assert torch.equal(values(cache), torch.cat(lm.values, dim=-2))
    assert (cache.width, cache.left_padding) == (4, [0, 2])
    assert next_tokens(cache) == [continuation([3, 4, 5], 2)[1], continuation([6], 2)[1]]


def test_filter_keeps_the_given_positions_in_order_and_trims_the_shared_padding():
    lm = ScriptedLM()
    cache = prefilled(lm, [[3, 4, 5], [6], [7, 8]])
    logits = cache.last_logits.clone()
    cache.filter([2, 1])
    assert keys(cache) == [[7, 8], [PAD, 6]]  # the column every row padded is gone
    assert torch.equal(values(cache), lm.values[0][[2, 1]][..., 1:, :])
    assert (cache.width, cache.left_padding) == (2, [0, 1])
    assert cache.slots == [Slot(RowId(2)), Slot(RowId(1))]
    assert torch.equal(cache.last_logits, logits[[2, 1]])
    cache.step(torch.tensor(next_tokens(cache)))
    assert next_tokens(cache) == [continuation([7, 8], 2)[1], continuation([6], 2)[1]]


def test_filter_of_every_position_in_order_copies_nothing():
    cache = prefilled(ScriptedLM(), [[3, 4], [5]])
    before = cache.cache.layers[0].keys
    cache.filter([0, 1])
    assert cache.cache.layers[0].keys is before


@pytest.mark.parametrize("narrow_first", [True, False])
def test_extend_left_pads_the_narrower_cache_with_masked_zeros(narrow_first):
    lm = ScriptedLM()
    narrow, wide = [[3, 4]], [[5, 6, 7], [8]]
    first, second = (narrow, wide) if narrow_first else (wide, narrow)
    cache = prefilled(lm, first)
    cache.extend(prefilled(lm, second, first=len(first)))
    padded = {3: [0, 3, 4], 5: [5, 6, 7], 8: [0, 0, 8]}  # by first token of the prompt
    expected_values = {
        3: torch.cat([torch.zeros(1, 1, 1, 1), lm.values[0 if narrow_first else 1]], dim=-2),
        5: lm.values[1 if narrow_first else 0],
    }
    order = [p[0] for p in first + second]
    assert keys(cache) == [padded[t] for t in order]
    assert torch.equal(
        values(cache), torch.cat([expected_values[t] for t in order if t in expected_values])
    )
    assert cache.width == 3
    assert cache.left_padding == [{3: 1, 5: 0, 8: 2}[t] for t in order]
    assert cache.slots == slots(3)
    prompts = first + second
    assert next_tokens(cache) == [continuation(p, 1)[0] for p in prompts]
    cache.step(torch.tensor(next_tokens(cache)))
    assert next_tokens(cache) == [continuation(p, 2)[1] for p in prompts]


def test_a_model_whose_cache_cannot_be_sliced_is_refused_at_construction():
    lm = ScriptedLM()
    lm.config.layer_types = ["linear_attention"]
    with pytest.raises(ModelLoadError, match="LinearAttentionLayer.*DynamicLayer"):
        BatchCache(loaded(lm))


def test_rows_that_join_and_leave_a_batch_get_the_logits_they_get_alone_on_a_tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=PAD,
    )  # fmt: skip
    model = loaded(LlamaForCausalLM(config).eval(), tokens=tokenizer())
    prompts = [[1, 2, 3, 4, 5], [2, 3], [7, 8, 9]]
    sequences = [list(p) for p in prompts]

    def alone(sequence: list[int]) -> torch.Tensor:
        cache = BatchCache(model)
        return cache.prefill([sequence], slots(1))[0]

    with torch.no_grad():
        batch = BatchCache(model)
        batch.prefill(prompts, slots(3))
        tokens = batch.last_logits.argmax(-1)
        batch.step(tokens)
        for sequence, token in zip(sequences, tokens.tolist(), strict=True):
            sequence.append(token)
        batch.filter([0, 2])  # the second row leaves
        del sequences[1]
        joining = [1, 4, 6, 8, 10, 12, 14, 16]  # wider than the running rows
        other = BatchCache(model)
        other.prefill([joining], slots(1, first=3))
        batch.extend(other)
        sequences.append(joining)
        tokens = batch.last_logits.argmax(-1)
        batch.step(tokens)
        for sequence, token in zip(sequences, tokens.tolist(), strict=True):
            sequence.append(token)
        for b, sequence in enumerate(sequences):
            torch.testing.assert_close(batch.last_logits[b], alone(sequence), rtol=0, atol=1e-5)
