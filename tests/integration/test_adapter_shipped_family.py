"""The adapters over the shipped model family: chat turns, and LlamaIndex RAG with its defaults.

The embedding model is a real `BaseEmbedding` (words hashed to vectors): deterministic, offline.
"""

from __future__ import annotations

import hashlib
import re
import warnings

import pytest
from langchain_fusion_llm import ChatFusedLLM
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.instrumentation.dispatcher import instrument_tags
from llama_index.core.llms import ChatMessage
from llama_index.llms.fusion_llm import FusedLLM

from fusion_llm.routing.client import FusionClient
from fusion_llm.zoo import zoo_config

DOCUMENTS = [
    Document(text="Paris is on the river Seine."),
    Document(text="Rome is on the river Tiber."),
    Document(text="The miner works in the hills."),
]


class HashEmbedding(BaseEmbedding):
    """Bag of words hashed into 64 dimensions."""

    def _vector(self, text: str) -> list[float]:
        vector = [0.0] * 64
        for word in re.findall(r"\w+", text.lower()):
            vector[int(hashlib.sha256(word.encode()).hexdigest(), 16) % 64] += 1.0
        return vector

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._vector(text)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)


@pytest.fixture(scope="module")
def config() -> dict:
    return zoo_config(["trivia", "math"])


@pytest.fixture
def rag_settings(config: dict):
    previous = Settings._llm, Settings._embed_model  # reading Settings.llm would resolve a default
    Settings.llm, Settings.embed_model = FusedLLM.from_config(config), HashEmbedding()
    yield
    Settings._llm, Settings._embed_model = previous


def test_shipped_chat_replies_stop_at_the_end_of_the_turn(config: dict) -> None:
    chat = ChatFusedLLM.from_config(config, route="none", max_tokens=40)
    engine = chat.engine
    assert FusionClient(engine).chat_stops() == ["\n"]  # "Answer: ...\n" ends a turn
    question = "What is 2 + 3?"
    prompt = engine.render_chat([{"role": "user", "content": question}])
    (continuation,) = engine.generate(prompt, experts=[], max_new_tokens=40)
    # this large base ends its turn by itself (EOS, as its pretraining pages end), before any "\n"
    assert continuation.finish_reason == "eos" and "\n" not in continuation.text
    reply = chat.invoke(question)
    assert reply.content == continuation.text
    assert reply.response_metadata["finish_reason"] == "eos"
    index_llm = FusedLLM.from_config(config, route="none", max_new_tokens=40)
    turn = [ChatMessage(role="user", content=question)]
    assert index_llm.chat(turn).message.content == reply.content


@pytest.mark.parametrize("mode", ["simple_summarize", "tree_summarize"])
def test_query_engines_answer_over_the_shipped_family(rag_settings, mode: str) -> None:
    engine = VectorStoreIndex.from_documents(DOCUMENTS).as_query_engine(response_mode=mode)
    with instrument_tags({"fusion_tasks": ["trivia"]}):
        response = engine.query("Where is Paris?")
    assert isinstance(response.response, str) and response.response.strip()
    assert "Paris" in response.source_nodes[0].node.get_content()


def test_a_window_too_small_for_the_default_query_engine_says_what_to_set(config: dict) -> None:
    with pytest.warns(UserWarning, match='response_mode="simple_summarize"'):
        FusedLLM.from_config(config, context_window=512).metadata  # noqa: B018 - reading it warns


def test_the_default_query_engine_answers_over_the_shipped_family(rag_settings) -> None:
    """LlamaIndex's default `as_query_engine()` (compact/refine) over the shipped family, whose
    models read 1024 tokens: no small-window warning, an answer, and the retrieved sources."""
    assert Settings.llm.client.engine.context_window == 1024
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no small-window warning here
        with instrument_tags({"fusion_tasks": ["trivia"]}):
            response = (
                VectorStoreIndex.from_documents(DOCUMENTS)
                .as_query_engine()
                .query("Where is Paris?")
            )
    assert isinstance(response.response, str) and response.response.strip()
    assert len(response.source_nodes) == 2  # the default similarity_top_k
    assert "Paris" in response.source_nodes[0].node.get_content()
