"""JSONL rows for training, validation and evaluation, checked line by line.

Two formats, one per row (extra keys are ignored):

    {"prompt": "Question: ...\\nAnswer:", "completion": " 42"}
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "42"}]}

A `messages` row is rendered with a tokenizer's chat template: everything before the last message
(which must be the assistant's) is the prompt, the rest of the rendering the completion. Any bad row
raises `DataError` naming the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import DataError

FORMATS = '{"prompt": str, "completion": str} or {"messages": [{"role", "content"}, ...]}'


@dataclass(frozen=True)
class Record:
    """One checked row: `prompt` + `completion`, or chat `messages` ending with the assistant's."""

    line: int
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[dict[str, str], ...] | None = None

    @property
    def reference(self) -> str:
        """The answer a metric compares with: the completion, or the last message's content."""
        return self.messages[-1]["content"] if self.messages else self.completion  # type: ignore[return-value]

    def as_json(self) -> dict[str, Any]:
        if self.messages:
            return {"messages": list(self.messages)}
        return {"prompt": self.prompt, "completion": self.completion}


@dataclass(frozen=True)
class Rendered:
    """A record as one tokenizer reads it."""

    prompt: str
    completion: str
    add_special_tokens: bool  # False for chat renderings, which carry their own BOS


def read_jsonl(path: str | Path) -> list[Record]:
    """Every row of a JSONL file, checked; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        msg = f"data file {str(path)!r} does not exist; give a JSONL file with one row per line"
        raise DataError(msg)
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if text.strip():
                records.append(_record(path, number, text))
    if not records:
        msg = f"{path}: no rows; write one JSON object per line ({FORMATS})"
        raise DataError(msg)
    return records


def render(record: Record, tokenizer: Any, source: str = "data") -> Rendered:
    """Prompt and completion text of a record for `tokenizer` (its chat template for messages)."""
    if record.messages is None:
        return Rendered(record.prompt, record.completion, True)  # type: ignore[arg-type]
    if not getattr(tokenizer, "chat_template", None):
        msg = (
            f"{source} line {record.line}: a `messages` row needs a chat template, and the small "
            "base's tokenizer has none; write the row as prompt/completion"
        )
        raise DataError(msg)
    messages = list(record.messages)
    prompt = tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt) or len(full) == len(prompt):
        msg = (
            f"{source} line {record.line}: the chat template does not render the conversation as "
            "the generation prompt followed by the assistant's answer; write the row as "
            "prompt/completion"
        )
        raise DataError(msg)
    return Rendered(prompt, full[len(prompt) :], False)


def _record(path: Path, line: int, text: str) -> Record:
    where = f"{path}, line {line}"
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg}); expected {FORMATS}") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    has_pair, has_messages = "prompt" in row or "completion" in row, "messages" in row
    if has_pair == has_messages:
        what = "both prompt/completion and messages" if has_pair else "neither"
        raise DataError(f"{where}: the row has {what}; use one format: {FORMATS}")
    if has_messages:
        return Record(line, messages=_messages(where, row["messages"]))
    for key in ("prompt", "completion"):
        value = row.get(key)
        if not isinstance(value, str) or not value.strip():
            got = "missing" if key not in row else f"got {value!r}"
            raise DataError(f"{where}: `{key}` must be a non-empty string ({got})")
    return Record(line, prompt=row["prompt"], completion=row["completion"])


def _messages(where: str, messages: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or len(messages) < 2:
        msg = f"{where}: `messages` must be a list of at least two messages (the prompt and the answer)"
        raise DataError(msg)
    for index, message in enumerate(messages):
        ok = isinstance(message, dict) and all(
            isinstance(message.get(k), str) for k in ("role", "content")
        )
        if not ok:
            msg = f"{where}: messages[{index}] must be an object with string `role` and `content`"
            raise DataError(msg)
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        msg = f"{where}: the last message must be a non-empty `assistant` message (the answer to learn)"
        raise DataError(msg)
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)
