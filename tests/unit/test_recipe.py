"""The fine-tuning recipe's data order and learning-rate schedule (`fusion_llm.experts.recipe`)."""

import math

import pytest
import torch

from fusion_llm.experts import recipe


@pytest.mark.parametrize(("rows", "batch_size"), [(10, 4), (16, 8), (7, 16)])
def test_each_epoch_visits_every_row_once_in_consecutive_batches(rows, batch_size):
    batches = recipe.epoch_batches(rows, batch_size, 3, seed=5)
    per_epoch = math.ceil(rows / batch_size)
    assert len(batches) == 3 * per_epoch
    for e in range(3):
        epoch = batches[e * per_epoch : (e + 1) * per_epoch]
        assert sorted(i for b in epoch for i in b) == list(range(rows))
        assert all(len(b) == batch_size for b in epoch[:-1])
    assert batches[:per_epoch] != batches[per_epoch : 2 * per_epoch]  # reshuffled per epoch


def test_the_order_is_the_seeds_and_a_fraction_of_an_epoch_is_its_first_batches():
    assert recipe.epoch_batches(40, 8, 2, seed=1) == recipe.epoch_batches(40, 8, 2, seed=1)
    assert recipe.epoch_batches(40, 8, 2, seed=1) != recipe.epoch_batches(40, 8, 2, seed=2)
    assert recipe.epoch_batches(40, 8, 1.4, seed=1) == recipe.epoch_batches(40, 8, 2, seed=1)[:7]
    assert len(recipe.epoch_batches(40, 8, 0.01, seed=1)) == 1


def test_the_schedule_warms_up_linearly_then_decays_by_cosine_to_a_tenth():
    total, warmup = 100, recipe.warmup_steps(100, 0.05)
    assert warmup == 5 and recipe.warmup_steps(150, 0.05) == 7 and recipe.warmup_steps(9, 0) == 0
    assert recipe.warmup_steps(3, 0.05) == 1
    factors = [recipe.lr_factor(s, total, warmup) for s in range(total + 1)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factors[5] == pytest.approx(1.0) and factors[total] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[5:], factors[6:], strict=False))
    halfway = recipe.lr_factor(warmup + (total - warmup) // 2, total, warmup)
    assert halfway == pytest.approx(0.55, abs=0.01)


def test_the_optimiser_is_adamw_with_the_recipes_betas_and_one_weight_decay():
    weights = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    adamw, schedule = recipe.optimiser(weights, lr=1e-2, weight_decay=0.01, total=10, warmup=2)
    (group,) = adamw.param_groups
    assert group["betas"] == (0.9, 0.98) and group["weight_decay"] == 0.01
    assert group["lr"] == pytest.approx(1e-2 * 0.5)  # the first warmup step's factor
    adamw.step()
    schedule.step()
    assert adamw.param_groups[0]["lr"] == pytest.approx(1e-2)
