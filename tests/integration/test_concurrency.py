"""64 concurrent LangChain calls, mixed experts and routing: each gets what it gets alone."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from langchain_fusion_llm import ChatFusedLLM, FusedLLM

from fusion_llm import FusionEngine
from fusion_llm.tiny import family_config

pytestmark = pytest.mark.slow

PROMPTS = ["the king", "question: what city", "a river of", "article: Rome", "who is", "seven plus"]
ROUTES = [
    ("bind", {"task": "lora_a"}),
    ("bind", {"tasks": ["lora_b", "full"]}),
    ("metadata", {"fusion_tasks": ["full"]}),
    ("tags", ["task:lora_b"]),
    ("route", "none"),
    ("route", "auto"),
    ("stop", ["e"]),
]


def runnable(llm, how, value):
    if how == "bind":
        return llm.bind(**value)
    if how == "metadata":
        return llm.with_config(metadata=value)
    if how == "tags":
        return llm.with_config(tags=value)
    if how == "route":
        return llm.model_copy(update={"route": value})
    return llm.bind(stop=value)


def work(llm, n=64):
    return [(runnable(llm, *ROUTES[i % len(ROUTES)]), PROMPTS[i % len(PROMPTS)]) for i in range(n)]


def test_64_thread_pool_invokes_equal_the_same_calls_one_by_one(tiny_family):
    engine = FusionEngine(family_config(tiny_family, batching={"window_ms": 20}))
    llm = FusedLLM.from_engine(engine, max_tokens=6)
    calls = work(llm)
    expected = [r.invoke(p) for r, p in calls]
    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(lambda call: call[0].invoke(call[1]), calls))
    assert results == expected


async def test_64_concurrent_chat_ainvokes_equal_the_same_calls_one_by_one(tiny_family):
    engine = FusionEngine(family_config(tiny_family, batching={"window_ms": 20}))
    chat = ChatFusedLLM.from_engine(engine, max_tokens=6)
    calls = work(chat)
    expected = [r.invoke(p) for r, p in calls]
    results = await asyncio.gather(*(r.ainvoke(p) for r, p in calls))
    assert [m.content for m in results] == [m.content for m in expected]
    assert [m.response_metadata.get("experts") for m in results] == [
        m.response_metadata.get("experts") for m in expected
    ]
