"""Stop strings and streaming deltas."""

from __future__ import annotations

import pytest

from fusion_llm.text import IncrementalText, cut_at_stop, stop_prefix_length
from fusion_llm.tiny import build_tokenizer


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
