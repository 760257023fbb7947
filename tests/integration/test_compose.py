"""Task arithmetic in weight space: pure state-dict merging and merged experts of tiny real models."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fusion_llm import FusionEngine, RequestError
from fusion_llm.routing.compose import WeightComposer, merge_lora_adapters, merge_state_dicts
from fusion_llm.tiny import family_config


def states(*values: float) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.full((2, 2), v), "b": torch.full((2,), 2 * v)} for v in values]


@pytest.mark.parametrize(
    ("lambdas", "expected"),
    [((0.0, 0.0), 1.0), ((1.0, 0.0), 3.0), ((0.0, 1.0), -1.0), ((0.5, 2.0), 1.0 + 1.0 - 4.0)],
)
def test_merge_is_base_plus_weighted_task_vectors(lambdas, expected) -> None:
    base, first, second = states(1.0, 3.0, -1.0)
    merged = merge_state_dicts(base, [first, second], lambdas)
    assert torch.equal(merged["w"], torch.full((2, 2), expected))
    assert torch.equal(merged["b"], torch.full((2,), 2 * expected))


def test_merge_keeps_each_tensor_dtype() -> None:
    base = {"w": torch.ones(2, dtype=torch.bfloat16)}
    merged = merge_state_dicts(base, [{"w": torch.zeros(2, dtype=torch.bfloat16)}], [0.5])
    assert merged["w"].dtype == torch.bfloat16 and torch.equal(
        merged["w"].float(), torch.full((2,), 0.5)
    )


@pytest.fixture
def merge_engine(tiny_family) -> FusionEngine:
    """A fresh engine (merging edits its LoRA model), with `twin`: the small base as a full expert."""
    config = family_config(tiny_family, experts=("lora_a", "lora_b", "full"))
    config["experts"].append({"name": "twin", "path": str(tiny_family["small"]), "kind": "full"})
    config["experts"][0]["alpha"] = 0.5
    return FusionEngine(config)


def test_merged_lora_update_is_the_weighted_sum_of_updates(merge_engine: FusionEngine) -> None:
    model = merge_engine.models.small.model
    a, b = (merge_engine.models.lora_experts[e] for e in ("lora_a", "lora_b"))
    merge_lora_adapters(model, [a, b], [0.5, 2.0], "ab")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = 0.5 * layer.get_delta_weight(a) + 2.0 * layer.get_delta_weight(b)
    assert torch.allclose(layer.get_delta_weight("ab"), expected, atol=1e-6)


def test_lora_set_is_written_once_as_one_adapter(merge_engine: FusionEngine, tmp_path) -> None:
    composer = WeightComposer(merge_engine, tmp_path)
    config = composer.config_for(["lora_a", "lora_b"])
    *originals, merged = config.experts
    assert [e.name for e in originals] == ["lora_a", "lora_b"]
    assert (merged.name, merged.kind) == ("lora_a__lora_b", "lora")
    assert config.large == merge_engine.config.large and config.small == merge_engine.config.small
    written = sorted(p.name for p in tmp_path.iterdir())
    assert composer.config_for(["lora_a", "lora_b"]) == config
    assert sorted(p.name for p in tmp_path.iterdir()) == written == [merged.path.split("/")[-1]]
    engine_adapters = merge_engine.models.small.model.peft_config
    assert sorted(engine_adapters) == sorted(merge_engine.models.lora_experts.values())  # unchanged
    generation = FusionEngine(config).generate("the city", experts=["lora_a__lora_b"])[0]
    assert generation.experts == ["lora_a__lora_b"]


def test_full_merge_with_an_unchanged_expert_is_the_other_expert(
    merge_engine: FusionEngine, tmp_path
) -> None:
    merged = WeightComposer(merge_engine, tmp_path).config_for(["full", "twin"]).experts[-1]
    merged_weights = load_file(f"{merged.path}/model.safetensors")
    full = merge_engine.models.full_experts["full"].model.state_dict()
    for key, value in merged_weights.items():
        assert torch.allclose(value, full[key], atol=1e-6), key


@pytest.mark.parametrize(
    ("experts", "message"),
    [
        (["lora_a"], "two or more"),
        (["lora_a", "poetry"], "unknown"),
        (["lora_a", "full"], "LoRA and full"),
    ],
)
def test_invalid_sets_are_request_errors(
    merge_engine: FusionEngine, tmp_path, experts, message
) -> None:
    with pytest.raises(RequestError, match=message):
        WeightComposer(merge_engine, tmp_path).config_for(experts)


def test_an_engine_for_a_merged_expert_shares_the_large_model(merge_engine, tmp_path) -> None:
    config = WeightComposer(merge_engine, tmp_path).config_for(["lora_a", "lora_b"])
    assert FusionEngine(config).models.large is merge_engine.models.large
