"""JSONL rows for train-expert / gate / eval: both formats, chat rendering, and bad rows by line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusion_llm.core.errors import DataError, FusionError
from fusion_llm.experts.data import Record, read_jsonl, render
from fusion_llm.zoo import MODELS_DIR
from fusion_llm.zoo.tokenizer import load_tokenizer

CHAT = [
    {"role": "user", "content": "Where does Ada live?"},
    {"role": "assistant", "content": "Rome"},
]


def write_lines(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def zoo_tokenizer():
    """The shipped family's tokenizer: its chat template renders `Question: ...\\nAnswer: ...`."""
    return load_tokenizer(MODELS_DIR / "small")


def test_both_formats_are_read_with_their_line_numbers(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path,
        json.dumps({"prompt": "Q: 2+2?\nA:", "completion": " 4", "id": 7}),  # extra keys ignored
        "",
        json.dumps({"messages": CHAT}),
    )
    pair, chat = read_jsonl(path)
    assert (pair.line, pair.prompt, pair.completion, pair.reference) == (
        1,
        "Q: 2+2?\nA:",
        " 4",
        " 4",
    )
    assert (chat.line, chat.messages, chat.reference) == (3, tuple(CHAT), "Rome")
    assert chat.as_json() == {"messages": CHAT}


def test_a_messages_row_renders_as_the_generation_prompt_and_the_answer(zoo_tokenizer) -> None:
    rendered = render(Record(1, messages=tuple(CHAT)), zoo_tokenizer)
    assert rendered.prompt == "<s>Question: Where does Ada live?\nAnswer:"
    assert rendered.completion == " Rome\n"
    assert rendered.add_special_tokens is False  # the template wrote the BOS itself
    plain = render(Record(1, prompt="Question: x\nAnswer:", completion=" y"), zoo_tokenizer)
    assert (plain.prompt, plain.completion, plain.add_special_tokens) == (
        "Question: x\nAnswer:", " y", True,
    )  # fmt: skip


class NoTemplate:
    chat_template = None


def test_a_messages_row_without_a_chat_template_names_its_line() -> None:
    with pytest.raises(
        DataError, match="train.jsonl line 4: a `messages` row needs a chat template"
    ):
        render(Record(4, messages=tuple(CHAT)), NoTemplate(), "train.jsonl")


BAD_ROWS = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "a row must be a JSON object, got list"),
    ('{"text": "hello"}', "the row has neither"),
    (
        '{"prompt": "a", "completion": "b", "messages": []}',
        "the row has both prompt/completion and messages",
    ),
    ('{"prompt": "a"}', "`completion` must be a non-empty string \\(missing\\)"),
    ('{"prompt": "a", "completion": 3}', "`completion` must be a non-empty string \\(got 3\\)"),
    ('{"prompt": "  ", "completion": "b"}', "`prompt` must be a non-empty string"),
    ('{"messages": "hi"}', "`messages` must be a list of at least two messages"),
    (
        '{"messages": [{"role": "user", "content": "q"}]}',
        "`messages` must be a list of at least two",
    ),
    (
        '{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}',
        "messages\\[0\\] must be an object",
    ),
    (
        '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}',
        "the last message must be a non-empty `assistant` message",
    ),
]


@pytest.mark.parametrize(("row", "problem"), BAD_ROWS)
def test_a_bad_row_is_a_data_error_naming_file_and_line(tmp_path: Path, row: str, problem: str):
    good = json.dumps({"prompt": "Q", "completion": " A"})
    path = write_lines(tmp_path, good, good, row)
    with pytest.raises(DataError, match=f"rows.jsonl, line 3: {problem}") as caught:
        read_jsonl(path)
    assert isinstance(caught.value, FusionError) and isinstance(caught.value, ValueError)


def test_an_empty_or_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no rows"):
        read_jsonl(write_lines(tmp_path, "", "  "))
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")
