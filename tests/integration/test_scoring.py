"""`FusionEngine.score` on the tiny family: the fused teacher-forced log-likelihood decoding sees."""

from __future__ import annotations

import pytest
import torch

from fusion_llm.core.errors import RequestError
from fusion_llm.core.fusion import log_probs

PROMPTS = ["the king of Rome", "question: what city is on the river Nile and who"]


def greedy(engine, prompt: str, mode: str):
    """Greedy generation with the log-probability of every token under the fused distribution."""
    return engine.generate(
        prompt, mode=mode, temperature=0.0, max_new_tokens=6, ignore_eos=True, logprobs=0
    )[0]


@pytest.mark.parametrize("mode", ["dynamic", "static", "paper"])
def test_greedy_continuation_scores_as_greedy_with_the_logprobs_decoding_saw(engine, mode):
    for prompt in PROMPTS:
        generation = greedy(engine, prompt, mode)
        tokenizer = engine.tokenizer
        if (
            tokenizer(generation.text, add_special_tokens=False)["input_ids"]
            != generation.token_ids
        ):
            continue  # the text does not re-tokenize to the same ids: not the same continuation
        (score,) = engine.score(prompt, generation.text, mode=mode)
        assert score.tokens == generation.token_ids
        assert score.is_greedy
        seen = [entry.logprob for entry in generation.logprobs]
        assert score.token_logprobs == pytest.approx(seen, abs=1e-4)
        assert score.total == pytest.approx(sum(score.token_logprobs), abs=1e-5)


def test_greedy_continuation_has_the_highest_score(engine):
    prompt = PROMPTS[0]
    generation = greedy(engine, prompt, "dynamic")
    first = generation.token_ids[0]
    others = [t for t in range(5, 40) if t != first][:6]
    scores = engine.score([prompt] * 7, [[first], *([t] for t in others)], mode="dynamic")
    assert scores[0].is_greedy
    assert not any(s.is_greedy for s in scores[1:])
    assert scores[0].total > max(s.total for s in scores[1:])


def test_mode_none_is_the_large_models_teacher_forced_logprobs(engine):
    prompt, continuation = PROMPTS[1], " the river Nile"
    (score,) = engine.score(prompt, continuation, mode="none")
    large = engine.models.large
    prompt_ids = large.tokenizer(prompt)["input_ids"]
    ids = prompt_ids + score.tokens
    with torch.no_grad():
        logits = large.model(torch.tensor([ids])).logits[0].float()  # [S, V]
    logp = log_probs(logits[:, : engine.models.vocab_size])
    expected = [float(logp[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(score.tokens)]
    assert score.token_logprobs == pytest.approx(expected, abs=1e-5)
    assert engine.score(prompt, continuation, experts=[])[0].token_logprobs == pytest.approx(
        expected, abs=1e-5
    )


def test_experts_change_the_score_and_batching_does_not(engine):
    continuations = [" the river", " of Egypt and"]
    batch = engine.score(PROMPTS, continuations, experts=["full", "lora_a"], mode="dynamic")
    alone = [
        engine.score(p, c, experts=["full", "lora_a"], mode="dynamic")[0]
        for p, c in zip(PROMPTS, continuations, strict=True)
    ]
    for together, single in zip(batch, alone, strict=True):
        assert together.tokens == single.tokens
        assert together.token_logprobs == pytest.approx(single.token_logprobs, abs=1e-4)
    large = engine.score(PROMPTS, continuations, mode="none")
    assert [s.total for s in batch] != pytest.approx([s.total for s in large], abs=1e-3)


def test_each_row_scores_with_its_own_experts(engine):
    prompts = [*PROMPTS, PROMPTS[0]]
    continuations = [" the river", " of Egypt and", " the river"]
    routes = [["full"], ["lora_a", "lora_b"], []]
    together = engine.score(prompts, continuations, experts=routes, mode="dynamic")
    for prompt, continuation, experts, score in zip(
        prompts, continuations, routes, together, strict=True
    ):
        (alone,) = engine.score(prompt, continuation, experts=experts, mode="dynamic")
        assert score.tokens == alone.tokens
        assert score.token_logprobs == pytest.approx(alone.token_logprobs, abs=1e-4)
    assert together[0].total != pytest.approx(
        together[2].total, abs=1e-3
    )  # same text, experts differ
    with pytest.raises(RequestError, match="one list per prompt"):
        engine.score(prompts, continuations, experts=routes[:2])


@pytest.mark.parametrize(
    ("continuations", "named"),
    [
        ([""], "continuations[0]"),
        (["ok", ""], "continuations"),  # one continuation for each of two prompts, but 1 prompt
        ([" word" * 400], "continuations[0]"),  # longer than the tiny models' 256-token window
        ([None], "continuations"),
        ([[1, -2]], "continuations"),
        ([[10**9]], "continuations"),
    ],
)
def test_bad_continuations_raise_a_request_error_naming_the_field(engine, continuations, named):
    with pytest.raises(RequestError, match=named.replace("[", r"\[").replace("]", r"\]")):
        engine.score(PROMPTS[0], continuations)
    (score,) = engine.score(PROMPTS[0], " the")  # the next call works
    assert score.tokens and score.total < 0
    assert engine.score(PROMPTS[0], " the") == [score]


def test_an_empty_prompt_raises_a_request_error_naming_it(engine):
    with pytest.raises(RequestError, match="prompt 1 is empty"):
        engine.score(["the", ""], [" king", " king"])
    assert engine.score(["the"], [" king"])[0].tokens
