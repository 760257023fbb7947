"""Fused log-probabilities (`logprobs=k`) on the vLLM backend and through `fusion-llm serve`, on
the shipped family: log_softmax of the fused logits (vLLM's `processed_logprobs`), equal to the
HF backend's for greedy requests, and not the large model's."""

from __future__ import annotations

import threading

import pytest
import torch
from reference_decoder import fused_step_without_cache
from vllm_family import PROMPT, _client

from fusion_llm import FusionPrompt, RequestError
from fusion_llm.core.fusion import make_solver
from fusion_llm.eval.tasks import TASKS, load_task

pytest_plugins = ["vllm_family"]  # its fixtures: hf_engine, vllm_engine, server
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOLERANCE = 1e-3  # float order between vLLM's kernels and transformers' (a wrong value is O(0.1))
K = 5


def _differences(expected, got) -> list[float]:
    """|HF - vLLM| of every chosen and top-k log-probability over the rows' common token prefix
    (a greedy tie broken differently changes the tokens after it, and so their distributions)."""
    differences = []
    for a, b in zip(expected, got, strict=True):
        for x, y in zip(a.logprobs, b.logprobs, strict=False):
            differences += [
                abs(lp - lq) for (_, _, lp), (_, _, lq) in zip(x.top, y.top, strict=True)
            ]
            if x.token_id != y.token_id:
                break
            differences.append(abs(x.logprob - y.logprob))
    return differences


def _assert_greedy_reports(generation, k: int) -> None:
    assert [e.token_id for e in generation.logprobs] == generation.token_ids
    for entry in generation.logprobs:
        assert len(entry.top) == k
        assert entry.top[0][0] == entry.token_id and entry.top[0][2] == entry.logprob
        assert [lp for _, _, lp in entry.top] == sorted(
            (lp for _, _, lp in entry.top), reverse=True
        )


def _fused_logprobs_at_own_alpha(engine, prompt: str, generation) -> torch.Tensor:
    """Reference [steps, V]: log_softmax of the fused logits after each prefix of the generation's
    tokens at the alpha it recorded (rounded to 1e-4), every HF model re-reading the sequence."""
    models = engine.models
    large_ids = models.large.tokenizer(prompt)["input_ids"]
    small_ids = models.small.tokenizer(prompt)["input_ids"]
    steps = []
    for n, alpha in enumerate(generation.alpha):
        solver = make_solver("static", torch.tensor(alpha))
        tokens = generation.token_ids[:n]
        step = fused_step_without_cache(
            engine, large_ids, small_ids, generation.experts, solver, tokens
        )
        steps.append(step.logits[0].float().log_softmax(dim=-1))
    return torch.stack(steps)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_greedy_fused_logprobs_equal_the_hf_backend(hf_engine, vllm_engine, mode, record_property):
    """Static: equal to the HF backend's within 1e-3. Dynamic: the solver's Newton steps move
    alpha by float order (test_vllm: within 5e-3), so the values are compared with the fused
    log_softmax at vLLM's own alpha within 1e-3, and with the HF backend's within 5e-3."""
    worst = at_own_alpha = 0.0
    for task in TASKS:
        prompts = [q.prompt for q in load_task(task, "eval", 3)]
        settings = {
            "experts": [task], "mode": mode, "logprobs": K,
            "max_new_tokens": 16, "ignore_eos": True, "stop": [],
        }  # fmt: skip
        expected = hf_engine.generate(prompts, **settings)
        got = vllm_engine.generate(prompts, **settings)
        for generation in got:
            _assert_greedy_reports(generation, K)
        assert sum(a.token_ids == b.token_ids for a, b in zip(expected, got, strict=True)) >= 2
        differences = _differences(expected, got)
        assert len(differences) >= 2 * 16 * (K + 1)
        worst = max(worst, *differences)
        reference = _fused_logprobs_at_own_alpha(hf_engine, prompts[0], got[0])
        reported = torch.tensor([[e.logprob] + [lp for _, _, lp in e.top] for e in got[0].logprobs])
        chosen = reference.gather(-1, torch.tensor(got[0].token_ids)[:, None])
        wanted = torch.cat([chosen, reference.topk(K, dim=-1).values], dim=1)
        at_own_alpha = max(at_own_alpha, float((reported - wanted).abs().max()))
    record_property("max |hf - vllm|", worst)
    record_property("max |reference at vllm's alpha - vllm|", at_own_alpha)
    assert at_own_alpha <= TOLERANCE
    assert worst <= (TOLERANCE if mode == "static" else 5 * TOLERANCE)


def test_streamed_chunks_carry_the_generate_logprobs(vllm_engine):
    prompt = load_task("summary", "eval", 1)[0].prompt
    settings = {"experts": ["summary"], "max_new_tokens": 12, "logprobs": 3}
    whole = vllm_engine.generate(prompt, **settings)[0]
    chunks = list(vllm_engine.stream(prompt, **settings))
    streamed = [entry for chunk in chunks for entry in chunk.logprobs]
    assert len(chunks) > 3 and chunks[-1].generation.logprobs == streamed
    assert [e.token_id for e in streamed] == whole.token_ids
    assert max(_differences([whole], [chunks[-1].generation])) <= TOLERANCE


def test_a_greedy_row_beside_sampled_rows_still_reports_the_fused_logprobs(hf_engine, vllm_engine):
    """vLLM takes log-probabilities after temperature when a step has a sampled row; a greedy
    row's temperature is 1 there, so its report stays the fused log_softmax."""
    settings = {"experts": ["trivia"], "mode": "dynamic", "max_new_tokens": 16, "logprobs": K}
    sampled = {"experts": ["math"], "temperature": 0.7, "top_k": 20, "seed": 1}
    long_prompt = load_task("math", "eval", 1)[0].prompt
    stream = vllm_engine.stream(long_prompt, max_new_tokens=40, ignore_eos=True, stop=[], **sampled)
    next(stream)  # the sampled row is running
    beside = {}
    thread = threading.Thread(
        target=lambda: beside.update(g=vllm_engine.generate(PROMPT, **settings))
    )
    thread.start()
    rest = list(stream)
    thread.join(300)
    assert len(rest[-1].generation.token_ids) == 40 and "g" in beside
    expected = hf_engine.generate(PROMPT, **settings)
    _assert_greedy_reports(beside["g"][0], K)
    assert beside["g"][0].token_ids == expected[0].token_ids
    assert max(_differences(expected, beside["g"])) <= TOLERANCE


@pytest.mark.parametrize("reshaping", [{"temperature": 0.7}, {"top_k": 5}, {"top_p": 0.9}])
def test_logprobs_of_a_reshaped_sampled_row_are_refused_not_misreported(vllm_engine, reshaping):
    """vLLM would report them after temperature / top-k / top-p: not the fused distribution."""
    settings = {"temperature": 1.0, "seed": 1, "max_new_tokens": 4, "logprobs": 2}
    with pytest.raises(RequestError, match="logprobs on the vllm backend"):
        vllm_engine.generate(PROMPT, **{**settings, **reshaping})
    assert len(vllm_engine.generate(PROMPT, **settings)[0].logprobs) >= 1


# -- fusion-llm serve ----------------------------------------------------------------------------
def _large_alone(engine, prompt, token_ids: list[int]) -> list[float]:
    """The large model's own log-probabilities of the same tokens (what raw modes would return)."""
    return engine.score(prompt, [token_ids], experts=[], mode="none")[0].token_logprobs


@pytest.mark.subprocess
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_openai_completions_logprobs_are_the_fused_ones(server, hf_engine, mode, record_property):
    reply = _client(server).completions.create(
        model="fusion",
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        logprobs=K,
        extra_body={"vllm_xargs": {"experts": ["trivia"], "fusion_mode": mode}},
    )
    expected = hf_engine.generate(
        PROMPT, experts=["trivia"], mode=mode, max_new_tokens=12, stop=[], logprobs=K
    )[0]
    choice = reply.choices[0]
    assert choice.text == expected.text
    chosen = choice.logprobs.token_logprobs
    assert chosen == pytest.approx([e.logprob for e in expected.logprobs], abs=TOLERANCE)
    tops = [sorted(top.values(), reverse=True) for top in choice.logprobs.top_logprobs]
    expected_tops = [[lp for _, _, lp in e.top] for e in expected.logprobs]
    assert tops == [pytest.approx(t, abs=TOLERANCE) for t in expected_tops]
    large = _large_alone(hf_engine, PROMPT, expected.token_ids)
    assert max(abs(a - b) for a, b in zip(chosen, large, strict=True)) > 10 * TOLERANCE
    fused = [e.logprob for e in expected.logprobs]
    record_property("max |hf - serve|", max(abs(a - b) for a, b in zip(chosen, fused, strict=True)))


@pytest.mark.subprocess
def test_openai_chat_top_logprobs_are_the_fused_ones(server, hf_engine):
    question = "Where does Ada live?"
    reply = _client(server).chat.completions.create(
        model="fusion",
        messages=[{"role": "user", "content": question}],
        max_tokens=10,
        temperature=0,
        logprobs=True,
        top_logprobs=K,
        extra_body={"vllm_xargs": {"experts": ["trivia"]}},
    )
    # vLLM renders the chat with the large tokenizer's template; every model reads that rendering
    tokenizer = hf_engine.tokenizer
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    prompt = FusionPrompt(rendered, add_special_tokens=False)
    expected = hf_engine.generate(
        prompt, experts=["trivia"], max_new_tokens=10, stop=[], logprobs=K
    )[0]
    content = reply.choices[0].logprobs.content
    assert reply.choices[0].message.content == expected.text
    chosen = [entry.logprob for entry in content]
    assert chosen == pytest.approx([e.logprob for e in expected.logprobs], abs=TOLERANCE)
    for entry, fused in zip(content, expected.logprobs, strict=True):
        top = [alternative.logprob for alternative in entry.top_logprobs]
        assert top == pytest.approx([lp for _, _, lp in fused.top], abs=TOLERANCE)
        assert entry.top_logprobs[0].logprob == entry.logprob
    large = _large_alone(hf_engine, prompt, expected.token_ids)
    assert max(abs(a - b) for a, b in zip(chosen, large, strict=True)) > 10 * TOLERANCE
