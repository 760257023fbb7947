"""-inf in the large model's row is a constraint, not a fault: fusion happens on the allowed tokens."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_llm.core import fusion as F

MODES = ["static", "paper", "dynamic"]


def fake_logits(batch, experts, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    large = torch.randn(batch, vocab, generator=gen) * 2.0
    small = torch.randn(batch, vocab, generator=gen) * 2.0
    return large, small, small[:, None, :] + torch.randn(batch, experts, vocab, generator=gen)


def random_mask(batch, vocab, seed):
    """[B, V] allowed tokens, at least one per row."""
    gen = torch.Generator().manual_seed(seed + 1000)
    allowed = torch.rand(batch, vocab, generator=gen) < 0.4
    allowed[:, 0] |= ~allowed.any(-1)
    return allowed


cases = st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(5, 60), st.integers(0, 10_000))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(cases, st.sampled_from(MODES))
def test_with_every_token_allowed_the_step_is_the_unconstrained_fusion_bit_for_bit(case, mode):
    batch, experts, vocab, seed = case
    large, small, expert_logits = fake_logits(batch, experts, vocab, seed)
    active = torch.ones(batch, experts, dtype=torch.bool)
    solver = F.make_solver(mode, torch.ones(experts))
    step = F.fusion_step(large, small, expert_logits, active, solver)
    # the pipeline written out without any masking
    large_logp = F.log_probs(large)
    shifts = F.expert_shifts(F.log_probs(small), F.log_probs(expert_logits))
    alpha = solver(large_logp, shifts, active)
    assert torch.equal(step.alpha, alpha)
    assert torch.equal(step.logits, F.fuse(large_logp, shifts.deltas, alpha))
    assert not step.fallback.any() and not step.fault.any()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(cases, st.sampled_from(MODES))
def test_a_masked_row_is_the_fusion_of_the_renormalised_restricted_distributions(case, mode):
    batch, experts, vocab, seed = case
    large, small, expert_logits = fake_logits(batch, experts, vocab, seed)
    allowed = random_mask(batch, vocab, seed)
    active = torch.ones(batch, experts, dtype=torch.bool)
    solver = F.make_solver(mode, torch.ones(experts))
    step = F.fusion_step(
        large.masked_fill(~allowed, -torch.inf), small, expert_logits, active, solver
    )
    assert not step.fallback.any() and not step.fault.any()
    assert torch.all(step.logits[~allowed] == -torch.inf)
    for row in range(batch):
        ids = allowed[row].nonzero()[:, 0]
        alone = F.fusion_step(
            large[row : row + 1, ids],
            small[row : row + 1, ids],
            expert_logits[row : row + 1][..., ids],
            active[row : row + 1],
            solver,
        )
        torch.testing.assert_close(step.alpha[row], alone.alpha[0], atol=2e-3, rtol=0)
        torch.testing.assert_close(
            torch.log_softmax(step.logits[row, ids], -1),
            torch.log_softmax(alone.logits[0], -1),
            atol=2e-3,
            rtol=0,
        )


@pytest.mark.parametrize("mode", ["none", *MODES])
def test_a_constrained_large_row_keeps_its_masked_tokens_impossible(mode):
    large, small, expert_logits = fake_logits(2, 2, 30, seed=3)
    large[0, 5:] = -torch.inf  # row 0 may only pick ids 0..4
    step = F.fusion_step(
        large,
        small,
        expert_logits,
        torch.ones(2, 2, dtype=torch.bool),
        F.make_solver(mode, torch.ones(2)),
    )
    assert step.fallback.tolist() == [False, False] and step.fault.tolist() == [False, False]
    assert torch.softmax(step.logits[0], -1)[5:].sum() == 0
    assert int(step.logits[0].argmax()) < 5


def test_a_row_with_no_allowed_token_is_a_fault_and_nan_still_falls_back():
    large, small, expert_logits = fake_logits(3, 1, 20, seed=4)
    large[0] = -torch.inf
    large[1, 3] = float("nan")
    large[2, 7:] = -torch.inf
    step = F.fusion_step(
        large,
        small,
        expert_logits,
        torch.ones(3, 1, dtype=torch.bool),
        F.make_solver("dynamic", torch.ones(1)),
    )
    assert step.fault.tolist() == [True, False, False]
    assert step.fallback.tolist()[1:] == [True, False]


def test_a_small_model_non_finite_only_off_the_allowed_tokens_does_not_fall_back():
    large, small, expert_logits = fake_logits(1, 1, 20, seed=5)
    large[0, 10:] = -torch.inf
    small[0, 15] = float("nan")  # off the allowed tokens: never read
    expert_logits[0, 0, 12] = torch.inf
    step = F.fusion_step(
        large,
        small,
        expert_logits,
        torch.ones(1, 1, dtype=torch.bool),
        F.make_solver("paper", torch.ones(1)),
    )
    assert step.fallback.tolist() == [False]
    small[0, 2] = float("nan")  # on an allowed token: the row falls back
    step = F.fusion_step(
        large,
        small,
        expert_logits,
        torch.ones(1, 1, dtype=torch.bool),
        F.make_solver("paper", torch.ones(1)),
    )
    assert step.fallback.tolist() == [True]
