"""The sampler stage on fake logits: greedy is the argmax, top-k / top-p never leave their sets,
and a seeded row draws the same tokens alone or in any batch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_llm.core.config import GenerationSpec
from fusion_llm.runtime.sampler import (
    GREEDY_TEMPERATURE,
    SamplingBatch,
    row_seeds,
    sample,
    token_logprobs,
    top_k_top_p,
)

VOCAB = 50


def fake_logits(rows: int, seed: int = 0) -> torch.Tensor:
    """Distinct logits [rows, VOCAB] (no ties at any threshold)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=generator) * 3


def batch_of(specs: list[GenerationSpec], seed: int = 1) -> SamplingBatch:
    seeds = [row_seeds(s.model_copy(update={"seed": seed + b}), 1)[0] for b, s in enumerate(specs)]
    return SamplingBatch.of(specs, seeds)


def allowed_top_k(logits: torch.Tensor, k: int) -> set[int]:
    return set(logits.topk(k).indices.tolist())


def allowed_top_p(logits: torch.Tensor, p: float, slack: float = 1e-4) -> set[int]:
    """The most likely tokens up to mass p (float64, a little generous at the boundary)."""
    probs = logits.double().softmax(-1)
    order = probs.argsort(descending=True)
    mass = probs[order].cumsum(-1)
    size = int((mass < p + slack).sum()) + 1
    return set(order[:size].tolist())


def test_greedy_rows_take_the_argmax_and_nothing_else_runs():
    logits = fake_logits(6)
    batch = batch_of([GenerationSpec(temperature=t) for t in (0.0, GREEDY_TEMPERATURE / 2)] * 3)
    assert batch.sampled == []
    assert torch.equal(sample(logits, batch), logits.argmax(-1))
    assert batch.generators == [None] * 6


def test_greedy_rows_of_a_mixed_batch_still_take_the_argmax():
    logits = fake_logits(4)
    specs = [GenerationSpec(), GenerationSpec(temperature=1.0), GenerationSpec(), GenerationSpec()]
    tokens = sample(logits, batch_of(specs))
    assert tokens[[0, 2, 3]].tolist() == logits.argmax(-1)[[0, 2, 3]].tolist()


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, VOCAB), temperature=st.floats(0.05, 5.0), seed=st.integers(0, 2**32))
def test_top_k_never_draws_outside_the_k_largest_logits(k, temperature, seed):
    logits = fake_logits(3, seed)
    batch = batch_of([GenerationSpec(temperature=temperature, top_k=k)] * 3, seed)
    for _ in range(5):
        tokens = sample(logits, batch).tolist()
        assert all(t in allowed_top_k(logits[b], k) for b, t in enumerate(tokens))


@settings(max_examples=60, deadline=None)
@given(p=st.floats(0.01, 1.0), seed=st.integers(0, 2**32))
def test_top_p_never_draws_outside_the_smallest_set_with_mass_p(p, seed):
    logits = fake_logits(3, seed)
    batch = batch_of([GenerationSpec(temperature=1.0, top_p=p)] * 3, seed)
    for _ in range(5):
        tokens = sample(logits, batch).tolist()
        assert all(t in allowed_top_p(logits[b], p) for b, t in enumerate(tokens))


def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p_and_never_nothing():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    for p, kept in [(0.45, [True, False, False]), (0.75, [True, True, False]), (0.9, [True] * 3)]:
        out = top_k_top_p(logits, torch.tensor([0]), torch.tensor([p]))
        assert torch.isfinite(out).tolist() == [kept]
    assert torch.isfinite(top_k_top_p(logits, torch.tensor([0]), torch.tensor([1e-6]))).sum() == 1


def test_top_k_and_top_p_apply_per_row():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log().repeat(3, 1)
    out = top_k_top_p(logits, torch.tensor([1, 0, 2]), torch.tensor([1.0, 0.75, 0.9]))
    assert torch.isfinite(out).tolist() == [
        [True, False, False],  # top-1
        [True, True, False],  # top-p 0.75
        [True, True, False],  # top-2, then top-p 0.9 of what is left
    ]
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])


def test_a_seeded_row_draws_the_same_tokens_alone_and_in_any_batch():
    row = GenerationSpec(temperature=0.9, top_k=20, top_p=0.9)
    others = [GenerationSpec(), GenerationSpec(temperature=1.3), GenerationSpec(temperature=0.7)]
    steps = [fake_logits(1, seed) for seed in range(8)]
    alone = SamplingBatch.of([row], [42])
    together = SamplingBatch.of([others[0], row, *others[1:]], [None, 42, 7, 8])
    alone_tokens, together_tokens, position = [], [], 1
    for step, logits in enumerate(steps):
        alone_tokens.append(int(sample(logits, alone)[0]))
        neighbours = fake_logits(4, 100 + step)
        neighbours[position] = logits[0]
        together_tokens.append(int(sample(neighbours, together)[position]))
        if step == 3:  # rows leave and join around it: its generator goes with it
            together.filter([1, 3])  # [row, 8]
            together.extend(SamplingBatch.of([others[1]], [9]))  # [row, 8, 9]
            together.filter([2, 0, 1])  # [9, row, 8]
            together.extend(SamplingBatch.of([row], [5]))  # [9, row, 8, 5]
            together.filter([1, 0, 2, 3])  # [row, 9, 8, 5]
            position = 0
    assert together_tokens == alone_tokens
    assert len(set(alone_tokens)) > 1  # it did sample


def test_every_sampled_row_needs_a_seed():
    with pytest.raises(ValueError, match="seed"):
        SamplingBatch.of([GenerationSpec(temperature=1.0)], [None])
    assert row_seeds(GenerationSpec(temperature=1.0, seed=3), 3) == [3, 4, 5]
    assert row_seeds(GenerationSpec(), 2) == [None, None]
    drawn = row_seeds(GenerationSpec(temperature=1.0), 2)
    assert drawn[1] == drawn[0] + 1


def test_logprobs_are_the_log_softmax_before_temperature_of_the_rows_that_ask():
    logits = fake_logits(4)
    specs = [
        GenerationSpec(logprobs=2),
        GenerationSpec(),
        GenerationSpec(temperature=3.0, top_k=2, logprobs=0),
        GenerationSpec(logprobs=5),
    ]
    batch = batch_of(specs)
    tokens = sample(logits, batch)
    step = token_logprobs(logits, tokens, batch)
    reference = logits.float().log_softmax(-1)
    assert step.rows == [0, 2, 3]
    assert torch.equal(step.chosen, reference[[0, 2, 3], tokens[[0, 2, 3]]])
    assert torch.equal(step.top_ids, reference[[0, 2, 3]].topk(5).indices)  # k: the largest asked
    assert step.top_ids[[0, 2], 0].tolist() == tokens[[0, 3]].tolist()  # greedy: the top-1
    batch.filter([1, 3])
    batch.extend(batch_of([GenerationSpec(logprobs=1)]))
    assert batch.reporting == [1, 2]
    assert token_logprobs(logits[:1], tokens[:1], batch_of([GenerationSpec()])) is None
