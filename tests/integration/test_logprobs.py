"""Log-probabilities of the fused distribution (`logprobs=k`) on the tiny real family: what they
mean (log_softmax of the fused logits, before temperature / top-k / top-p), that asking for them
changes no token, and how both adapters carry them."""

from __future__ import annotations

import threading

import pytest
import torch
from langchain_fusion_llm import ChatFusedLLM
from langchain_fusion_llm import FusedLLM as LangChainLLM
from llama_index.core.base.llms.types import LogProb
from llama_index.core.llms import ChatMessage
from llama_index.llms.fusion_llm import FusedLLM as LlamaIndexLLM
from reference_decoder import fused_step_without_cache

from fusion_llm import FusionPrompt, RequestError
from fusion_llm.core.config import MAX_LOGPROBS
from fusion_llm.core.fusion import make_solver

pytest_plugins = ["tiny_family"]  # the session fixture `tiny_config`

PROMPTS = ["the king of Rome", "question: what city is on the river Nile and who"]


@torch.no_grad()
def teacher_forced_logprobs(engine, prompt: str, experts, mode, tokens) -> torch.Tensor:
    """Reference: log_softmax of the fused logits [steps, V] after each prefix of `tokens`, every
    model re-reading the whole sequence (no KV cache, no sampler)."""
    models = engine.models
    large_ids = models.large.tokenizer(prompt)["input_ids"]
    small_ids = models.small.tokenizer(prompt)["input_ids"]
    solver = make_solver(mode, torch.ones(len(experts)))
    steps = [
        fused_step_without_cache(engine, large_ids, small_ids, experts, solver, tokens[:n])
        .logits[0]
        .float()
        for n in range(len(tokens))
    ]
    return torch.stack(steps).log_softmax(dim=-1)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_greedy_tokens_are_the_top_1_of_the_fused_log_softmax(engine, mode):
    generation = engine.generate(PROMPTS[0], mode=mode, max_new_tokens=6, logprobs=3)[0]
    entries = generation.logprobs
    assert [e.token_id for e in entries] == generation.token_ids
    for entry in entries:
        assert len(entry.top) == 3
        assert entry.top[0][0] == entry.token_id and entry.top[0][2] == entry.logprob
        assert [lp for _, _, lp in entry.top] == sorted(
            (lp for _, _, lp in entry.top), reverse=True
        )
        assert entry.token == engine.tokenizer.decode([entry.token_id])
    reference = teacher_forced_logprobs(
        engine, PROMPTS[0], engine.expert_names, mode, generation.token_ids
    )
    chosen = reference.gather(-1, torch.tensor(generation.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(
        torch.tensor([e.logprob for e in entries]), chosen, atol=2e-3, rtol=0
    )
    top = reference.topk(3, dim=-1)
    assert [[i for i, _, _ in e.top] for e in entries] == top.indices.tolist()


def test_sampled_tokens_report_the_fused_log_probability_before_temperature(engine):
    settings = {"temperature": 2.5, "top_k": 5, "seed": 3, "max_new_tokens": 6}
    generation = engine.generate(PROMPTS[1], mode="dynamic", logprobs=0, **settings)[0]
    reference = teacher_forced_logprobs(
        engine, PROMPTS[1], engine.expert_names, "dynamic", generation.token_ids
    )
    chosen = reference.gather(-1, torch.tensor(generation.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(
        torch.tensor([e.logprob for e in generation.logprobs]), chosen, atol=2e-3, rtol=0
    )
    assert all(e.top == [] for e in generation.logprobs)  # logprobs=0: the chosen token alone
    top_5 = reference.topk(5, dim=-1).indices
    assert all(t in row for t, row in zip(generation.token_ids, top_5.tolist(), strict=True))
    # The distribution drawn from (temperature 2.5) is flatter: what is reported is not it.
    tempered = (reference / 2.5).log_softmax(dim=-1)
    drawn = tempered.gather(-1, torch.tensor(generation.token_ids)[:, None])[:, 0]
    assert not torch.allclose(drawn, chosen, atol=1e-2, rtol=0)


def test_asking_for_logprobs_changes_no_token(engine):
    sampled = {"temperature": 1.0, "seed": 11, "max_new_tokens": 8}
    for settings in ({"max_new_tokens": 8}, sampled):
        plain = engine.generate(PROMPTS, **settings)
        scored = engine.generate(PROMPTS, logprobs=MAX_LOGPROBS, **settings)
        assert [g.token_ids for g in scored] == [g.token_ids for g in plain]
        assert all(g.logprobs is None for g in plain)
        assert all(len(g.logprobs) == len(g.token_ids) for g in scored)
        assert all(len(e.top) == MAX_LOGPROBS for g in scored for e in g.logprobs)


def test_rows_asking_for_different_k_share_a_batch_with_rows_that_do_not(engine):
    alone = engine.generate(PROMPTS[0], max_new_tokens=5, logprobs=2)[0]
    results: dict[str, list] = {}

    def run(name: str, **settings) -> None:
        results[name] = engine.generate(PROMPTS, max_new_tokens=5, **settings)

    threads = [
        threading.Thread(target=run, args=(name,), kwargs=settings)
        for name, settings in (("two", {"logprobs": 2}), ("five", {"logprobs": 5}), ("off", {}))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(g.logprobs is None for g in results["off"])
    assert all(len(e.top) == 5 for g in results["five"] for e in g.logprobs)
    assert results["two"][0].token_ids == alone.token_ids
    torch.testing.assert_close(
        torch.tensor([e.logprob for e in results["two"][0].logprobs]),
        torch.tensor([e.logprob for e in alone.logprobs]),
        atol=1e-5,
        rtol=0,
    )


def test_streamed_chunks_carry_the_entries_of_their_tokens(engine):
    chunks = list(engine.stream(FusionPrompt(PROMPTS[0]), max_new_tokens=8, logprobs=1))
    streamed = [e for c in chunks for e in c.logprobs]
    final = chunks[-1].generation
    assert [e.token_id for e in streamed] == final.token_ids
    assert streamed == final.logprobs


@pytest.mark.parametrize("k", [MAX_LOGPROBS + 1, -1])
def test_logprobs_out_of_bounds_is_a_request_error_naming_the_field(engine, k):
    with pytest.raises(RequestError, match="logprobs"):
        engine.generate(PROMPTS[0], logprobs=k)


def openai_entries(metadata: dict) -> list[dict]:
    return metadata["logprobs"]["content"]


def check_openai_shape(entries: list[dict], k: int) -> None:
    for entry in entries:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode("utf-8"))
        assert len(entry["top_logprobs"]) == k
        for alternative in entry["top_logprobs"]:
            assert set(alternative) == {"token", "logprob", "bytes"}
        if k:
            assert entry["top_logprobs"][0]["logprob"] == entry["logprob"]  # greedy: the top-1


def test_langchain_chat_invoke_and_stream_carry_openai_shaped_logprobs(tiny_config):
    chat = ChatFusedLLM(config_path=tiny_config, max_tokens=6, logprobs=True, top_logprobs=2)
    message = chat.invoke("the city")
    entries = openai_entries(message.response_metadata)
    assert len(entries) == message.usage_metadata["output_tokens"]
    check_openai_shape(entries, 2)
    chunks = list(chat.stream("the city"))
    streamed = [e for c in chunks for e in openai_entries(c.response_metadata)]
    assert streamed == entries
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert openai_entries(merged.response_metadata) == entries
    plain = ChatFusedLLM(config_path=tiny_config, max_tokens=6).invoke("the city")
    assert "logprobs" not in plain.response_metadata
    bound = ChatFusedLLM(config_path=tiny_config, max_tokens=6).bind(logprobs=True)
    check_openai_shape(openai_entries(bound.invoke("the city").response_metadata), 0)


def test_langchain_llm_generation_info_carries_logprobs(tiny_config):
    llm = LangChainLLM(config_path=tiny_config, max_tokens=5, top_logprobs=3)
    result = llm.generate(["the king", "a city"])  # two prompts: one engine batch
    for (generation,) in result.generations:
        check_openai_shape(openai_entries(generation.generation_info), 3)
    plain = LangChainLLM(config_path=tiny_config, max_tokens=5)
    # One prompt is streamed: its chunks' entries merge into the same list (batching moves the
    # last float bits only).
    single = plain.generate(["the king"], logprobs=True, top_logprobs=3).generations[0][0]
    streamed, batched = (
        openai_entries(g.generation_info) for g in (single, result.generations[0][0])
    )
    assert [e["token"] for e in streamed] == [e["token"] for e in batched]
    assert [e["logprob"] for e in streamed] == pytest.approx(
        [e["logprob"] for e in batched], abs=1e-4
    )


def test_langchain_top_logprobs_above_the_bound_is_a_request_error(tiny_config):
    chat = ChatFusedLLM(config_path=tiny_config, max_tokens=4)
    with pytest.raises(RequestError, match="logprobs"):
        chat.invoke("the city", logprobs=True, top_logprobs=MAX_LOGPROBS + 1)


def test_llama_index_complete_and_chat_carry_logprob_lists(tiny_config):
    llm = LlamaIndexLLM(config_path=tiny_config, max_new_tokens=5, logprobs=True, top_logprobs=2)
    response = llm.complete("the king")
    generation = llm.engine.generate("the king", max_new_tokens=5, logprobs=2)[0]
    assert len(response.logprobs) == len(generation.token_ids)
    for step, entry in zip(response.logprobs, generation.logprobs, strict=True):
        assert all(isinstance(p, LogProb) for p in step)
        assert [p.token for p in step] == [t for _, t, _ in entry.top]
        assert step[0].logprob == pytest.approx(entry.logprob)
        assert step[0].bytes == list(entry.top[0][1].encode("utf-8"))
    chat = llm.chat([ChatMessage(role="user", content="the city")])
    assert chat.logprobs and all(len(step) == 2 for step in chat.logprobs)
    streamed = list(llm.stream_complete("the king"))
    assert [p for r in streamed for p in (r.logprobs or [])] == response.logprobs
    assert LlamaIndexLLM(config_path=tiny_config, max_new_tokens=5).complete("a").logprobs is None
