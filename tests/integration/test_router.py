"""Task router: explicit route precedence (pure) and likelihood-ratio scoring on tiny real models."""

from __future__ import annotations

import math

import pytest
import torch

from fusion_llm import FusionEngine, FusionPrompt, RequestError, UnknownExpertError
from fusion_llm.routing.router import (
    RoutingDecision,
    TaskRouter,
    choose_route,
    mean_log_likelihood,
    normalize_route,
    route_from_tags,
    routing_accuracy,
)
from fusion_llm.tiny import family_config

PROMPTS = [
    FusionPrompt("the city of Paris is on the river"),
    FusionPrompt("what is three plus seven"),
]


# -- explicit routes ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "route"),
    [
        ("all", "all"),
        ("none", "none"),
        ("auto", "auto"),
        ("examples", "examples"),
        ("math", ["math"]),
        (" math ", ["math"]),
        ([], "none"),
        ((), "none"),
        (["b", "a", "b"], ["b", "a"]),
    ],
)
def test_normalize_route(value, route) -> None:
    assert normalize_route(value) == route


@pytest.mark.parametrize("value", [["auto", "math"], 3, {"math": 1}, None])
def test_invalid_routes_are_request_errors(value) -> None:
    with pytest.raises(RequestError, match="route"):
        normalize_route(value)


def test_tags_name_tasks_in_order() -> None:
    assert route_from_tags(["x", "task:b", "task:a", "task:b"]) == ["b", "a"]
    assert route_from_tags(["x"]) is None
    assert route_from_tags(None) is None


@pytest.mark.parametrize(
    ("call", "metadata", "tags", "expected"),
    [
        ({"task": "a"}, {"fusion_tasks": ["b"]}, ["task:c"], (["a"], "call")),
        ({"tasks": ["a"], "task": "z"}, None, None, (["a"], "call")),
        ({"experts": "e", "tasks": ["a"]}, None, None, (["e"], "call")),
        ({}, {"fusion_tasks": "auto"}, ["task:c"], ("auto", "metadata")),
        ({"task": None}, {"other": 1}, ["task:c"], (["c"], "tags")),
        ({}, {}, [], ("all", "default")),
    ],
)
def test_route_precedence_call_metadata_tags_default(call, metadata, tags, expected) -> None:
    assert choose_route(call, metadata, tags, "all") == expected


def test_decision_reason_names_source_and_gains() -> None:
    decision = RoutingDecision(["a"], "metadata", "auto", {"a": 0.5, "b": -0.25})
    assert decision.reason == "auto via metadata: a (gains a +0.500, b -0.250)"
    assert RoutingDecision([], "call", "none").reason == "none via call: large model alone"
    assert decision.as_dict()["scores"] == {"a": 0.5, "b": -0.25}


# -- the router over tiny real models -----------------------------------------------------------
@pytest.fixture(scope="module")
def twin_engine(tiny_family) -> FusionEngine:
    """Two LoRA experts, a full expert, and `twin`: the small base itself as a full expert."""
    config = family_config(tiny_family)
    config["experts"].append({"name": "twin", "path": str(tiny_family["small"]), "kind": "full"})
    return FusionEngine(config)


def test_explicit_routes_resolve_to_experts(twin_engine: FusionEngine) -> None:
    router = TaskRouter(twin_engine)
    assert router.decide(PROMPTS, "all", "default")[0].experts == twin_engine.expert_names
    assert router.decide(PROMPTS, "none", "call")[1].experts == []
    assert router.decide(PROMPTS, ["full"], "tags")[0].experts == ["full"]
    with pytest.raises(UnknownExpertError, match="named after its expert"):
        router.decide(PROMPTS, ["poetry"], "call")


def test_an_expert_identical_to_the_small_base_gains_nothing(twin_engine: FusionEngine) -> None:
    for gains in TaskRouter(twin_engine).gains(PROMPTS):
        assert gains["twin"] == pytest.approx(0.0, abs=1e-4)
        assert set(gains) == {"lora_a", "lora_b", "full", "twin"}


def test_threshold_and_max_experts_select_by_gain(twin_engine: FusionEngine) -> None:
    everyone = TaskRouter(twin_engine, threshold=-math.inf).decide(PROMPTS, "auto", "default")
    nobody = TaskRouter(twin_engine, threshold=math.inf).decide(PROMPTS, "auto", "default")
    best = TaskRouter(twin_engine, threshold=-math.inf, max_experts=1).decide(
        PROMPTS, "auto", "call"
    )
    for all_row, none_row, best_row in zip(everyone, nobody, best, strict=True):
        gains = all_row.scores
        assert sorted(all_row.experts) == sorted(twin_engine.expert_names)
        assert [gains[e] for e in all_row.experts] == sorted(gains.values(), reverse=True)
        assert none_row.experts == []
        assert best_row.experts == [max(gains, key=gains.get)]


def test_auto_routing_keeps_only_experts_above_the_threshold(twin_engine: FusionEngine) -> None:
    for decision in TaskRouter(twin_engine, threshold=0.0).decide(PROMPTS, "auto", "default"):
        assert all(decision.scores[e] > 0.0 for e in decision.experts)
        assert "twin" not in decision.experts  # a gain of exactly zero does not pass


def test_scores_do_not_depend_on_batch_padding(twin_engine: FusionEngine) -> None:
    router = TaskRouter(twin_engine)
    together = router.gains(PROMPTS)
    alone = [router.gains([p])[0] for p in PROMPTS]
    for batched, single in zip(together, alone, strict=True):
        assert batched == pytest.approx(single, abs=1e-3)


def test_mean_log_likelihood_is_the_mean_next_token_log_probability(
    twin_engine: FusionEngine,
) -> None:
    loaded = twin_engine.models.full_experts["twin"]
    ids = loaded.tokenizer("the king of Rome")["input_ids"]
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([ids])).logits[0]
    expected = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None]).mean()
    with torch.no_grad():
        scores = mean_log_likelihood(loaded, [ids, ids[:2]])
    assert float(scores[0]) == pytest.approx(float(expected), abs=1e-5)


def test_routing_accuracy_counts_top1_selected_and_exact(twin_engine: FusionEngine) -> None:
    router = TaskRouter(twin_engine, threshold=-math.inf)
    texts = [p.text for p in PROMPTS]
    gains = router.gains(PROMPTS)
    winners = [max(g, key=g.get) for g in gains]
    report = routing_accuracy(router, {winners[0]: texts[:1], "twin": texts[1:]}, batch_size=1)
    assert report[winners[0]] == {"top1": 1.0, "selected": 1.0, "exact": 0.0}  # all selected
    assert report["twin"]["selected"] == 1.0
    assert report["all"]["top1"] == (1.0 + (winners[1] == "twin")) / 2


@pytest.fixture(scope="module")
def example_engine(tiny_family) -> FusionEngine:
    """Experts with example prompts: `full` for places, `lora_a` for sums; `lora_b` has none."""
    config = family_config(tiny_family, experts=("lora_a", "lora_b", "full"))
    examples = {
        "full": [PROMPTS[0].text, "the river Tiber is in Rome"],
        "lora_a": [PROMPTS[1].text],
    }
    for expert in config["experts"]:
        expert["examples"] = examples.get(expert["name"], [])
    return FusionEngine(config)


def test_examples_route_picks_the_expert_with_the_nearest_examples(example_engine) -> None:
    decisions = TaskRouter(example_engine).decide(PROMPTS[1:], "examples", "metadata")
    (decision,) = decisions
    assert decision.experts == ["lora_a"]  # the prompt is lora_a's only example
    assert decision.scores["lora_a"] == pytest.approx(1.0, abs=1e-4)
    assert set(decision.scores) == {"full", "lora_a"}  # experts without examples are not scored
    assert decision.reason.startswith("examples via metadata: lora_a (similarities")


def test_example_similarities_do_not_depend_on_batch_padding(example_engine) -> None:
    router = TaskRouter(example_engine)
    together = router.similarities(PROMPTS)
    assert together == [pytest.approx(router.similarities([p])[0], abs=1e-3) for p in PROMPTS]


def test_examples_route_without_examples_is_a_request_error(twin_engine) -> None:
    with pytest.raises(RequestError, match="set `examples` on the experts"):
        TaskRouter(twin_engine).decide(PROMPTS, "examples", "call")


def test_routing_accuracy_measures_the_examples_route(example_engine) -> None:
    report = routing_accuracy(
        TaskRouter(example_engine), {"lora_a": [PROMPTS[1].text]}, route="examples"
    )
    assert report["lora_a"] == report["all"] == {"top1": 1.0, "selected": 1.0, "exact": 1.0}
