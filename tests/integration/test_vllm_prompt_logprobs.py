"""Prompt log-probabilities through `fusion-llm serve` (the real `openai` client on 127.0.0.1):
vLLM computes them from the large model alone, so a fused request asking for them (completions'
`echo` + `logprobs`, or `prompt_logprobs`) gets a 400 that says so and where fused scores are; a
request that fuses nothing still gets them, and the server goes on serving."""

from __future__ import annotations

import pytest
from vllm_family import PROMPT, _client

pytest_plugins = ["vllm_family"]  # its fixture: server
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

FUSED = {"vllm_xargs": {"experts": ["trivia"], "fusion_mode": "static"}}
MESSAGES = [{"role": "user", "content": "Where does Ada live?"}]


@pytest.mark.subprocess
def test_prompt_logprobs_on_fused_requests_get_400_and_unfused_ones_get_them(server):
    from openai import BadRequestError

    client = _client(server)
    refusals = [
        lambda: client.completions.create(
            model="fusion", prompt=PROMPT, max_tokens=4, echo=True, logprobs=2, extra_body=FUSED
        ),
        lambda: client.chat.completions.create(
            model="fusion",
            messages=MESSAGES,
            max_tokens=4,
            extra_body={**FUSED, "prompt_logprobs": 1},
        ),  # fmt: skip
    ]
    for refused in refusals:
        with pytest.raises(BadRequestError) as error:
            refused()
        message = error.value.body["message"]  # the OpenAI error body's, as the server wrote it
        assert error.value.status_code == 400
        assert "prompt_logprobs" in message and "the large model's, not the fused ones" in message
        assert "FusionEngine.score" in message and "fusion_llm.eval.harness.FusionLM" in message

    alone = client.completions.create(
        model="fusion", prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=2,
        extra_body={"vllm_xargs": {"experts": []}},
    )  # fmt: skip
    scores = alone.choices[0].logprobs.token_logprobs
    assert scores[0] is None and len(scores) == alone.usage.total_tokens  # prompt, then output
    unfused_chat = client.chat.completions.create(
        model="fusion", messages=MESSAGES, max_tokens=4,
        extra_body={"vllm_xargs": {"fusion_mode": "none"}, "prompt_logprobs": 1},
    )  # fmt: skip
    prompt_scores = unfused_chat.model_extra["prompt_logprobs"]
    assert prompt_scores[0] is None and len(prompt_scores) == unfused_chat.usage.prompt_tokens

    after = client.completions.create(
        model="fusion", prompt=PROMPT, max_tokens=4, temperature=0, extra_body=FUSED
    )
    assert after.usage.completion_tokens >= 1 and after.choices[0].text
