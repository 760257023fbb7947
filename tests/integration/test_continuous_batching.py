"""Continuous batching: requests join a running batch, leave when their own rows end, and share
steps whatever their sampling parameters and experts; every caller gets its alone-output."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from fusion_llm import DecoderFaultError, FusionEngine
from fusion_llm.tiny import family_config

LONG, SHORT = "the king of Rome", "a river of"


@pytest.fixture(scope="module")
def continuous_engine(tiny_family) -> FusionEngine:
    return FusionEngine(family_config(tiny_family)).load()


def record_batches(model):
    """(prefill batch sizes, step batch sizes) of every forward of `model` from now on."""
    prefills, steps = [], []

    def hook(module, args, kwargs):
        ids = kwargs["input_ids"]
        (prefills if ids.shape[1] > 1 else steps).append(ids.shape[0])

    return prefills, steps, model.register_forward_pre_hook(hook, with_kwargs=True)


def start_long_stream(engine, started: threading.Event, seen: list[str], **kwargs):
    def run() -> None:
        for chunk in engine.stream(LONG, max_new_tokens=60, ignore_eos=True, **kwargs):
            seen.append(chunk.text)
            started.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(60)
    return thread


def test_a_short_request_joins_a_running_batch_and_returns_before_it_ends(continuous_engine):
    short_alone = continuous_engine.generate(SHORT, max_new_tokens=2, ignore_eos=True)[0]
    long_alone = continuous_engine.generate(LONG, max_new_tokens=60, ignore_eos=True)[0]
    prefills, steps, handle = record_batches(continuous_engine.models.large.model)
    started, seen = threading.Event(), []
    try:
        thread = start_long_stream(continuous_engine, started, seen)
        short = continuous_engine.generate(SHORT, max_new_tokens=2, ignore_eos=True)[0]
        long_done_when_short_returned = len(seen)
        thread.join(60)
    finally:
        handle.remove()
    assert short.token_ids == short_alone.token_ids
    assert "".join(seen) == long_alone.text
    assert long_done_when_short_returned < 60  # it did not wait for the long request
    assert prefills == [1, 1] and 2 in steps  # it joined mid-batch: the two shared steps


def test_sampled_calls_with_distinct_seeds_share_steps_and_reproduce_their_alone_outputs(
    continuous_engine,
):
    calls = [
        dict(temperature=0.8, seed=seed, max_new_tokens=8, ignore_eos=True) for seed in range(8)
    ]
    alone = [continuous_engine.generate(LONG, **kw)[0].token_ids for kw in calls]
    prefills, steps, handle = record_batches(continuous_engine.models.large.model)
    try:
        with ThreadPoolExecutor(8) as pool:
            together = list(
                pool.map(lambda kw: continuous_engine.generate(LONG, **kw)[0].token_ids, calls)
            )
    finally:
        handle.remove()
    assert together == alone
    assert max(steps) > 1  # sampled rows decoded together
    assert len({tuple(t) for t in alone}) > 1  # the seeds mattered


def test_rows_of_one_request_sample_with_their_own_seeds(continuous_engine):
    both = continuous_engine.generate([LONG, SHORT], temperature=0.9, seed=11, max_new_tokens=6)
    first = continuous_engine.generate(LONG, temperature=0.9, seed=11, max_new_tokens=6)[0]
    second = continuous_engine.generate([SHORT], temperature=0.9, seed=12, max_new_tokens=6)[0]
    assert [g.token_ids for g in both] == [first.token_ids, second.token_ids]


def test_greedy_and_sampled_calls_share_a_batch(continuous_engine):
    greedy_alone = continuous_engine.generate(SHORT, max_new_tokens=20, ignore_eos=True)[0]
    prefills, steps, handle = record_batches(continuous_engine.models.large.model)
    started, seen = threading.Event(), []
    try:
        thread = start_long_stream(continuous_engine, started, seen, temperature=1.0, seed=3)
        greedy = continuous_engine.generate(SHORT, max_new_tokens=20, ignore_eos=True)[0]
        thread.join(60)
    finally:
        handle.remove()
    assert greedy.token_ids == greedy_alone.token_ids and 2 in steps


def test_each_expert_runs_only_over_the_rows_that_use_it(continuous_engine):
    models = continuous_engine.models
    full_prefills, full_steps, full_hook = record_batches(models.full_experts["full"].model)
    small_prefills, _, small_hook = record_batches(models.small.model)
    try:
        results = continuous_engine.generate(
            [LONG, SHORT, "who is", "seven plus"],
            experts=[["full"], ["lora_a"], [], ["lora_a", "lora_b"]],
            max_new_tokens=4,
            ignore_eos=True,
        )
    finally:
        full_hook.remove()
        small_hook.remove()
    assert full_prefills == [1] and set(full_steps) == {1}
    # The small base for the three fused rows, lora_a for two of them, lora_b for one.
    assert small_prefills == [3 + 2 + 1]
    alone = [
        continuous_engine.generate(p, experts=e, max_new_tokens=4, ignore_eos=True)[0].token_ids
        for p, e in [
            (LONG, ["full"]),
            (SHORT, ["lora_a"]),
            ("who is", []),
            ("seven plus", ["lora_a", "lora_b"]),
        ]
    ]
    assert [r.token_ids for r in results] == alone


def test_a_step_fault_of_a_joined_batch_reruns_each_request_alone_without_repeating_text(
    continuous_engine,
):
    long_alone = continuous_engine.generate(LONG, max_new_tokens=60, ignore_eos=True)[0]
    short_alone = continuous_engine.generate(SHORT, max_new_tokens=5, ignore_eos=True)[0]

    def fail_when_shared(module, args, kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[1] == 1 and ids.shape[0] > 1:  # a step of the shared batch only
            raise RuntimeError("a fault of the shared batch")

    started, seen = threading.Event(), []
    handle = continuous_engine.models.large.model.register_forward_pre_hook(
        fail_when_shared, with_kwargs=True
    )
    try:
        thread = start_long_stream(continuous_engine, started, seen)
        short = continuous_engine.generate(SHORT, max_new_tokens=5, ignore_eos=True)[0]
        thread.join(60)
    finally:
        handle.remove()
    assert short.token_ids == short_alone.token_ids
    assert "".join(seen) == long_alone.text  # replayed steps were not streamed twice


def test_a_joining_request_whose_prefill_fails_leaves_the_running_one_alone(continuous_engine):
    long_alone = continuous_engine.generate(LONG, max_new_tokens=60, ignore_eos=True)[0]
    started, seen = threading.Event(), []

    def fail_prefill(module, args, kwargs):
        if kwargs["input_ids"].shape[1] > 1 and started.is_set():
            raise KeyboardInterrupt

    handle = continuous_engine.models.large.model.register_forward_pre_hook(
        fail_prefill, with_kwargs=True
    )
    try:
        thread = start_long_stream(continuous_engine, started, seen)
        with pytest.raises(DecoderFaultError, match="KeyboardInterrupt"):
            continuous_engine.generate(SHORT, max_new_tokens=5)
        thread.join(60)
    finally:
        handle.remove()
    assert "".join(seen) == long_alone.text
