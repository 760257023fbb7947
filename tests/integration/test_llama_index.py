"""LlamaIndex adapter over the tiny real model family: real llama-index-core objects throughout."""

from __future__ import annotations

import asyncio
import inspect
import pickle

import pytest
from langchain_fusion_llm import ChatFusedLLM
from llama_index.core import Document, PromptTemplate, Settings, VectorStoreIndex
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.instrumentation.dispatcher import instrument_tags
from llama_index.core.llms import ChatMessage, ChatResponse, CompletionResponse
from llama_index.llms.fusion_llm import FusedLLM

from fusion_llm import FusionEngine

pytest_plugins = ["tiny_family"]  # the session fixture `tiny_config`


@pytest.fixture
def llm(tiny_config: str) -> FusedLLM:
    return FusedLLM(config_path=tiny_config)


CHAT = [
    ChatMessage(role="system", content="be brief"),
    ChatMessage(role="user", content="the city"),
]


def test_metadata_describes_the_large_model(llm: FusedLLM) -> None:
    metadata = llm.metadata
    empty_chat = llm.engine.render_chat(
        [{"role": "system", "content": ""}, {"role": "user", "content": ""}]
    ).large
    template_tokens = len(llm.engine.tokenizer(empty_chat, add_special_tokens=False)["input_ids"])
    assert metadata.context_window == 256 - template_tokens  # 256: the tiny large model's window
    assert metadata.num_output == llm.engine.config.generation.max_new_tokens
    assert metadata.is_chat_model
    assert metadata.model_name.endswith("large")
    explicit = FusedLLM.from_engine(llm.engine, max_new_tokens=3, context_window=100).metadata
    assert (explicit.num_output, explicit.context_window) == (3, 100)


def test_complete_reports_usage_and_routing(llm: FusedLLM) -> None:
    response = llm.complete("the city of")
    usage = response.raw["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert response.raw["routing"]["experts"] == ["full", "lora_a", "lora_b"]
    assert response.raw["finish_reason"] in {"eos", "length", "stop"}


def test_stream_complete_is_a_generator_of_cumulative_text(llm: FusedLLM) -> None:
    stream = llm.stream_complete("the city of")
    assert inspect.isgenerator(stream)
    responses = list(stream)
    assert all(isinstance(r, CompletionResponse) for r in responses)
    assert [r.text for r in responses] == [
        "".join(r.delta for r in responses[: i + 1]) for i in range(len(responses))
    ]
    assert responses[-1].text == llm.complete("the city of").text
    assert responses[-1].raw["usage"]["completion_tokens"] >= 1


def test_closing_a_stream_early_frees_the_engine(llm: FusedLLM) -> None:
    stream = llm.stream_complete("the city of", max_new_tokens=50)
    next(stream)
    stream.close()
    assert llm.complete("the river").text is not None  # would deadlock if the lock were held


def test_chat_and_stream_chat_use_the_chat_template(llm: FusedLLM) -> None:
    response = llm.chat(CHAT)
    assert response.message.role == "assistant"
    streamed = list(llm.stream_chat(CHAT))
    assert all(isinstance(r, ChatResponse) for r in streamed)
    assert streamed[-1].message.content == response.message.content
    engine = llm.engine
    rendered = engine.render_chat(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the city"}]
    )
    assert response.raw["prompt_tokens"] == len(
        engine.tokenizer(rendered.large, add_special_tokens=False)["input_ids"]
    )


def test_call_keywords_route(llm: FusedLLM) -> None:
    assert llm.complete("x", tasks=["full"]).raw["routing"]["experts"] == ["full"]
    assert llm.complete("x", experts="lora_a").raw["routing"]["experts"] == ["lora_a"]
    assert llm.complete("x", tasks="none").raw["experts"] == []


def test_instrument_tags_route_and_call_keywords_win(llm: FusedLLM) -> None:
    with instrument_tags({"fusion_tasks": ["lora_b"]}):
        assert llm.chat(CHAT).raw["routing"]["experts"] == ["lora_b"]
        assert llm.complete("x", task="full").raw["routing"]["experts"] == ["full"]


async def test_async_calls_leave_the_event_loop_free(llm: FusedLLM) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = ticks
    completion = await llm.acomplete("the city of")
    task.cancel()
    assert completion.raw["usage"]["completion_tokens"] >= 1
    assert ticks > before + 1


async def test_async_streams_and_chat(llm: FusedLLM) -> None:
    deltas = [r.delta async for r in await llm.astream_complete("the king")]
    assert "".join(deltas) == (await llm.acomplete("the king")).text
    chat = await llm.achat(CHAT)
    streamed = [r async for r in await llm.astream_chat(CHAT)]
    assert streamed[-1].message.content == chat.message.content


async def test_cancelling_an_async_stream_frees_the_engine(llm: FusedLLM) -> None:
    first_chunk = asyncio.Event()

    async def consume() -> None:
        async for _ in await llm.astream_complete("the city of", max_new_tokens=60):
            first_chunk.set()
            await asyncio.Event().wait()  # never resumes: the task is cancelled here

    task = asyncio.create_task(consume())
    await first_chunk.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    # Generous bound: a held engine lock would hang this call forever.
    completion = await asyncio.wait_for(llm.acomplete("the river"), timeout=120)
    assert completion.raw["usage"]["completion_tokens"] >= 1


def test_pickling_keeps_no_weights_and_restores_the_shared_engine(llm: FusedLLM) -> None:
    data = pickle.dumps(llm)
    assert len(data) < 100_000  # the tiny weights alone are several MB
    assert pickle.loads(data).engine is llm.engine


def test_one_engine_serves_langchain_and_llama_index(tiny_config: str) -> None:
    engine = FusionEngine(tiny_config)
    chat = ChatFusedLLM.from_engine(engine)
    llm = FusedLLM.from_engine(engine)
    assert chat.engine is llm.engine
    assert llm.complete("x").text is not None and chat.invoke("x") is not None


SHORT_QA = PromptTemplate("{context_str}\nQ: {query_str}\nA:")


def test_settings_llm_drives_a_streaming_query_engine(llm: FusedLLM) -> None:
    previous = Settings._llm, Settings._embed_model  # reading Settings.llm would resolve a default
    Settings.llm, Settings.embed_model = llm, MockEmbedding(embed_dim=8)
    try:
        documents = [
            Document(text="Paris is on the river Seine."),
            Document(text="Rome is on the Tiber."),
        ]
        engine = VectorStoreIndex.from_documents(documents).as_query_engine(
            streaming=True,
            similarity_top_k=1,
            # The tiny model reads 256 tokens: a short template, and no refine step (it reserves 256).
            text_qa_template=SHORT_QA,
            response_mode="simple_summarize",
        )
        with instrument_tags({"fusion_tasks": ["full"]}):
            response = engine.query("where is Paris")
            text = "".join(response.response_gen)
        assert isinstance(text, str)
    finally:
        Settings._llm, Settings._embed_model = previous
