"""Faults injected into real forwards stay with the request that caused them.

Each case: request A (guilty) and request B (innocent) are submitted together and decoded as one
merged batch (a long batching window, checked by the batch size the large model saw); A gets a
typed error, B gets exactly the output it gets alone, and the next call works.
"""

from __future__ import annotations

import threading
import time

import pytest

from fusion_llm import DecoderFaultError, FusionEngine, NumericalFaultError
from fusion_llm.tiny import family_config

GUILTY, INNOCENT = "zq zq the queen of Rome", "the king"


@pytest.fixture(scope="module")
def merging_engine(tiny_family) -> FusionEngine:
    """Two LoRA experts and a full one; concurrent calls within 300 ms share one batch."""
    config = family_config(tiny_family)
    config["batching"] = {"window_ms": 300}
    return FusionEngine(config).load()


def marker(engine: FusionEngine) -> int:
    """A token id of the guilty prompt that the innocent prompt lacks."""
    tokenize = engine.tokenizer
    return min(set(tokenize(GUILTY)["input_ids"]) - set(tokenize(INNOCENT)["input_ids"]))


def prefill_hook(engine: FusionEngine, model, action):
    """`action(logits_or_none, guilty_rows)` on every prefill forward of `model` that sees the marker;
    records the prefill batch sizes. Returns (handle, sizes)."""
    token, sizes = marker(engine), []

    def hook(module, args, kwargs, output):
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1:  # prefill
            sizes.append(ids.shape[0])
            rows = (ids == token).any(dim=1)
            if rows.any():
                action(output, rows)
        return output

    return model.register_forward_hook(hook, with_kwargs=True), sizes


def run_together(engine: FusionEngine, **kwargs) -> dict[str, object]:
    """Generate GUILTY and INNOCENT from two threads at once; each's result or exception."""
    outcome: dict[str, object] = {}

    def call(prompt: str) -> None:
        try:
            outcome[prompt] = engine.generate(prompt, max_new_tokens=6, **kwargs)[0]
        except BaseException as err:  # noqa: BLE001 - the test inspects what each caller got
            outcome[prompt] = err

    threads = [threading.Thread(target=call, args=(p,)) for p in (GUILTY, INNOCENT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    return outcome


def raising(exception: BaseException):
    def action(output, rows):
        raise exception

    return action


@pytest.mark.parametrize(
    "exception",
    [SystemExit(3), KeyboardInterrupt(), RuntimeError("kernel failed"), MemoryError()],
    ids=["SystemExit", "KeyboardInterrupt", "RuntimeError", "MemoryError"],
)
@pytest.mark.parametrize("model", ["large", "small"])
def test_an_exception_in_one_requests_forward_fails_only_that_request(
    merging_engine, exception, model
):
    alone = merging_engine.generate(INNOCENT, max_new_tokens=6)[0]
    target = getattr(merging_engine.models, model).model
    handle, sizes = prefill_hook(merging_engine, target, raising(exception))
    try:
        outcome = run_together(merging_engine)
    finally:
        handle.remove()
    rows_per_request = 1 if model == "large" else 3  # the small base and two LoRA rows
    assert sizes[0] == 2 * rows_per_request, f"the requests were not merged ({sizes})"
    assert isinstance(outcome[GUILTY], DecoderFaultError)
    assert type(exception).__name__ in str(outcome[GUILTY])
    assert outcome[INNOCENT].token_ids == alone.token_ids
    assert merging_engine.generate(INNOCENT, max_new_tokens=6)[0].token_ids == alone.token_ids


def test_the_decoder_comes_back_after_every_call_raised_a_base_exception(merging_engine):
    def always(module, args):
        raise SystemExit("forward killed")

    handle = merging_engine.models.large.model.register_forward_pre_hook(always)
    try:
        for _ in range(3):
            with pytest.raises(DecoderFaultError, match="SystemExit"):
                merging_engine.generate(INNOCENT, max_new_tokens=2)
    finally:
        handle.remove()
    started = time.monotonic()
    assert merging_engine.generate(INNOCENT, max_new_tokens=2)[0].completion_tokens == 2
    assert time.monotonic() - started < 60  # a hang would never return; not a timing target


@pytest.mark.parametrize("mode", ["none", "static", "dynamic"])
def test_a_row_without_finite_large_logits_fails_only_its_own_request(merging_engine, mode):
    alone = merging_engine.generate(INNOCENT, max_new_tokens=6, mode=mode)[0]

    def poison(output, rows):
        output.logits[rows] = float("nan")

    handle, sizes = prefill_hook(merging_engine, merging_engine.models.large.model, poison)
    try:
        outcome = run_together(merging_engine, mode=mode)
    finally:
        handle.remove()
    assert 2 in sizes, f"the requests were not merged (prefill batch sizes {sizes})"
    assert isinstance(outcome[GUILTY], NumericalFaultError)
    assert outcome[INNOCENT].token_ids == alone.token_ids
    assert outcome[INNOCENT].fallback_steps == []


def test_a_streaming_caller_keeps_its_text_when_another_request_faults(merging_engine):
    alone = merging_engine.generate(INNOCENT, max_new_tokens=6)[0]
    handle, sizes = prefill_hook(
        merging_engine, merging_engine.models.small.model, raising(RuntimeError("boom"))
    )
    streamed: list[str] = []
    errors: list[BaseException] = []

    def stream_innocent() -> None:
        streamed.extend(c.text for c in merging_engine.stream(INNOCENT, max_new_tokens=6))

    def generate_guilty() -> None:
        try:
            merging_engine.generate(GUILTY, max_new_tokens=6)
        except DecoderFaultError as err:
            errors.append(err)

    threads = [threading.Thread(target=f) for f in (stream_innocent, generate_guilty)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        handle.remove()
    assert sizes[0] == 6 and len(errors) == 1  # merged: 2 requests x (small base + 2 LoRA rows)
    assert "".join(streamed) == alone.text


def test_a_request_larger_than_max_rows_is_decoded_in_parts(tiny_family):
    config = family_config(tiny_family)
    config["batching"] = {"max_rows": 4}
    engine = FusionEngine(config).load()
    prompts = [f"the king {i}" for i in range(10)]
    sizes: list[int] = []
    handle = engine.models.large.model.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        results = engine.generate(prompts, max_new_tokens=3)
    finally:
        handle.remove()
    assert max(sizes) <= 4
    one_by_one = [engine.generate(p, max_new_tokens=3)[0].token_ids for p in prompts]
    assert [r.token_ids for r in results] == one_by_one
