"""Constrained decoding through the LangChain chat model, on the tiny random family.

Random weights write no JSON and no tool call by themselves: every valid object and call here is
the grammar's doing. Schemas and tool arguments are booleans, enums and bounded integers (a
finite language), so the replies complete and end on EOS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_fusion_llm import ChatFusedLLM, FusedLLM
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from fusion_llm import RequestError

pytest_plugins = ["tiny_family"]  # the session fixtures `tiny_config` and `tool_config`

PROMPTS = ["Tell me a joke about cats.", "the king of Rome", "what is three plus seven", "hi"]
# Room for a whole object or call: the tiny tokenizer spends about a token per character, and
# prompt plus reply fit the models' 256-token window.
REPLY_TOKENS = 96
BLOCK_REPLY_TOKENS = 128


class Reading(BaseModel):
    """A reading from a gauge."""

    ok: bool
    level: int = Field(ge=0, le=9)
    colour: Literal["red", "green", "blue"]


class ReadingDict(TypedDict):
    ok: bool
    colour: Literal["red", "green", "blue"]


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class FlipInput(BaseModel):
    flag: bool
    times: int = Field(ge=1, le=3)


@tool(args_schema=FlipInput)
def flip(flag: bool, times: int) -> bool:
    """Flip a flag some times."""
    return flag != bool(times % 2)


class ShortAdd(BaseModel):
    a: int = Field(ge=0, le=99)
    b: int = Field(ge=0, le=99)


@tool(args_schema=ShortAdd)
def small_add(a: int, b: int) -> int:
    """Add two small integers."""
    return a + b


TOOLS = {"add": add, "flip": flip, "small_add": small_add}


@pytest.fixture(scope="module")
def chat(tiny_config: str) -> ChatFusedLLM:
    return ChatFusedLLM(config_path=tiny_config, max_tokens=REPLY_TOKENS)


@pytest.fixture(scope="module")
def tool_chat(tool_config: str) -> ChatFusedLLM:
    return ChatFusedLLM(config_path=tool_config, max_tokens=REPLY_TOKENS)


# Writes calls as <tool_call> blocks; a turn ends with the EOS token (no closing text).
BLOCK_TEMPLATE = (
    "{% if tools %}<s>system: call a tool as <tool_call>JSON</tool_call>: "
    "{% for t in tools %}{{ t['function']['name'] }} {% endfor %}</s>{% endif %}"
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def block_chat(tiny_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    from tiny_family import config_with_template  # after pytest registered it as a plugin

    folder = tmp_path_factory.mktemp("block_family")
    config = config_with_template(tiny_family, folder, BLOCK_TEMPLATE)
    return ChatFusedLLM(config_path=config, max_tokens=BLOCK_REPLY_TOKENS)


def assert_valid_call(call: dict[str, Any], names: set[str]) -> None:
    assert call["name"] in names
    schema = TOOLS[call["name"]].args_schema
    assert schema.model_validate(call["args"]).model_dump() == call["args"]
    assert call["id"].startswith("call_") and call.get("type") == "tool_call"


# -- with_structured_output ---------------------------------------------------------------------
def test_json_schema_output_is_a_valid_instance_with_no_schema_in_the_prompt(
    chat: ChatFusedLLM,
) -> None:
    structured = chat.with_structured_output(Reading, include_raw=True)
    assert chat.with_structured_output(Reading, method="json_schema") is not None
    for prompt in PROMPTS:
        result = structured.invoke(prompt)
        raw, parsed = result["raw"], result["parsed"]
        assert result["parsing_error"] is None and isinstance(parsed, Reading)
        assert Reading.model_validate_json(raw.content) == parsed
        assert raw.response_metadata["finish_reason"] == "eos"
        # Only the user's message is rendered: the grammar, not the prompt, carries the schema.
        assert raw.usage_metadata["input_tokens"] == chat.get_num_tokens_from_messages(
            [HumanMessage(prompt)]
        )


def test_typed_dict_and_json_schema_give_dicts_and_json_mode_any_object(
    chat: ChatFusedLLM,
) -> None:
    as_dict = chat.with_structured_output(ReadingDict).invoke(PROMPTS[0])
    assert set(as_dict) == {"ok", "colour"} and as_dict["colour"] in {"red", "green", "blue"}
    from_schema = chat.with_structured_output(Reading.model_json_schema()).invoke(PROMPTS[1])
    assert Reading.model_validate(from_schema).model_dump() == from_schema
    # json_mode: any object (its strings may run to max_tokens: LangChain's parser closes them)
    plain = chat.with_structured_output(None, method="json_mode", include_raw=True)
    result = plain.invoke(PROMPTS[2])
    assert isinstance(result["parsed"], dict) and result["raw"].content.startswith("{")
    # ... and a schema it is given is described in a system message (the grammar lacks it)
    small = {"title": "Flag", "type": "object", "properties": {"ok": {"type": "boolean"}}}
    described = chat.with_structured_output(small, method="json_mode", include_raw=True)
    raw = described.invoke(PROMPTS[2], max_tokens=8)["raw"]
    assert raw.usage_metadata["input_tokens"] > result["raw"].usage_metadata["input_tokens"]


def test_structured_output_arguments_are_checked(chat: ChatFusedLLM) -> None:
    for kwargs in (
        {"method": "xml"},
        {"method": "json_mode", "strict": True},
        {"method": "json_schema", "tools": []},
    ):
        with pytest.raises(ValueError, match="with_structured_output"):
            chat.with_structured_output(Reading, **kwargs)
    with pytest.raises(ValueError, match="needs a schema"):
        chat.with_structured_output(None)


def test_function_calling_output_is_a_forced_call_parsed_back(tool_chat: ChatFusedLLM) -> None:
    structured = tool_chat.with_structured_output(
        Reading, method="function_calling", include_raw=True
    )
    result = structured.invoke(PROMPTS[0])
    (call,) = result["raw"].tool_calls
    assert call["name"] == "Reading" and isinstance(result["parsed"], Reading)
    assert Reading.model_validate(call["args"]) == result["parsed"]
    strict = tool_chat.with_structured_output(Reading, method="function_calling", strict=True)
    assert isinstance(strict.invoke(PROMPTS[1]), Reading)


def test_the_plain_llm_passes_structured_outputs_and_response_format(tiny_config: str) -> None:
    llm = FusedLLM(config_path=tiny_config, max_tokens=REPLY_TOKENS)
    text = llm.invoke("the king", structured_outputs={"choice": ["yes", "no"]})
    assert text in {"yes", "no"}
    schema = {"name": "colour", "schema": {"enum": ["red", "green", "blue"]}}
    reply = llm.invoke("the king", response_format={"type": "json_schema", "json_schema": schema})
    assert json.loads(reply) in {"red", "green", "blue"}
    streamed = "".join(llm.stream("a b c", structured_outputs={"regex": "[0-9]{3}"}))
    assert len(streamed) == 3 and streamed.isdigit()
    with pytest.raises(RequestError, match="structured_outputs"):
        llm.invoke("the king", structured_outputs={"choice": []})
    assert isinstance(llm.invoke("the king"), str)  # the next call works


# -- bind_tools and tool_choice -----------------------------------------------------------------
@pytest.mark.parametrize("tool_choice", ["any", "required", True])
def test_forced_tool_choice_calls_a_bound_tool_with_valid_arguments(
    tool_chat: ChatFusedLLM, tool_choice: Any
) -> None:
    bound = tool_chat.bind_tools([add, flip], tool_choice=tool_choice)
    for prompt in PROMPTS:
        message = bound.invoke(prompt)
        assert message.tool_calls and message.content == ""
        for call in message.tool_calls:
            assert_valid_call(call, {"add", "flip"})


@pytest.mark.parametrize(
    "tool_choice", ["flip", {"type": "function", "function": {"name": "flip"}}]
)
def test_a_named_tool_choice_calls_that_tool(tool_chat: ChatFusedLLM, tool_choice: Any) -> None:
    bound = tool_chat.bind_tools([add, flip], tool_choice=tool_choice, strict=True)
    strict_schema = bound.kwargs["tools"][1]["function"]["parameters"]
    assert strict_schema["additionalProperties"] is False
    for prompt in PROMPTS[:2]:
        (call,) = bound.invoke(prompt).tool_calls
        assert_valid_call(call, {"flip"})


def test_tool_choice_none_renders_the_tools_and_reads_no_calls(tool_chat: ChatFusedLLM) -> None:
    message = tool_chat.bind_tools([add], tool_choice="none").invoke(PROMPTS[2])
    assert message.tool_calls == [] and isinstance(message.content, str)
    assert message.usage_metadata["input_tokens"] == tool_chat.get_num_tokens_from_messages(
        [HumanMessage(PROMPTS[2])], tools=[add]
    )
    chunks = list(tool_chat.bind_tools([add], tool_choice="none").stream(PROMPTS[2]))
    assert len(chunks) > 1 and all(not c.tool_call_chunks for c in chunks)


def test_an_unbound_tool_choice_is_a_request_error_and_the_next_call_works(
    tool_chat: ChatFusedLLM,
) -> None:
    with pytest.raises(RequestError, match=r"tool_choice='mul'.*add, flip"):
        tool_chat.bind_tools([add, flip], tool_choice="mul")
    bound = tool_chat.bind_tools([add, flip])
    with pytest.raises(RequestError, match="tool_choice"):
        bound.invoke(PROMPTS[0], tool_choice={"type": "function", "function": {"name": "mul"}})
    assert bound.invoke(PROMPTS[0], tool_choice="add").tool_calls[0]["name"] == "add"


def test_a_forced_call_and_a_response_format_together_are_refused(tool_chat: ChatFusedLLM) -> None:
    bound = tool_chat.bind_tools([add], tool_choice="any")
    with pytest.raises(RequestError, match="response_format"):
        bound.invoke(PROMPTS[0], response_format={"type": "json_object"})


def test_streaming_a_forced_call_yields_chunks_that_add_up_to_the_call(
    tool_chat: ChatFusedLLM,
) -> None:
    bound = tool_chat.bind_tools([small_add, flip], tool_choice="small_add")
    (invoked,) = bound.invoke(PROMPTS[1]).tool_calls
    merged = None
    for chunk in bound.stream(PROMPTS[1]):
        assert chunk.tool_call_chunks
        merged = chunk if merged is None else merged + chunk
    (streamed,) = merged.tool_calls
    assert (streamed["name"], streamed["args"]) == (invoked["name"], invoked["args"])
    assert_valid_call(streamed, {"small_add"})


async def test_async_forced_calls(tool_chat: ChatFusedLLM) -> None:
    bound = tool_chat.bind_tools([flip], tool_choice="any")
    (call,) = (await bound.ainvoke(PROMPTS[0])).tool_calls
    assert_valid_call(call, {"flip"})
    chunks = [c async for c in bound.astream(PROMPTS[0])]
    assert [c["name"] for c in chunks[-1].tool_call_chunks] == ["flip"]


def test_a_bound_route_survives_bind_tools(tool_chat: ChatFusedLLM) -> None:
    message = tool_chat.bind(task="full").bind_tools([flip], tool_choice="flip").invoke("hi")
    assert message.response_metadata["experts"] == ["full"]
    assert_valid_call(message.tool_calls[0], {"flip"})


# -- a template that writes <tool_call> blocks --------------------------------------------------
def test_forced_calls_over_a_block_template_are_blocks(block_chat: ChatFusedLLM) -> None:
    for prompt in PROMPTS[:2]:
        message = block_chat.bind_tools([add, flip], tool_choice="any").invoke(prompt)
        # Calls only: what is left of the text is a further block cut by max_tokens, if any.
        assert message.tool_calls
        assert message.content == "" or message.content.startswith("<tool_call>\n{")
        for call in message.tool_calls:
            assert_valid_call(call, {"add", "flip"})


def test_auto_over_a_block_template_allows_text_and_only_valid_calls(
    block_chat: ChatFusedLLM,
) -> None:
    for prompt in PROMPTS:
        message = block_chat.bind_tools([flip]).invoke(prompt)
        # A block the reply completed is a valid call (parsed out of the text).
        assert "</tool_call>" not in message.content
        for call in message.tool_calls:
            assert_valid_call(call, {"flip"})


# -- an agent -----------------------------------------------------------------------------------
def test_an_agent_runs_a_forced_first_call_and_finishes(tool_chat: ChatFusedLLM) -> None:
    agents = pytest.importorskip("langchain.agents")
    middleware = pytest.importorskip("langchain.agents.middleware")

    @middleware.wrap_model_call
    def call_small_add_first(request, handler):
        if not any(isinstance(m, ToolMessage) for m in request.messages):
            request = request.override(tool_choice="small_add")
        return handler(request)

    agent = agents.create_agent(tool_chat, tools=[small_add], middleware=[call_small_add_first])
    messages = agent.invoke({"messages": [HumanMessage("add two numbers")]})["messages"]
    call_message, tool_message, answer = messages[1], messages[2], messages[-1]
    (call,) = call_message.tool_calls
    assert_valid_call(call, {"small_add"})
    assert isinstance(tool_message, ToolMessage)
    assert tool_message.content == str(call["args"]["a"] + call["args"]["b"])
    assert isinstance(answer, AIMessage) and answer.tool_calls == [] and len(messages) == 4
