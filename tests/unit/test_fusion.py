"""Fusion math on synthetic logits: equations, solver properties, numerical faults."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_llm.core import fusion as F
from fusion_llm.core.config import FusionSpec

PAPER_GRID = F.alpha_grid(0.0, 2.0, 0.1)


def fake_logits(batch, experts, vocab, scale, expert_scale, seed):
    """Large, small and expert logits; experts are the small model plus a random shift."""
    gen = torch.Generator().manual_seed(seed)
    large = torch.randn(batch, vocab, generator=gen) * scale
    small = torch.randn(batch, vocab, generator=gen) * scale
    shift = torch.randn(batch, experts, vocab, generator=gen) * expert_scale
    return large, small, small[:, None, :] + shift


def prepared(large, small, experts):
    return F.log_probs(large), F.expert_shifts(F.log_probs(small), F.log_probs(experts))


def kl(p_logp, q_logp):
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1)


def test_fused_kls_match_the_definition():
    large, small, experts = fake_logits(3, 2, 40, 3.0, 2.0, seed=1)
    large_logp, shifts = prepared(large, small, experts)
    alpha = torch.tensor([[0.3, 1.2], [0.0, 0.0], [2.0, 0.5]])
    fused_logp = torch.log_softmax(F.fuse(large_logp, shifts.deltas, alpha), -1)
    forward, reverse = F.fused_kls(large_logp, shifts.deltas, alpha)
    torch.testing.assert_close(forward, kl(fused_logp, large_logp), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reverse, kl(large_logp, fused_logp), atol=1e-4, rtol=1e-4)


def test_expert_shift_targets_are_the_two_kls():
    _, small, experts = fake_logits(2, 3, 30, 2.0, 1.0, seed=2)
    small_logp, expert_logp = F.log_probs(small), F.log_probs(experts)
    shifts = F.expert_shifts(small_logp, expert_logp)
    torch.testing.assert_close(shifts.forward_kl, kl(expert_logp, small_logp[:, None]))
    torch.testing.assert_close(shifts.reverse_kl, kl(small_logp[:, None], expert_logp))


def test_large_equal_to_small_with_alpha_one_reproduces_the_expert():
    _, small, experts = fake_logits(2, 1, 30, 2.0, 1.5, seed=3)
    large_logp, shifts = prepared(small, small, experts)
    fused = F.fuse(large_logp, shifts.deltas, torch.ones(2, 1))
    torch.testing.assert_close(torch.log_softmax(fused, -1), F.log_probs(experts[:, 0]))


@pytest.mark.parametrize("mode", ["static", "paper", "dynamic"])
def test_identical_experts_change_nothing_under_greedy(mode):
    large, small, _ = fake_logits(4, 2, 50, 3.0, 0.0, seed=4)
    experts = small[:, None, :].repeat(1, 2, 1)
    solver = F.make_solver(mode, torch.ones(2))
    step = F.fusion_step(large, small, experts, torch.ones(4, 2, dtype=torch.bool), solver)
    assert torch.equal(step.logits.argmax(-1), large.argmax(-1))


def brute_force_paper(large, small, experts, active):
    """The paper's loop, written plainly: one row, one candidate at a time, KLs from scratch."""
    alphas = []
    for row in range(large.shape[0]):
        p = torch.log_softmax(large[row].double(), -1)
        q = torch.log_softmax(small[row].double(), -1)
        qs = [torch.log_softmax(experts[row, t].double(), -1) for t in range(experts.shape[1])]
        best, best_alpha = math.inf, [0.0] * len(qs)
        for t in range(len(qs)):
            if not active[row, t]:
                continue
            for a in PAPER_GRID.tolist():
                fused = torch.log_softmax(p + a * (qs[t] - q), -1)
                loss = sum(
                    (kl(fused, p) - kl(qs[u], q)) ** 2 + (kl(p, fused) - kl(q, qs[u])) ** 2
                    for u in range(len(qs))
                    if active[row, u]
                )
                if loss < best - 1e-9:
                    best, best_alpha = float(loss), [0.0] * len(qs)
                    best_alpha[t] = a
        alphas.append(best_alpha)
    return torch.tensor(alphas)


def test_paper_mode_reproduces_an_independent_grid_search():
    large, small, experts = fake_logits(6, 3, 40, 2.5, 1.5, seed=5)
    active = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0], [1, 1, 0], [1, 1, 1], [0, 0, 1]]).bool()
    large_logp, shifts = prepared(large, small, experts)
    ours = F.paper_alpha(large_logp, shifts, active, PAPER_GRID)
    torch.testing.assert_close(
        ours, brute_force_paper(large, small, experts, active), atol=1e-6, rtol=0
    )


logit_cases = st.tuples(
    st.integers(1, 4),  # batch
    st.integers(1, 4),  # experts
    st.sampled_from([8, 64, 300, 5000]),  # vocab (5000: more ids than the solver's 2048 bins)
    st.sampled_from([0.1, 1.0, 3.0, 10.0, 30.0]),  # logit scale (30: near one-hot)
    st.sampled_from([0.0, 0.01, 0.5, 2.0, 8.0, 40.0]),  # how far fine-tuning moved the expert
    st.integers(0, 2**31 - 1),
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(logit_cases)
def test_dynamic_objective_never_exceeds_the_paper_grid(case):
    batch, experts, vocab, scale, expert_scale, seed = case
    large, small, expert_logits = fake_logits(batch, experts, vocab, scale, expert_scale, seed)
    active = torch.rand(batch, experts, generator=torch.Generator().manual_seed(seed)) < 0.7
    active[:, 0] = True
    large_logp, shifts = prepared(large, small, expert_logits)
    paper = F.fusion_objective(
        large_logp, shifts, F.paper_alpha(large_logp, shifts, active, PAPER_GRID), active
    )
    alpha = F.dynamic_alpha(large_logp, shifts, active)
    dynamic = F.fusion_objective(large_logp, shifts, alpha, active)
    assert torch.all(dynamic <= paper * (1 + 1e-5) + 1e-6), (dynamic, paper)
    assert torch.isfinite(alpha).all()
    assert ((alpha >= 0) & (alpha <= 2)).all()
    assert torch.all(alpha[~active] == 0)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    logit_cases,
    st.sampled_from([-1.0, -0.5, 0.0]),  # alpha_min <= 0: the paper's a * e_t lie in the box
    st.sampled_from([1.0, 1.5, 3.0]),
    st.sampled_from([0.1, 0.25, 0.5]),
)
def test_dynamic_never_exceeds_the_paper_grid_of_any_configured_range(case, low, high, step):
    batch, experts, vocab, scale, expert_scale, seed = case
    large, small, expert_logits = fake_logits(batch, experts, vocab, scale, expert_scale, seed)
    active = torch.ones(batch, experts, dtype=torch.bool)
    large_logp, shifts = prepared(large, small, expert_logits)
    grid = F.alpha_grid(low, high, step)
    paper = F.fusion_objective(
        large_logp, shifts, F.paper_alpha(large_logp, shifts, active, grid), active
    )
    alpha = F.dynamic_alpha(large_logp, shifts, active, low, high, step)
    dynamic = F.fusion_objective(large_logp, shifts, alpha, active)
    assert torch.all(dynamic <= paper * (1 + 1e-5) + 1e-6), (dynamic, paper)
    assert ((alpha >= low) & (alpha <= high)).all()


@pytest.mark.parametrize("scale, expert_scale", [(0.1, 0.5), (3.0, 1.0), (30.0, 8.0)])
def test_binning_the_vocabulary_costs_no_objective(scale, expert_scale):
    """2048 bins of a 20 000-id vocabulary reach the objective of the solver on every id."""
    large, small, experts = fake_logits(4, 2, 20_000, scale, expert_scale, seed=12)
    active = torch.ones(4, 2, dtype=torch.bool)
    large_logp, shifts = prepared(large, small, experts)
    binned = F.dynamic_alpha(large_logp, shifts, active, bins=2048)
    every_id = F.dynamic_alpha(large_logp, shifts, active, bins=20_000)
    objective = [F.fusion_objective(large_logp, shifts, a, active) for a in (binned, every_id)]
    torch.testing.assert_close(objective[0], objective[1], rtol=1e-4, atol=1e-7)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(logit_cases, st.floats(-1.0, 0.5), st.floats(0.6, 3.0))
def test_fused_distribution_is_a_distribution_and_alpha_stays_in_bounds(case, low, high):
    batch, experts, vocab, scale, expert_scale, seed = case
    large, small, expert_logits = fake_logits(batch, experts, vocab, scale, expert_scale, seed)
    solver = F.make_solver(
        "dynamic", torch.ones(experts), FusionSpec.model_construct(alpha_min=low, alpha_max=high)
    )
    step = F.fusion_step(
        large, small, expert_logits, torch.ones(batch, experts, dtype=torch.bool), solver
    )
    assert ((step.alpha >= low - 1e-6) & (step.alpha <= high + 1e-6)).all()
    torch.testing.assert_close(torch.softmax(step.logits, -1).sum(-1), torch.ones(batch))


def test_several_experts_are_solved_jointly_better_than_any_single_axis():
    large, small, experts = fake_logits(8, 3, 100, 2.0, 1.0, seed=7)
    active = torch.ones(8, 3, dtype=torch.bool)
    large_logp, shifts = prepared(large, small, experts)
    alpha = F.dynamic_alpha(large_logp, shifts, active)
    joint = F.fusion_objective(large_logp, shifts, alpha, active)
    paper = F.fusion_objective(
        large_logp, shifts, F.paper_alpha(large_logp, shifts, active, PAPER_GRID), active
    )
    assert (alpha > 0).sum(-1).max() >= 2  # some row uses several experts at once
    assert (joint < paper - 1e-6).any()


def test_rows_with_non_finite_logits_fall_back_to_the_large_model_alone():
    large, small, experts = fake_logits(3, 2, 40, 2.0, 1.0, seed=8)
    experts[1, 0, 5] = float("nan")
    small[2, 7] = float("inf")
    solver = F.make_solver("dynamic", torch.ones(2))
    step = F.fusion_step(large, small, experts, torch.ones(3, 2, dtype=torch.bool), solver)
    assert step.fallback.tolist() == [False, True, True]
    torch.testing.assert_close(step.logits[1:], F.log_probs(large[1:]))
    assert torch.all(step.alpha[1:] == 0)
    clean = F.fusion_step(
        large[:1], small[:1], experts[:1], torch.ones(1, 2, dtype=torch.bool), solver
    )
    torch.testing.assert_close(step.logits[:1], clean.logits)


def test_large_model_nan_in_some_tokens_still_samples_from_its_finite_tokens():
    large, small, experts = fake_logits(2, 1, 20, 2.0, 1.0, seed=9)
    large[0, 3] = float("nan")
    step = F.fusion_step(
        large,
        small,
        experts,
        torch.ones(2, 1, dtype=torch.bool),
        F.make_solver("paper", torch.ones(1)),
    )
    assert step.fallback.tolist() == [True, False]
    assert (
        torch.exp(step.logits[0, 3]) == 0 and torch.isfinite(torch.softmax(step.logits, -1)).all()
    )


@pytest.mark.parametrize("mode", ["none", "static", "dynamic"])
def test_a_row_without_any_finite_large_logit_is_a_fault_of_that_row_only(mode):
    large, small, experts = fake_logits(2, 1, 20, 2.0, 1.0, seed=10)
    active = torch.ones(2, 1, dtype=torch.bool)
    solver = F.make_solver(mode, torch.ones(1))
    clean = F.fusion_step(large[:1], small[:1], experts[:1], active[:1], solver)
    large[1] = float("nan")
    step = F.fusion_step(large, small, experts, active, solver)
    assert step.fault.tolist() == [False, True]
    torch.testing.assert_close(step.logits[0], clean.logits[0])
    assert torch.isfinite(step.logits).all()


@pytest.mark.parametrize("mode", ["paper", "dynamic"])
def test_an_extreme_expert_never_produces_nan(mode):
    large, small, experts = fake_logits(4, 2, 200, 2.0, 1.0, seed=11)
    experts = experts * 1e4
    step = F.fusion_step(
        large,
        small,
        experts,
        torch.ones(4, 2, dtype=torch.bool),
        F.make_solver(mode, torch.ones(2)),
    )
    assert torch.isfinite(step.alpha).all()
    assert torch.isfinite(torch.softmax(step.logits, -1)).all()


def test_static_alpha_uses_the_configured_weights_of_the_active_experts():
    active = torch.tensor([[True, False], [True, True]])
    assert F.static_alpha(torch.tensor([0.5, 1.5]), active).tolist() == [[0.5, 0.0], [0.5, 1.5]]


def test_paper_grid_is_zero_to_two_by_tenths():
    assert PAPER_GRID.numel() == 21
    torch.testing.assert_close(PAPER_GRID[[0, 1, 20]], torch.tensor([0.0, 0.1, 2.0]))
