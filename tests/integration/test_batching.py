"""Concurrent calls share decoding batches and still get exactly their own results."""

from __future__ import annotations

import asyncio
import itertools
from concurrent.futures import ThreadPoolExecutor

import pytest

from fusion_llm import FusionEngine
from fusion_llm.tiny import family_config

WORDS = ["the king", "question: what city", "a river of", "article: Rome", "who is", "seven plus"]
EXPERT_SETS = [["lora_a"], ["lora_b", "full"], [], ["full"], None]


def calls(n):
    """A mix of prompts, expert sets, budgets and stop strings."""
    for i, (prompt, experts) in enumerate(
        itertools.islice(zip(itertools.cycle(WORDS), itertools.cycle(EXPERT_SETS)), n)
    ):
        yield (
            prompt,
            {"experts": experts, "max_new_tokens": 3 + i % 5, "stop": ["e"] if i % 3 == 0 else []},
        )


@pytest.fixture(scope="module")
def batching_engine(tiny_family):
    """Wide collection window so that concurrent calls surely meet."""
    return FusionEngine(family_config(tiny_family, batching={"window_ms": 50})).load()


def count_prefills(engine):
    """Forward calls of the large model that read a prompt (more than one position)."""
    seen = []
    hook = engine.models.large.model.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(kwargs["input_ids"].shape[1] > 1),
        with_kwargs=True,
    )
    return seen, hook


@pytest.mark.slow
def test_concurrent_thread_calls_equal_sequential_calls_and_share_batches(batching_engine):
    work = list(calls(32))
    expected = [batching_engine.generate(p, **kw)[0] for p, kw in work]
    seen, hook = count_prefills(batching_engine)
    try:
        with ThreadPoolExecutor(max_workers=32) as pool:
            results = list(
                pool.map(lambda item: batching_engine.generate(item[0], **item[1])[0], work)
            )
    finally:
        hook.remove()
    for got, want in zip(results, expected, strict=True):
        assert (got.token_ids, got.text, got.finish_reason, got.experts) == (
            want.token_ids, want.text, want.finish_reason, want.experts,
        )  # fmt: skip
    assert sum(seen) < len(work)  # fewer batches than calls: calls were gathered


async def test_concurrent_asyncio_calls_equal_sequential_calls(batching_engine):
    work = list(calls(16))
    expected = [batching_engine.generate(p, **kw)[0].token_ids for p, kw in work]
    results = await asyncio.gather(
        *(asyncio.to_thread(batching_engine.generate, p, **kw) for p, kw in work)
    )
    assert [r[0].token_ids for r in results] == expected


def test_an_abandoned_stream_leaves_its_batch_and_others_finish(batching_engine):
    want = batching_engine.generate("who is", max_new_tokens=20)[0].token_ids
    with ThreadPoolExecutor(max_workers=2) as pool:
        other = pool.submit(batching_engine.generate, "who is", max_new_tokens=20)
        stream = batching_engine.stream("the king", max_new_tokens=200)
        next(stream)
        stream.close()
        assert other.result(timeout=120)[0].token_ids == want
    assert batching_engine.generate("a", max_new_tokens=2)[0].completion_tokens == 2


def test_sampled_calls_with_a_seed_are_not_changed_by_concurrent_calls(batching_engine):
    kwargs = {"temperature": 1.3, "seed": 7, "max_new_tokens": 6}
    alone = batching_engine.generate("the king", **kwargs)[0].token_ids
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(batching_engine.generate, "the king", **kwargs) for _ in range(4)]
        assert all(f.result()[0].token_ids == alone for f in futures)


async def test_native_async_calls_share_batches_and_equal_sequential_calls(batching_engine):
    work = list(calls(24))
    expected = [batching_engine.generate(p, **kw)[0].token_ids for p, kw in work]
    seen, hook = count_prefills(batching_engine)
    try:
        results = await asyncio.gather(*(batching_engine.agenerate(p, **kw) for p, kw in work))
    finally:
        hook.remove()
    assert [r[0].token_ids for r in results] == expected
    assert sum(seen) < len(work)


async def test_cancelling_an_async_stream_frees_the_engine(batching_engine):
    started = asyncio.Event()

    async def consume():
        async for _ in batching_engine.astream("the king", max_new_tokens=200):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    chunks = [c async for c in batching_engine.astream("a river of", max_new_tokens=4)]
    final = [c.generation for c in chunks if c.generation is not None]
    assert final[0].completion_tokens == 4
    assert "".join(c.text for c in chunks) == final[0].text
