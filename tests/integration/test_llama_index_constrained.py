"""LlamaIndex structured output and function calling by constrained decoding, on the tiny family.

The tiny models have random weights: only the grammar makes their output a valid instance or a
valid tool call, so these tests assert validity and structure, never content. The schemas keep
every value bounded (enums, small integer ranges, booleans): random weights would otherwise write
a string or a number until `max_new_tokens`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from llama_index.core import PromptTemplate
from llama_index.core.agent.workflow import AgentOutput, FunctionAgent, ToolCall, ToolCallResult
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatStartEvent
from llama_index.core.llms import ChatMessage, ChatResponse, TextBlock
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.program.utils import FlexibleModel
from llama_index.core.tools import FunctionTool
from llama_index.core.types import PydanticProgramMode
from llama_index.core.workflow import StopEvent
from llama_index.llms.fusion_llm import FusedLLM
from pydantic import BaseModel, Field

from fusion_llm.core.errors import RequestError

# The session fixtures `tiny_config`, `tool_config` and `plain_config`.
pytest_plugins = ["tiny_family"]

# Room for a complete reply: the tiny tokenizer spells JSON punctuation byte by byte.
REPLY_TOKENS = 96


class City(BaseModel):
    """A city."""

    name: Literal["Paris", "Rome", "Cairo"]
    rivers: int = Field(ge=0, le=9)
    capital: bool


CITY_PROMPT = PromptTemplate("the city of {topic}")


@pytest.fixture
def llm(tiny_config: str) -> FusedLLM:
    return FusedLLM(config_path=tiny_config, max_new_tokens=REPLY_TOKENS)


@pytest.fixture
def tool_llm(tool_config: str) -> FusedLLM:
    return FusedLLM(config_path=tool_config, max_new_tokens=REPLY_TOKENS)


class ChatStarts(BaseEventHandler):
    """Records the LLM chat calls LlamaIndex instruments (messages and call keywords)."""

    events: list[LLMChatStartEvent] = []

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, LLMChatStartEvent):
            self.events.append(event)


@pytest.fixture
def chat_starts() -> Iterator[ChatStarts]:
    handler, root = ChatStarts(events=[]), get_dispatcher()
    root.add_event_handler(handler)
    yield handler
    root.event_handlers.remove(handler)


# -- structured output: the output class's JSON schema is the grammar -------------------------
def test_structured_predict_is_valid_with_no_schema_in_the_prompt(
    llm: FusedLLM, chat_starts: ChatStarts
) -> None:
    city = llm.structured_predict(City, CITY_PROMPT, topic="Paris")
    assert isinstance(city, City)
    (start,) = chat_starts.events
    prompt_text = " ".join(m.content or "" for m in start.messages)
    assert prompt_text == "the city of Paris"  # no schema, no format instructions
    assert start.additional_kwargs["structured_outputs"]["json"] == City.model_json_schema()


def test_structured_predict_without_a_chat_template_constrains_the_completion(
    plain_config: str,
) -> None:
    llm = FusedLLM(config_path=plain_config, max_new_tokens=REPLY_TOKENS)
    assert not llm.metadata.is_chat_model  # LlamaIndex's program then calls `complete`
    assert isinstance(llm.structured_predict(City, CITY_PROMPT, topic="Rome"), City)


def test_stream_structured_predict_ends_with_a_valid_instance(llm: FusedLLM) -> None:
    partials = list(llm.stream_structured_predict(City, CITY_PROMPT, topic="Rome"))
    assert all(isinstance(p, (City, FlexibleModel)) for p in partials)
    assert isinstance(partials[-1], City)


async def test_async_structured_predict_and_stream(llm: FusedLLM) -> None:
    assert isinstance(await llm.astructured_predict(City, CITY_PROMPT, topic="Rome"), City)
    partials = [p async for p in await llm.astream_structured_predict(City, CITY_PROMPT, topic="x")]
    assert isinstance(partials[-1], City)


def test_as_structured_llm_replies_with_the_instance_and_its_json(llm: FusedLLM) -> None:
    response = llm.as_structured_llm(City).chat([ChatMessage(role="user", content="the river")])
    assert isinstance(response.raw, City)
    assert City.model_validate_json(response.message.content) == response.raw


def test_function_mode_structured_predict_is_a_forced_tool_call(tool_config: str) -> None:
    llm = FusedLLM(
        config_path=tool_config,
        max_new_tokens=REPLY_TOKENS,
        pydantic_program_mode=PydanticProgramMode.FUNCTION,
    )
    assert isinstance(llm.structured_predict(City, CITY_PROMPT, topic="Cairo"), City)


def test_grammar_call_keywords_and_a_bad_grammar(llm: FusedLLM) -> None:
    chat = [ChatMessage(role="user", content="the city")]
    choice = llm.chat(chat, structured_outputs={"choice": ["Paris", "Rome"]})
    assert choice.message.content in {"Paris", "Rome"}
    digits = llm.complete("the number", structured_outputs={"regex": "[0-9]{3}"}).text
    assert len(digits) == 3 and digits.isdigit()
    with pytest.raises(RequestError, match=r"structured_outputs\.regex"):
        llm.complete("the number", structured_outputs={"regex": "("})
    with pytest.raises(RequestError, match="response_format"):
        llm.chat(chat, response_format={"type": "yaml"})
    assert llm.complete("the number", structured_outputs={"choice": ["7"]}).text == "7"


def test_a_grammar_that_shapes_the_whole_reply_is_not_cut_at_the_turn_end(llm: FusedLLM) -> None:
    assert llm.client.chat_stops() == ["\n"]  # the tiny template ends a turn with a newline
    chat = [ChatMessage(role="user", content="the city")]
    reply = llm.chat(chat, structured_outputs={"choice": ["Paris\nRome"]})
    assert reply.message.content == "Paris\nRome"


def test_a_reply_cut_by_max_new_tokens_is_refused_with_the_fix(llm: FusedLLM) -> None:
    with pytest.raises(ValueError, match="not a complete City.*raise max_new_tokens"):
        llm.structured_predict(City, CITY_PROMPT, llm_kwargs={"max_new_tokens": 4}, topic="x")


# -- function calling ------------------------------------------------------------------------
# Argument schemas given explicitly: under postponed annotations LlamaIndex cannot resolve a
# function's `Literal` hints itself.
class AddArgs(BaseModel):
    a: Literal[1, 2, 3]
    b: Literal[1, 2, 3]


class NegateArgs(BaseModel):
    flag: bool


class LookupArgs(BaseModel):
    city: Literal["Paris", "Rome"]
    rivers: bool


def add(a: int, b: int) -> int:
    """Add two small numbers."""
    return a + b


def negate(flag: bool) -> bool:
    """Negate a flag."""
    return not flag


TOOLS = [
    FunctionTool.from_defaults(fn=add, fn_schema=AddArgs),
    FunctionTool.from_defaults(fn=negate, fn_schema=NegateArgs),
]


def the_call(llm: FusedLLM, response: ChatResponse) -> ToolSelection:
    """The reply's one tool call, its arguments checked against the tool's schema."""
    (call,) = llm.get_tool_calls_from_response(response)
    tool = next(t for t in TOOLS if t.metadata.name == call.tool_name)
    tool.metadata.fn_schema.model_validate(call.tool_kwargs)
    return call


def test_function_calling_needs_a_template_that_renders_tools(
    llm: FusedLLM, tool_llm: FusedLLM
) -> None:
    assert tool_llm.metadata.is_function_calling_model
    assert not llm.metadata.is_function_calling_model
    with pytest.raises(RequestError, match="does not render tools"):
        llm.chat_with_tools(TOOLS, user_msg="add", tool_required=True)


def test_tool_required_forces_a_valid_call_of_an_offered_tool(tool_llm: FusedLLM) -> None:
    response = tool_llm.chat_with_tools(TOOLS, user_msg="add one and two", tool_required=True)
    assert the_call(tool_llm, response).tool_name in {"add", "negate"}
    assert response.raw["finish_reason"] == "eos"  # the grammar ended the reply


def test_a_named_tool_choice_is_called_by_every_entry_point(tool_llm: FusedLLM) -> None:
    (chunk,) = tool_llm.stream_chat_with_tools(TOOLS, user_msg="no", tool_choice="negate")
    assert the_call(tool_llm, chunk).tool_name == "negate"
    openai_choice = {"type": "function", "function": {"name": "add"}}
    response = tool_llm.chat_with_tools(TOOLS, user_msg="add", tool_choice=openai_choice)
    assert the_call(tool_llm, response).tool_name == "add"


async def test_async_tool_calls(tool_llm: FusedLLM) -> None:
    response = await tool_llm.achat_with_tools(TOOLS, user_msg="add", tool_choice="add")
    assert the_call(tool_llm, response).tool_name == "add"
    stream = await tool_llm.astream_chat_with_tools(TOOLS, user_msg="no", tool_choice="negate")
    chunks = [chunk async for chunk in stream]
    assert the_call(tool_llm, chunks[-1]).tool_name == "negate"


def test_an_unknown_tool_choice_is_refused_and_the_next_call_works(tool_llm: FusedLLM) -> None:
    with pytest.raises(RequestError, match="tool_choice='multiply'.*add, negate"):
        tool_llm.chat_with_tools(TOOLS, user_msg="x", tool_choice="multiply")
    response = tool_llm.chat_with_tools(TOOLS, user_msg="x", tool_choice="add")
    assert the_call(tool_llm, response).tool_name == "add"


def test_tool_choice_none_reads_no_calls(tool_llm: FusedLLM) -> None:
    response = tool_llm.chat_with_tools(TOOLS, user_msg="add", tool_choice="none")
    assert tool_llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="expected a tool call"):
        tool_llm.get_tool_calls_from_response(response)


def test_predict_and_call_runs_the_forced_call(tool_llm: FusedLLM) -> None:
    answer = tool_llm.predict_and_call([TOOLS[0]], user_msg="add", tool_required=True)
    (source,) = answer.sources
    assert source.tool_name == "add" and not source.is_error
    assert answer.response == str(add(**source.raw_input["kwargs"]))


@pytest.mark.parametrize("streaming", [True, False])
async def test_function_agent_calls_the_forced_tool_and_finishes(
    tool_llm: FusedLLM, streaming: bool
) -> None:
    called: list[dict[str, Any]] = []

    def lookup(city: str, rivers: bool) -> str:
        """Look a city up."""
        called.append({"city": city, "rivers": rivers})
        return "found"

    tool = FunctionTool.from_defaults(fn=lookup, fn_schema=LookupArgs)
    agent = FunctionAgent(
        tools=[tool], llm=tool_llm, initial_tool_choice="lookup", streaming=streaming
    )
    handler = agent.run("look up Paris")
    events = [event async for event in handler.stream_events()]
    output = await handler
    (call,) = [e for e in events if isinstance(e, ToolCall)]
    (result,) = [e for e in events if isinstance(e, ToolCallResult)]
    assert call.tool_name == result.tool_name == "lookup"
    assert called == [call.tool_kwargs]  # the tool ran once, with the arguments of the call
    tool.metadata.fn_schema.model_validate(call.tool_kwargs)
    assert not result.tool_output.is_error and result.tool_output.content == "found"
    assert isinstance(events[-1], StopEvent) and handler.is_done()
    assert isinstance(output, AgentOutput) and output.response.role == "assistant"


# A template that writes tool calls as `<tool_call>` blocks (and a tool's reply with its call id);
# turns end with the eos token, as real templates end them with a special token.
BLOCK_TEMPLATE = (
    "{% if tools %}<s>system: tools {% for t in tools %}{{ t['function']['name'] }} {% endfor %}"
    "\n{% endif %}{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ c['function']['name'] }} "
    "{{ c['function']['arguments'] | tojson }}</tool_call>{% endfor %}"
    "{% if m.get('tool_call_id') %} for {{ m['tool_call_id'] }}{% endif %}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def block_config(tiny_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    from tiny_family import config_with_template  # loaded by pytest_plugins by now

    folder = tmp_path_factory.mktemp("block_family")
    return config_with_template(tiny_family, folder, BLOCK_TEMPLATE)


def test_tool_call_blocks_are_read_and_calls_in_history_are_rendered(block_config: str) -> None:
    llm = FusedLLM(config_path=block_config, max_new_tokens=REPLY_TOKENS)
    first = llm.chat_with_tools(TOOLS, user_msg="add", tool_choice="add")
    call = the_call(llm, first)
    history = [ChatMessage(role="user", content="add"), first.message]
    reply = ChatMessage(
        role="tool", blocks=[TextBlock(text="3")], additional_kwargs={"tool_call_id": call.tool_id}
    )
    second = llm.chat_with_tools(TOOLS, chat_history=[*history, reply], tool_choice="negate")
    assert the_call(llm, second).tool_name == "negate"
    rendered = llm.engine.render_chat(
        [
            {"role": "user", "content": "add"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "type": "function",
                        "id": call.tool_id,
                        "function": {"name": "add", "arguments": call.tool_kwargs},
                    }
                ],
            },
            {"role": "tool", "content": "3", "tool_call_id": call.tool_id},
        ],
        [tool.metadata.to_openai_tool() for tool in TOOLS],
    ).large
    assert f"<tool_call>add {json.dumps(call.tool_kwargs)}</tool_call>" in rendered
    assert second.raw["prompt_tokens"] == len(
        llm.engine.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    )
