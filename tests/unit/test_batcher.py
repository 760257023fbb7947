"""The continuous batcher over scripted LMs (no model): rows join mid-decode and leave at their
own steps, a cancelled request leaves at the next step, faults stay with their request; every
caller gets exactly the tokens its rows decode alone."""

from __future__ import annotations

import threading

import pytest
import torch
from scripted_lm import ScriptedLM, continuation, loaded

from fusion_llm.core.config import GenerationSpec
from fusion_llm.core.errors import DecoderFaultError, NumericalFaultError
from fusion_llm.core.fusion import make_solver
from fusion_llm.runtime.batcher import ContinuousBatcher
from fusion_llm.runtime.models import BASE_ADAPTER, ModelSet
from fusion_llm.runtime.request import DONE, PromptBatch, Request

# Experts shift the script's next token; fused under `static` with alpha 1 over a small base that
# says what the large model says, a row follows its expert's script.
FULL_OFFSET, LORA_OFFSET = 1, 2
GUILTY = 13  # a prompt token that makes the faulty models misbehave


class Caller:
    """One request's events, as the engine would read them."""

    def __init__(self, on_event=None):
        self.events: list[object] = []
        self.ended = threading.Event()
        self.on_event = on_event  # called with each item, on the decoder thread

    def put(self, item: object) -> None:
        self.events.append(item)
        if self.on_event is not None:
            self.on_event(item)
        if item is DONE or isinstance(item, Exception):
            self.ended.set()

    def tokens(self) -> dict[int, list[int]]:
        """Per row index, the tokens delivered."""
        rows: dict[int, list[int]] = {}
        for item in self.events:
            if isinstance(item, list):
                for event in item:
                    rows.setdefault(event.row, []).append(event.token)
        return rows

    def wait(self) -> object:
        assert self.ended.wait(30), "the caller was left waiting"
        return self.events[-1]


def model_set() -> ModelSet:
    small = ScriptedLM(adapter_offsets={BASE_ADAPTER: 0, "expert0": LORA_OFFSET})
    return ModelSet(
        large=loaded(ScriptedLM()),
        small=loaded(small, "small base"),
        full_experts={"full": loaded(ScriptedLM(offset=FULL_OFFSET), "expert 'full'")},
        lora_experts={"lora": "expert0"},
        vocab_size=17,
    )


def request(prompts, new_tokens: int, experts=None, **spec) -> Request:
    experts = experts or [[] for _ in prompts]
    used = list(dict.fromkeys(e for names in experts for e in names))
    return Request(
        tokens=PromptBatch(large=prompts, small=prompts),
        experts=used,
        mode="static" if used else "none",
        spec=GenerationSpec(max_new_tokens=new_tokens, **spec),
        eos_ids=set(),
        row_experts=experts,
    )


@pytest.fixture
def models() -> ModelSet:
    return model_set()


@pytest.fixture
def batcher(models):
    decoder = ContinuousBatcher(
        lambda: models,
        lambda mode, experts: make_solver(mode, torch.ones(len(experts))),
        threading.RLock(),
        window_s=1.0,  # calls submitted together surely meet
        max_rows=8,
        idle_s=1.0,
    )
    yield decoder
    decoder.stop()


def test_start_runs_the_decoder_thread_before_the_first_request(batcher):
    before = set(threading.enumerate())
    batcher.start()
    started = set(threading.enumerate()) - before
    assert [t.name for t in started] == ["fusion-llm-decoder"]


def test_rows_leave_at_their_own_steps_and_every_caller_gets_its_alone_tokens(batcher, models):
    prompts = {3: [[3, 4]], 1: [[5]], 5: [[6, 7, 8], [9]]}  # by max_new_tokens
    callers = {n: Caller() for n in prompts}
    for n, rows in prompts.items():
        batcher.submit(request(rows, n), callers[n].put)
    for n, caller in callers.items():
        assert caller.wait() is DONE
        assert caller.tokens() == {i: continuation(p, n) for i, p in enumerate(prompts[n])}
    prefills = [rows for rows, width in models.large.model.forwards if width > 1]
    steps = [rows for rows, width in models.large.model.forwards if width == 1]
    assert prefills == [4]
    assert steps == [3, 3, 2, 2]  # each row leaves after its last token: it reads no more


def test_a_request_joins_a_running_batch_and_returns_before_it_ends(batcher, models):
    long_tokens_when_short_ended: list[int] = []

    def record_long_progress(item: object) -> None:
        if item is DONE:
            long_tokens_when_short_ended.append(len(long.tokens()[0]))

    short = Caller(record_long_progress)

    def join_at_third_token(item: object) -> None:
        if isinstance(item, list) and len(long.tokens()[0]) == 3:
            batcher.submit(request([[2, 2, 2]], 2), short.put)

    long = Caller(join_at_third_token)
    batcher.submit(request([[4, 1]], 10), long.put)
    assert short.wait() is DONE and long.wait() is DONE
    assert short.tokens() == {0: continuation([2, 2, 2], 2)}
    assert long.tokens() == {0: continuation([4, 1], 10)}
    assert long_tokens_when_short_ended == [5]  # it joined after token 3 and left after 2 more
    prefills = [rows for rows, width in models.large.model.forwards if width > 1]
    steps = [rows for rows, width in models.large.model.forwards if width == 1]
    assert prefills == [1, 1] and steps == [1, 1, 1, 2, 1, 1, 1, 1, 1]


def test_rows_with_experts_fuse_only_their_own_while_others_join_and_leave(batcher, models):
    second = Caller()

    def join_at_second_token(item: object) -> None:
        if isinstance(item, list) and len(first.tokens()[0]) == 2 and not second.events:
            batcher.submit(request([[8, 9, 10]], 3, experts=[["lora"]]), second.put)

    first = Caller(join_at_second_token)
    batcher.submit(
        request([[3, 4], [5, 1], [6, 7]], 6, experts=[["full"], ["lora"], []]), first.put
    )
    assert first.wait() is DONE and second.wait() is DONE
    assert first.tokens() == {
        0: continuation([3, 4], 6, FULL_OFFSET),
        1: continuation([5, 1], 6, LORA_OFFSET),
        2: continuation([6, 7], 6),
    }
    assert second.tokens() == {0: continuation([8, 9, 10], 3, LORA_OFFSET)}
    # Slots of the small base's forwards: the base for the two fused rows, LoRA for one; then the
    # joining row's base and LoRA prefilled (2), running with them (5) until it leaves (3).
    assert [rows for rows, _ in models.small.model.forwards] == [3, 3, 3, 2, 5, 5, 3]
    assert {rows for rows, _ in models.full_experts["full"].model.forwards} == {1}


def test_a_cancelled_request_leaves_at_the_next_step(batcher, models):
    kept = Caller()

    def cancel_after_two(item: object) -> None:
        if len(gone.tokens().get(0, [])) == 2:
            submission.cancelled.set()

    gone = Caller(cancel_after_two)
    submission = batcher.submit(request([[3, 1]], 20), gone.put)
    batcher.submit(request([[4, 1]], 5), kept.put)
    assert kept.wait() is DONE
    assert gone.tokens() == {0: continuation([3, 1], 2)}
    assert kept.tokens() == {0: continuation([4, 1], 5)}
    steps = [rows for rows, width in models.large.model.forwards if width == 1]
    assert steps == [2, 2, 1, 1]  # read the second token, then out before sampling a third


def raise_on_guilty_step(step: int):
    """A forward that raises once the guilty row has `step` tokens after its prompt [GUILTY]."""

    def fault(attended: list[list[int]]) -> None:
        if any(ids[0] == GUILTY and len(ids) > step for ids in attended):
            raise RuntimeError("kernel failed")

    return fault


@pytest.mark.parametrize("step", [0, 3], ids=["in the shared prefill", "in a shared step"])
def test_a_raising_forward_fails_only_the_request_that_caused_it(batcher, models, step):
    models.large.model.fault = raise_on_guilty_step(step)
    guilty, innocent = Caller(), Caller()
    batcher.submit(request([[GUILTY]], 6), guilty.put)
    batcher.submit(request([[4, 5]], 6), innocent.put)
    error = guilty.wait()
    assert isinstance(error, DecoderFaultError) and "kernel failed" in str(error)
    assert innocent.wait() is DONE
    assert innocent.tokens() == {0: continuation([4, 5], 6)}  # once each: replays are skipped
    if step:
        assert guilty.tokens() == {0: continuation([GUILTY], step)}
    models.large.model.fault = None
    again = Caller()
    batcher.submit(request([[GUILTY]], 2), again.put)
    assert again.wait() is DONE


def test_a_row_without_a_finite_logit_fails_its_own_request_only(batcher, models):
    models.large.model.poisoned = lambda attended: attended[0] == GUILTY
    guilty, innocent = Caller(), Caller()
    batcher.submit(request([[GUILTY]], 4), guilty.put)
    batcher.submit(request([[4, 5]], 4), innocent.put)
    assert isinstance(guilty.wait(), NumericalFaultError)
    assert innocent.wait() is DONE
    assert innocent.tokens() == {0: continuation([4, 5], 4)}


def test_a_request_larger_than_max_rows_is_decoded_in_parts(models):
    batcher = ContinuousBatcher(lambda: models, lambda m, e: None, threading.RLock(), 0.0, 2)
    prompts = [[i + 1] for i in range(5)]
    caller = Caller()
    batcher.submit(request(prompts, 3), caller.put)
    assert caller.wait() is DONE
    batcher.stop()
    assert caller.tokens() == {i: continuation(p, 3) for i, p in enumerate(prompts)}
    assert max(rows for rows, _ in models.large.model.forwards) == 2
