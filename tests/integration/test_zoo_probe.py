"""The probe's candidate scoring equals the log-probability a model assigns token by token."""

import pytest
import torch

from fusion_llm.zoo.probe import continuation_logprobs
from fusion_llm.zoo.scales import get_scale
from fusion_llm.zoo.tokenizer import train_tokenizer
from fusion_llm.zoo.train import new_base
from fusion_llm.zoo.world import make_world


@pytest.fixture(scope="module")
def model_and_tokenizer():
    scale = get_scale("toy")
    world = make_world(0, scale.n_people, n_misconceptions=scale.n_misconceptions)
    tokenizer = train_tokenizer(world, scale.vocab_size, scale.n_eval)
    model = new_base(scale.sizes["small"], tokenizer, scale.window, seed=0).eval()
    return model, tokenizer


def _reference(model, tokenizer, prompt: str, continuation: str) -> float:
    """Sum of log P(token | everything before it), one unpadded sequence at a time."""
    prompt_ids = tokenizer(prompt).input_ids
    continuation_ids = tokenizer(continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([prompt_ids + continuation_ids])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits.log_softmax(-1)[0]
    return sum(
        logprobs[len(prompt_ids) - 1 + i, token].item() for i, token in enumerate(continuation_ids)
    )


def test_batched_padded_scores_match_one_sequence_at_a_time(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = "Question: What pet does someone keep?\nAnswer:"
    candidates = [" cat", " a very long answer about a hedgehog", " owl"]
    scores = continuation_logprobs(model, tokenizer, prompt, candidates)
    expected = [_reference(model, tokenizer, prompt, c) for c in candidates]
    assert scores.tolist() == pytest.approx(expected, abs=1e-4)
