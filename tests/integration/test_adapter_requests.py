"""The LangChain and LlamaIndex adapters do what a request says, or refuse it with a typed error.

Real langchain-core / llama-index-core objects over the tiny real model family: stop strings,
per-input batch outcomes, text-only content, config errors, token counting, structured output
routing, parameter names and the end of a chat turn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, trim_messages
from langchain_fusion_llm import ChatFusedLLM, FusedLLM
from llama_index.core.base.llms.types import ImageBlock, TextBlock
from llama_index.core.llms import ChatMessage
from llama_index.llms.fusion_llm import FusedLLM as IndexLLM
from pydantic import BaseModel

from fusion_llm import ConfigError, ContextWindowError, RequestError, UnknownExpertError
from fusion_llm.routing.chat import end_of_turn
from fusion_llm.routing.client import FusionClient
from fusion_llm.tiny import CHAT_TEMPLATE

pytest_plugins = ["tiny_family"]  # the session fixtures `tiny_config` and `tool_config`

TOO_LONG = "the city of " * 200  # far past the tiny models' 256-token window
SNOWMAN = "\u2603"  # never in the tiny models' output


@pytest.fixture
def llm(tiny_config: str) -> FusedLLM:
    return FusedLLM(config_path=tiny_config)


@pytest.fixture
def chat(tiny_config: str) -> ChatFusedLLM:
    return ChatFusedLLM(config_path=tiny_config)


@pytest.fixture
def index_llm(tiny_config: str) -> IndexLLM:
    return IndexLLM(config_path=tiny_config)


def experts_of(message: AIMessage) -> list[str]:
    return message.response_metadata["routing"]["experts"]


# -- a bare stop string is ONE stop string (issue 10.5) -------------------------------------------
def assert_one_stop_string(generate) -> None:
    """`generate(stop)` -> text: a string stop cuts at the string, never at its first character."""
    full = generate(None)
    assert len(full) >= 3, full
    assert generate(full[1] + SNOWMAN) == full  # split into characters, it would cut at full[1]
    present = full[1:3]
    assert generate(present) == full[: full.index(present)]


def test_a_bare_stop_string_is_one_stop_string_in_every_adapter(tiny_config: str) -> None:
    llm = FusedLLM(config_path=tiny_config)
    assert_one_stop_string(lambda stop: llm.invoke("the city of", stop=stop))
    assert_one_stop_string(
        lambda stop: FusedLLM(config_path=tiny_config, stop=stop).invoke("the city of")
    )
    index_llm = IndexLLM(config_path=tiny_config)
    assert_one_stop_string(lambda stop: index_llm.complete("the city of", stop=stop).text)
    assert_one_stop_string(
        lambda stop: IndexLLM(config_path=tiny_config, stop=stop).complete("the city of").text
    )


def test_a_bare_stop_string_field_is_a_list_of_one(tiny_config: str) -> None:
    assert ChatFusedLLM(config_path=tiny_config, stop="abc").stop == ["abc"]
    assert IndexLLM(config_path=tiny_config, stop="abc").stop == ["abc"]


# -- each batch input gets its own result or its own error (issue 10.5) ---------------------------
class RunRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.ended = 0
        self.errors: list[BaseException] = []

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.ended += 1

    def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        self.errors.append(error)


def test_llm_batch_gives_each_input_its_own_result_or_error(llm: FusedLLM) -> None:
    alone = [llm.invoke("the city of"), llm.invoke("the king")]
    recorder = RunRecorder()
    inputs = ["the city of", TOO_LONG, "the king", "   "]
    outputs = llm.batch(inputs, {"callbacks": [recorder]}, return_exceptions=True)
    assert [outputs[0], outputs[2]] == alone
    assert isinstance(outputs[1], ContextWindowError)
    assert isinstance(outputs[3], RequestError) and "empty or whitespace" in str(outputs[3])
    assert recorder.ended == 2 and recorder.errors == [outputs[1], outputs[3]]
    with pytest.raises(ContextWindowError):
        llm.batch(["the city of", TOO_LONG])


def test_llm_batch_routes_each_input_by_its_own_config(llm: FusedLLM) -> None:
    outputs = llm.batch(
        ["the city of", "the king"],
        [{"tags": ["task:poetry"]}, {"tags": ["task:full"]}],
        return_exceptions=True,
    )
    assert isinstance(outputs[0], UnknownExpertError)
    assert outputs[1] == llm.bind(task="full").invoke("the king")


async def test_llm_abatch_gives_each_input_its_own_result_or_error(llm: FusedLLM) -> None:
    alone = await llm.ainvoke("the king")
    outputs = await llm.abatch([TOO_LONG, "the king"], return_exceptions=True)
    assert isinstance(outputs[0], ContextWindowError) and outputs[1] == alone
    with pytest.raises(ContextWindowError):
        await llm.abatch([TOO_LONG, "the king"])


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


def test_chat_batch_gives_each_input_its_own_result_or_error(chat: ChatFusedLLM) -> None:
    alone = [chat.invoke("the city of").content, chat.invoke("the king").content]
    recorder = RunRecorder()
    inputs = ["the city of", TOO_LONG, [HumanMessage(content=[IMAGE])], "the king"]
    outputs = chat.batch(inputs, {"callbacks": [recorder]}, return_exceptions=True)
    assert [outputs[0].content, outputs[3].content] == alone
    assert isinstance(outputs[1], ContextWindowError)
    assert isinstance(outputs[2], RequestError) and "image_url" in str(outputs[2])
    assert recorder.ended == 2 and recorder.errors == [outputs[1], outputs[2]]
    with pytest.raises(ContextWindowError):
        chat.batch(["the city of", TOO_LONG])


async def test_chat_abatch_gives_each_input_its_own_result_or_error(chat: ChatFusedLLM) -> None:
    alone = (await chat.ainvoke("the king")).content
    outputs = await chat.abatch(["the king", TOO_LONG], return_exceptions=True)
    assert outputs[0].content == alone and isinstance(outputs[1], ContextWindowError)
    with pytest.raises(ContextWindowError):
        await chat.abatch(["the king", TOO_LONG])


# -- the models read text: other content is refused (issue 10.5) ----------------------------------
def test_text_blocks_are_joined(chat: ChatFusedLLM) -> None:
    blocks = HumanMessage(content=[{"type": "text", "text": "the "}, "city"])
    assert chat.get_num_tokens_from_messages([blocks]) == chat.get_num_tokens_from_messages(
        [HumanMessage("the city")]
    )


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([HumanMessage(content=[{"type": "text", "text": "what is this"}, IMAGE])], "'image_url'"),
        ([HumanMessage(content=[{"type": "image", "url": "https://x/y.png"}])], "'image'"),
        (
            [SystemMessage("hi"), HumanMessage(content=[{"type": "audio", "data": "AA"}])],
            r"message 1 \(human\)",
        ),
        ([AIMessage(content=[{"type": "file", "file_id": "f"}]), HumanMessage("x")], "'file'"),
        ([], "no messages"),
    ],
)
def test_langchain_chat_refuses_non_text_content_and_empty_lists(
    chat: ChatFusedLLM, messages: list, fragment: str
) -> None:
    with pytest.raises(RequestError, match=fragment):
        chat.invoke(messages)
    assert chat.invoke("the city").content is not None  # the next call works


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        (
            [
                ChatMessage(
                    role="user", blocks=[TextBlock(text="hi"), ImageBlock(url="https://x/y.png")]
                )
            ],
            "'image'",
        ),
        ([], "no messages"),
    ],
)
def test_llama_index_chat_refuses_non_text_content_and_empty_lists(
    index_llm: IndexLLM, messages: list, fragment: str
) -> None:
    with pytest.raises(RequestError, match=fragment):
        index_llm.chat(messages)
    with pytest.raises(RequestError, match=fragment):
        list(index_llm.stream_chat(messages))
    assert index_llm.chat([ChatMessage(role="user", content="the city")]).message is not None


# -- a missing or invalid config_path is a typed ConfigError naming it (issue 10.4) ---------------
@pytest.mark.parametrize("adapter", [ChatFusedLLM, FusedLLM, IndexLLM])
def test_a_missing_config_path_is_a_config_error_naming_it(adapter, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "fusion.yaml"
    with pytest.raises(ConfigError, match=r"nowhere/fusion\.yaml.*does not exist"):
        adapter(config_path=str(missing))
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("large: {path: x}\nsmall: {path: y}\ntemprature: 1\n")
    with pytest.raises(ConfigError, match="temprature"):
        adapter(config_path=invalid)
    with pytest.raises(ConfigError, match="engine=.*config_path="):
        adapter()


# -- token counting uses the fused models' tokenizer, offline (issue 14.2) ------------------------
MESSAGES = [SystemMessage("be brief"), HumanMessage("the city of Paris")]


def test_token_counts_use_the_fused_models_tokenizer_offline(
    tiny_config: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    chat, llm = ChatFusedLLM(config_path=tiny_config), FusedLLM(config_path=tiny_config)
    tokenizer = chat.engine.tokenizer
    text = "the river Seine runs through Paris"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for model in (chat, llm):
        assert model.get_token_ids(text) == ids
        assert model.get_num_tokens(text) == len(ids)
    rendered = chat.engine.render_chat(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "the city of Paris"},
        ]
    )
    template_count = len(tokenizer(rendered.large, add_special_tokens=False)["input_ids"])
    assert chat.get_num_tokens_from_messages(MESSAGES) == template_count
    assert chat.invoke(MESSAGES).usage_metadata["input_tokens"] == template_count
    (generation,) = llm.generate([llm._convert_input(MESSAGES).to_string()]).generations[0]
    assert llm.get_num_tokens_from_messages(MESSAGES) == generation.generation_info["prompt_tokens"]


def test_trim_messages_counts_with_the_chat_template(chat: ChatFusedLLM) -> None:
    history = [SystemMessage("be brief"), *[HumanMessage(f"the city {i}") for i in range(6)]]
    budget = chat.get_num_tokens_from_messages(history[:3])
    trimmed = trim_messages(history, max_tokens=budget, token_counter=chat, include_system=True)
    assert trimmed[0] == history[0] and 1 < len(trimmed) < len(history)
    assert chat.get_num_tokens_from_messages(trimmed) <= budget


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def test_tool_schemas_count_through_the_template(tool_config: str) -> None:
    chat = ChatFusedLLM(config_path=tool_config)
    with_tool = chat.get_num_tokens_from_messages(MESSAGES, tools=[add])
    assert with_tool > chat.get_num_tokens_from_messages(MESSAGES)
    assert chat.bind_tools([add]).invoke(MESSAGES).usage_metadata["input_tokens"] == with_tool


# -- structured output keeps routing (issue 14.4) --------------------------------------------------
class Answer(BaseModel):
    value: int


def test_structured_output_keeps_the_route_bound_before_or_after(chat: ChatFusedLLM) -> None:
    before = chat.bind(task="full").with_structured_output(Answer, include_raw=True)
    assert experts_of(before.invoke("give a number")["raw"]) == ["full"]
    after = chat.with_structured_output(Answer, include_raw=True).bind(task="lora_a")
    assert experts_of(after.invoke("give a number")["raw"]) == ["lora_a"]
    tagged = chat.with_config(tags=["task:lora_b"]).with_structured_output(Answer, include_raw=True)
    raw = tagged.invoke("give a number")["raw"]
    assert experts_of(raw) == ["lora_b"] and raw.response_metadata["routing"]["source"] == "tags"
    unrouted = chat.with_structured_output(Answer, include_raw=True).invoke("give a number")
    assert experts_of(unrouted["raw"]) == ["full", "lora_a", "lora_b"]


async def test_structured_output_keeps_routing_when_async(chat: ChatFusedLLM) -> None:
    before = chat.bind(task="full").with_structured_output(Answer, include_raw=True)
    after = chat.with_structured_output(Answer, include_raw=True).bind(task="lora_a")
    assert experts_of((await before.ainvoke("give a number"))["raw"]) == ["full"]
    assert experts_of((await after.ainvoke("give a number"))["raw"]) == ["lora_a"]


# -- one name per concept, typos refused with a hint (issue 14.7) --------------------------------
def completion_tokens(llm: FusedLLM, **kwargs: Any) -> int:
    (generation,) = llm.generate(["the city of"], **kwargs).generations[0]
    return generation.generation_info["completion_tokens"]


def test_each_adapter_takes_its_ecosystems_name_and_the_other(tiny_config: str) -> None:
    llm = FusedLLM(config_path=tiny_config, temperature=0)
    assert completion_tokens(llm) > 2  # the tiny models run to max_new_tokens (8) here
    assert completion_tokens(llm, max_tokens=2) == completion_tokens(llm, max_new_tokens=2) == 2
    assert FusedLLM(config_path=tiny_config, max_new_tokens=2).max_tokens == 2
    assert completion_tokens(FusedLLM(config_path=tiny_config, max_new_tokens=2)) == 2
    index_llm = IndexLLM(config_path=tiny_config, max_tokens=2)
    assert index_llm.max_new_tokens == index_llm.metadata.num_output == 2
    assert index_llm.complete("the city of").raw["completion_tokens"] == 2
    plain = IndexLLM(config_path=tiny_config)
    assert plain.complete("the city of", max_tokens=2).raw["completion_tokens"] == 2
    assert plain.complete("the city of", max_new_tokens=2).raw["completion_tokens"] == 2


@pytest.mark.parametrize(
    ("keyword", "fragment"),
    [
        ("max_token", "did you mean 'max_tokens'"),
        ("temprature", "did you mean 'temperature'"),
        ("taks", "did you mean 'task"),
        ("frobnicate", "unknown call keyword 'frobnicate'"),
    ],
)
def test_langchain_call_keyword_typos_are_refused_with_a_hint(
    chat: ChatFusedLLM, llm: FusedLLM, keyword: str, fragment: str
) -> None:
    with pytest.raises(RequestError, match=fragment):
        chat.invoke("the city", **{keyword: 3})
    with pytest.raises(RequestError, match=fragment):
        list(chat.stream("the city", **{keyword: 3}))
    with pytest.raises(RequestError, match=fragment):
        llm.bind(**{keyword: 3}).invoke("the city")
    assert chat.invoke("the city", max_tokens=3).usage_metadata["output_tokens"] <= 3


@pytest.mark.parametrize(
    ("keyword", "fragment"),
    [("max_new_token", "did you mean 'max_new_tokens'"), ("seeds", "did you mean 'seed'")],
)
def test_llama_index_call_keyword_typos_are_refused_with_a_hint(
    index_llm: IndexLLM, keyword: str, fragment: str
) -> None:
    with pytest.raises(RequestError, match=fragment):
        index_llm.complete("the city", **{keyword: 3})
    with pytest.raises(RequestError, match=fragment):
        index_llm.chat([ChatMessage(role="user", content="the city")], **{keyword: 3})


# -- chat replies stop at the end of the assistant turn (issue 14.7) ------------------------------
@pytest.mark.parametrize(
    ("template", "end"),
    [
        (CHAT_TEMPLATE, "\n"),
        (
            "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>\n{% endfor %}",
            "<|end|>\n",
        ),
        ("{% for m in messages %}[{{ m.role }}] {{ m.content }} </s>{% endfor %}", ""),
        ("{% for m in messages %}{{ m.role }}: {{ m.content }}{% endfor %}", ""),
    ],
)
def test_the_end_of_turn_is_what_the_template_writes_after_a_reply(
    chat: ChatFusedLLM, template: str, end: str
) -> None:
    tokenizer = chat.engine.tokenizer

    def render(messages: list[dict[str, Any]]) -> str:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)

    assert end_of_turn(render, tokenizer.all_special_tokens) == end


# A template whose turns end with "e": the tiny random models write no newline, but many an "e".
E_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}e{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def e_config(tiny_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    from tiny_family import config_with_template  # loaded by pytest_plugins by now

    return config_with_template(tiny_family, tmp_path_factory.mktemp("e_family"), E_TEMPLATE)


def test_chat_replies_are_the_continuation_cut_at_the_end_of_the_turn(e_config: str) -> None:
    chat, index_llm = ChatFusedLLM(config_path=e_config), IndexLLM(config_path=e_config)
    engine = chat.engine
    assert FusionClient(engine).chat_stops() == ["e"]
    continuations = []
    for text in ("the city of", "the king", "the river"):
        prompt = engine.render_chat([{"role": "user", "content": text}])
        (continuation,) = engine.generate(prompt)
        continuations.append(continuation.text)
        reply = chat.invoke(text).content
        assert reply == continuation.text.split("e")[0]
        assert "".join(c.content for c in chat.stream(text)) == reply
        assert index_llm.chat([ChatMessage(role="user", content=text)]).message.content == reply
        # A completion is no chat turn: nothing cuts it at "e".
        (completion,) = engine.generate(prompt.large)
        assert index_llm.complete(prompt.large, formatted=True).text == completion.text
    assert any("e" in c for c in continuations)  # the cut happened at least once


def test_tool_template_chat_stops_at_its_end_of_turn(tool_config: str) -> None:
    chat = ChatFusedLLM(config_path=tool_config)
    assert FusionClient(chat.engine).chat_stops() == ["\n"]
    assert "\n" not in chat.bind_tools([add]).invoke("the city of").content
