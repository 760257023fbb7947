"""LangChain adapters over the tiny real model family: real langchain-core objects throughout."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.runnables import ConfigurableField, RunnableConfig, RunnableLambda
from langchain_fusion_llm import ChatFusedLLM, FusedLLM
from langchain_fusion_llm.structured import structured_output
from pydantic import BaseModel

from fusion_llm import FusionEngine, UnknownExpertError
from fusion_llm.routing.chat import parse_tool_calls
from fusion_llm.routing.client import shared_engine

pytest_plugins = ["tiny_family"]  # the session fixture `tiny_config`


class CountingEngine(FusionEngine):
    """A real engine that records the batch size and experts of each `generate` call."""

    def __init__(self, config: Any):
        super().__init__(config)
        self.batch_sizes: list[int] = []
        self.experts: list[object] = []

    def generate(self, prompts, **kwargs):
        self.batch_sizes.append(len(prompts) if isinstance(prompts, list) else 1)
        self.experts.append(kwargs.get("experts"))
        return super().generate(prompts, **kwargs)


class TokenRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


@pytest.fixture
def chat(tiny_config: str) -> ChatFusedLLM:
    return ChatFusedLLM(config_path=tiny_config)


@pytest.fixture
def llm(tiny_config: str) -> FusedLLM:
    return FusedLLM(config_path=tiny_config)


def routing(message: AIMessage) -> dict[str, Any]:
    return message.response_metadata["routing"]


# -- results and metadata -----------------------------------------------------------------------
def test_chat_invoke_reports_usage_finish_reason_experts_and_alpha(chat: ChatFusedLLM) -> None:
    message = chat.invoke([SystemMessage("be brief"), HumanMessage("the city of")])
    usage = message.usage_metadata
    assert usage["output_tokens"] <= chat.engine.config.generation.max_new_tokens
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    meta = message.response_metadata
    assert meta["finish_reason"] in {"eos", "length", "stop"}
    assert meta["experts"] == ["full", "lora_a", "lora_b"]
    assert set(meta["alpha_summary"]) <= {"full", "lora_a", "lora_b"}
    assert routing(message)["source"] == "default"


def test_chat_renders_every_role_and_any_message_last(chat: ChatFusedLLM) -> None:
    history = [
        SystemMessage("sys"),
        HumanMessage("what is three plus seven"),
        AIMessage("", tool_calls=[{"name": "add", "args": {"a": 3}, "id": "c1"}]),
        ToolMessage("10", tool_call_id="c1"),
        AIMessage("ten"),
    ]
    assert isinstance(chat.invoke(history), AIMessage)


def test_llm_generate_batches_all_prompts_in_one_engine_call(tiny_config: str) -> None:
    engine = CountingEngine(tiny_config)
    llm = FusedLLM.from_engine(engine)
    result = llm.generate(["the city of", "what is", "the king"])
    assert engine.batch_sizes == [3]
    info = [g[0].generation_info for g in result.generations]
    assert result.llm_output["token_usage"]["completion_tokens"] == sum(
        i["completion_tokens"] for i in info
    )


def test_chat_batch_is_one_engine_call_with_each_inputs_experts(tiny_config: str) -> None:
    engine = CountingEngine(tiny_config)
    chat = ChatFusedLLM.from_engine(engine)
    messages = chat.batch(["a", "b", "c"], [{}, {"tags": ["task:full"]}, {}])
    assert engine.batch_sizes == [3]
    assert [routing(m)["experts"] for m in messages] == [
        ["full", "lora_a", "lora_b"],
        ["full"],
        ["full", "lora_a", "lora_b"],
    ]


def test_llm_batch_routes_each_input_by_its_own_tags_in_one_engine_call(tiny_config: str) -> None:
    engine = CountingEngine(tiny_config)
    llm = FusedLLM.from_engine(engine)
    result = llm.batch(["a", "b", "c"], [{"tags": ["task:full"]}, {}, {"tags": ["task:full"]}])
    assert len(result) == 3
    assert engine.batch_sizes == [3]
    assert engine.experts == [[["full"], ["full", "lora_a", "lora_b"], ["full"]]]


# -- streaming ----------------------------------------------------------------------------------
def test_chat_stream_reports_each_token_to_callbacks_and_ends_with_usage(
    chat: ChatFusedLLM,
) -> None:
    recorder = TokenRecorder()
    chunks = list(chat.stream("the river", config={"callbacks": [recorder]}))
    assert [c.content for c in chunks] == recorder.tokens
    assert chunks[-1].chunk_position == "last"
    assert chunks[-1].usage_metadata["output_tokens"] >= 1
    assert "".join(c.content for c in chunks) == chat.invoke("the river").content


def test_llm_stream_text_equals_invoke_text(llm: FusedLLM) -> None:
    recorder = TokenRecorder()
    pieces = list(llm.stream("the king of", config={"callbacks": [recorder]}))
    assert pieces == recorder.tokens
    assert "".join(pieces) == llm.invoke("the king of")


def test_llm_invoke_streams_to_callbacks_when_streaming(tiny_config: str) -> None:
    recorder = TokenRecorder()
    text = FusedLLM(config_path=tiny_config, streaming=True).invoke(
        "the king of", config={"callbacks": [recorder]}
    )
    assert recorder.tokens and "".join(recorder.tokens) == text


def test_stop_string_cuts_the_output(llm: FusedLLM) -> None:
    full = llm.invoke("the city of")
    stop = full[2:4]
    assert stop and llm.invoke("the city of", stop=[stop]) == full[: full.index(stop)]


# -- async --------------------------------------------------------------------------------------
async def test_ainvoke_leaves_the_event_loop_free(chat: ChatFusedLLM) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    ticks_before = ticks
    message = await chat.ainvoke("the city of")
    task.cancel()
    assert isinstance(message, AIMessage)
    assert ticks > ticks_before + 1  # the loop kept running while the engine decoded


async def test_concurrent_ainvokes_all_complete(chat: ChatFusedLLM) -> None:
    first, second = await asyncio.gather(chat.ainvoke("the city"), chat.ainvoke("the river"))
    assert first.usage_metadata and second.usage_metadata


async def test_astream_and_astream_events_yield_tokens(chat: ChatFusedLLM, llm: FusedLLM) -> None:
    chunks = [c async for c in chat.astream("the king")]
    assert chunks[-1].chunk_position == "last"
    events = [e async for e in chat.astream_events("the king", version="v2")]
    streamed = [e["data"]["chunk"].content for e in events if e["event"] == "on_chat_model_stream"]
    assert "".join(streamed) == "".join(c.content for c in chunks)
    llm_events = [e async for e in llm.astream_events("the king", version="v2")]
    assert any(e["event"] == "on_llm_stream" for e in llm_events)


async def test_llm_ainvoke_streams_tokens_to_astream_events(llm: FusedLLM) -> None:
    async def call_llm(prompt: str, config: RunnableConfig) -> str:
        return await llm.ainvoke(prompt, config)  # invoke, not stream: the handler asks for tokens

    events = [e async for e in RunnableLambda(call_llm).astream_events("the king", version="v2")]
    tokens = [e["data"]["chunk"].text for e in events if e["event"] == "on_llm_stream"]
    (end,) = [e for e in events if e["event"] == "on_llm_end"]
    assert tokens and "".join(tokens) == end["data"]["output"]["generations"][0][0]["text"]


async def test_abatch_returns_one_message_per_input(chat: ChatFusedLLM) -> None:
    messages = await chat.abatch(["a", "b"])
    assert len(messages) == 2 and all(isinstance(m, AIMessage) for m in messages)


# -- routing ------------------------------------------------------------------------------------
def test_bind_task_and_tasks_select_experts(chat: ChatFusedLLM) -> None:
    assert routing(chat.bind(task="full").invoke("x"))["experts"] == ["full"]
    assert routing(chat.bind(tasks=["lora_a", "full"]).invoke("x"))["experts"] == [
        "lora_a",
        "full",
    ]


def test_metadata_and_tags_select_experts(chat: ChatFusedLLM) -> None:
    by_metadata = chat.with_config(metadata={"fusion_tasks": ["lora_a"]}).invoke("x")
    decision = routing(by_metadata)
    assert {key: decision[key] for key in ("experts", "source", "route", "scores")} == {
        "experts": ["lora_a"],
        "source": "metadata",
        "route": ["lora_a"],
        "scores": {},
    }
    assert routing(chat.with_config(tags=["task:lora_b"]).invoke("x"))["experts"] == ["lora_b"]


def test_precedence_call_over_metadata_over_tags(chat: ChatFusedLLM) -> None:
    tagged = chat.with_config(tags=["task:lora_b"], metadata={"fusion_tasks": "lora_a"})
    assert routing(tagged.invoke("x"))["experts"] == ["lora_a"]
    assert routing(tagged.bind(task="full").invoke("x"))["experts"] == ["full"]


def test_outer_metadata_overrides_the_step_metadata(chat: ChatFusedLLM) -> None:
    step = chat.with_config(metadata={"fusion_tasks": ["full"]})
    chain = step | StrOutputParser()
    assert chain.invoke("x")  # routed by the step's own metadata
    message = step.invoke("x", config={"metadata": {"fusion_tasks": ["lora_a"]}})
    assert routing(message)["experts"] == ["lora_a"]


def test_route_none_runs_the_large_model_alone(tiny_config: str) -> None:
    message = ChatFusedLLM(config_path=tiny_config, route="none").invoke("x")
    assert message.response_metadata["experts"] == []
    assert message.response_metadata["fusion_mode"] == "none"


def test_auto_route_reports_gains_of_every_expert(tiny_config: str) -> None:
    message = ChatFusedLLM(config_path=tiny_config).bind(task="auto").invoke("the city of Paris")
    decision = routing(message)
    assert set(decision["scores"]) == {"full", "lora_a", "lora_b"}
    assert decision["experts"] == [n for n in decision["experts"] if decision["scores"][n] > 0]


def test_weight_composition_runs_one_merged_expert(tiny_config: str, tmp_path: Path) -> None:
    chat = ChatFusedLLM(config_path=tiny_config, compose="weights", compose_dir=str(tmp_path))
    message = chat.bind(tasks=["lora_a", "lora_b"]).invoke("the city")
    assert routing(message)["experts"] == ["lora_a", "lora_b"]
    assert message.response_metadata["experts"] == ["lora_a__lora_b"]
    streamed = list(chat.bind(tasks=["lora_a", "lora_b"]).stream("the city"))
    assert "".join(c.content for c in streamed) == message.content
    both = ChatFusedLLM(config_path=tiny_config, compose="both", compose_dir=str(tmp_path))
    message = both.bind(tasks=["lora_a", "lora_b"]).invoke("the city")
    assert message.response_metadata["experts"] == ["lora_a", "lora_b", "lora_a__lora_b"]


def test_unknown_task_is_an_actionable_error(chat: ChatFusedLLM) -> None:
    with pytest.raises(UnknownExpertError, match="a task is named after its expert"):
        chat.bind(task="poetry").invoke("x")


# -- construction, configuration and cache keys -------------------------------------------------
def test_models_from_the_same_config_share_one_engine(tiny_config: str) -> None:
    assert ChatFusedLLM(config_path=tiny_config).engine is FusedLLM.from_config(tiny_config).engine
    assert ChatFusedLLM(config_path=tiny_config).engine is shared_engine(tiny_config)


def test_construction_without_engine_or_config_fails_clearly() -> None:
    with pytest.raises(ValueError, match="engine=.*config_path="):
        ChatFusedLLM()


def test_configurable_fields_keep_the_engine(tiny_config: str) -> None:
    chat = ChatFusedLLM.from_engine(FusionEngine(tiny_config))  # no config_path to rebuild from
    configurable = chat.configurable_fields(
        temperature=ConfigurableField(id="temperature"), route=ConfigurableField(id="route")
    )
    message = configurable.with_config(configurable={"temperature": 0.7, "route": ["full"]}).invoke(
        "x"
    )
    assert routing(message)["experts"] == ["full"]


def test_cache_key_differs_when_experts_differ(tiny_config: str) -> None:
    chat = ChatFusedLLM(config_path=tiny_config)
    assert chat._get_llm_string(task="full") != chat._get_llm_string(task="lora_a")
    routed = [ChatFusedLLM(config_path=tiny_config, route=[name]) for name in ("full", "lora_a")]
    assert routed[0]._get_llm_string() != routed[1]._get_llm_string()
    assert "large" in FusedLLM(config_path=tiny_config)._identifying_params


def test_engine_is_kept_out_of_repr_and_serialisation(chat: ChatFusedLLM) -> None:
    assert "FusionEngine" not in repr(chat)
    assert "engine" not in chat.model_dump()


# -- chat templates, tools and structured output ------------------------------------------------
@pytest.fixture(scope="module")
def tool_chat(tool_config: str) -> ChatFusedLLM:
    return ChatFusedLLM(config_path=tool_config)


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def test_bind_tools_without_tool_template_is_not_implemented(chat: ChatFusedLLM) -> None:
    with pytest.raises(NotImplementedError, match="does not render tools"):
        chat.bind_tools([add])


def test_bound_tools_are_rendered_by_the_chat_template(tool_chat: ChatFusedLLM) -> None:
    plain = tool_chat.invoke("the city")
    with_tools = tool_chat.bind_tools([add]).invoke("the city")
    assert with_tools.response_metadata["prompt_tokens"] > plain.response_metadata["prompt_tokens"]
    assert isinstance(with_tools.tool_calls, list)
    (chunk,) = list(tool_chat.bind_tools([add]).stream("the city"))
    assert chunk.chunk_position == "last" and chunk.content == with_tools.content


def test_without_a_chat_template_messages_become_role_lines(plain_config: str) -> None:
    chat = ChatFusedLLM(config_path=plain_config)
    message = chat.invoke([SystemMessage("be brief"), HumanMessage("the city")])
    rendered = "system: be brief\nuser: the city\nassistant:"
    assert message.response_metadata["prompt_tokens"] == len(
        chat.engine.tokenizer(rendered)["input_ids"]
    )


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>', "", [("add", {"a": 1})]),
        ('ok <tool_call>{"name": "f", "arguments": "{}"}</tool_call>', "ok", [("f", {})]),
        ('{"name": "add", "parameters": {"b": 2}}', "", [("add", {"b": 2})]),
        ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
        ('{"value": 3}', '{"value": 3}', []),
        ("plain words", "plain words", []),
    ],
)
def test_parse_tool_calls(text, content, calls) -> None:
    remaining, parsed = parse_tool_calls(text)
    assert remaining == content
    assert [(c["name"], c["args"]) for c in parsed] == calls
    assert all(c["id"].startswith("call_") for c in parsed)


class Answer(BaseModel):
    value: int


class OptionsRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.options: list[dict[str, Any]] = []

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        self.options.append(kwargs.get("options") or {})


def test_structured_output_validates_the_reply_against_the_schema() -> None:
    replies = iter([AIMessage('{"value": 7}'), AIMessage("not json")])
    model = GenericFakeChatModel(messages=replies)
    recorder = OptionsRecorder()
    parsed = structured_output(model, Answer, include_raw=False).invoke(
        "x", config={"callbacks": [recorder]}
    )
    assert parsed == Answer(value=7)
    assert recorder.options[0]["ls_structured_output_format"]["schema"]["title"] == "Answer"
    raw = structured_output(model, Answer, include_raw=True).invoke("x")
    assert raw["parsed"] is None and raw["parsing_error"] is not None


def test_structured_output_over_the_fused_model_reports_raw_and_errors(
    chat: ChatFusedLLM,
) -> None:
    result = chat.with_structured_output(Answer, include_raw=True).invoke("give a number")
    assert isinstance(result["raw"], AIMessage)
    assert (result["parsed"] is None) != (result["parsing_error"] is None)
