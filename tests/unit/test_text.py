"""Stop strings and streaming deltas."""

from __future__ import annotations

from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_llm.core.text import REPLACEMENT_CHAR, IncrementalText, cut_at_stop, stop_prefix_length
from fusion_llm.tiny import build_tokenizer as build_fresh_tokenizer

build_tokenizer = cache(build_fresh_tokenizer)  # training the tiny BPE once is enough


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("hello STOP world", ["STOP"], "hello "),
        ("a b c", ["x"], "a b c"),
        ("one. two### three", ["###", "."], "one"),
        ("", ["x"], ""),
    ],
)
def test_cut_at_stop(text, stops, expected):
    assert cut_at_stop(text, stops) == expected


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("hello ST", ["STOP"], 2),
        ("hello", ["STOP"], 0),
        ("a #", ["###", "#!"], 1),
        ("xS", ["S"], 0),
    ],
)
def test_stop_prefix_length(text, stops, expected):
    assert stop_prefix_length(text, stops) == expected


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_streamed_deltas_never_show_a_stop_string_and_add_up_to_the_text(tokenizer):
    ids = tokenizer("the king STOP of Rome")["input_ids"]
    text = IncrementalText(tokenizer, ["STOP"], eos_ids=set())
    deltas = [text.push(i) for i in ids] + [text.finish()]
    assert "".join(deltas) == text.final_text() == "the king "
    assert all("S" not in d for d in deltas)


def test_eos_is_not_part_of_the_text(tokenizer):
    eos = tokenizer.eos_token_id
    text = IncrementalText(tokenizer, [], eos_ids={eos})
    for i in [*tokenizer("the river")["input_ids"], eos]:
        text.push(i)
    text.finish()
    assert text.final_text() == "the river"


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    ids=st.lists(st.integers(min_value=0, max_value=319), min_size=1, max_size=40),
    stops=st.lists(st.sampled_from(["e", "the", " k", "ng o", "\n", "é"]), max_size=2),
)
def test_incremental_streaming_adds_up_to_the_full_decode_cut_at_the_first_stop(ids, stops):
    tokenizer = build_tokenizer()
    text = IncrementalText(tokenizer, stops, eos_ids={tokenizer.eos_token_id})
    deltas = [text.push(i) for i in ids] + [text.finish()]
    full = tokenizer.decode(
        [i for i in ids if i != tokenizer.eos_token_id], skip_special_tokens=True
    )
    assert "".join(deltas) == text.final_text() == cut_at_stop(full, stops)
    released = ""
    for delta in deltas[:-1]:
        released += delta
        assert not any(s in released for s in stops)


def test_multi_byte_characters_are_released_whole(tokenizer):
    ids = tokenizer("café ünïcode 日本")["input_ids"]
    text = IncrementalText(tokenizer, [], eos_ids=set())
    deltas = [text.push(i) for i in ids] + [text.finish()]
    assert "".join(deltas) == "café ünïcode 日本"
    assert not any(REPLACEMENT_CHAR in d for d in deltas)
