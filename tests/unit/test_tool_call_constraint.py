"""`tool_call_constraint`: each tool_choice's grammar, compiled by xgrammar over the tiny family's
real tokenizer, accepts exactly the replies `parse_tool_calls` reads as the choice allows."""

from __future__ import annotations

import json

import pytest
import xgrammar as xgr

from fusion_llm.core.errors import RequestError
from fusion_llm.routing.chat import parse_tool_calls, tool_call_constraint
from fusion_llm.tiny import build_tokenizer

ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
NOW = {"type": "function", "function": {"name": "now", "parameters": {"properties": {}}}}
TOOLS = [ADD, NOW]


def block(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def bare(name: str, arguments: str) -> str:
    return f'{{"name": "{name}", "arguments": {arguments}}}'


ADD_CALL = '{"a": 1, "b": 2}'


@pytest.fixture(scope="module")
def compiler() -> xgr.GrammarCompiler:
    tokenizer = build_tokenizer()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    return xgr.GrammarCompiler(info)


def accepts(compiler: xgr.GrammarCompiler, constraint: dict, text: str) -> bool:
    """Whether `text` is a complete reply under the constraint."""
    assert set(constraint) == {"structural_tag"}
    matcher = xgr.GrammarMatcher(compiler.compile_structural_tag(constraint["structural_tag"]))
    return matcher.accept_string(text) and matcher.is_completed()


@pytest.mark.parametrize(
    ("tool_choice", "blocks", "text", "accepted"),
    [
        # forced: calls only, each valid for its tool's schema
        ("any", True, block("add", ADD_CALL), True),
        ("required", True, block("now", "{}"), True),
        (True, True, block("add", ADD_CALL) + "\n" + block("now", "{}"), True),
        ("any", True, "the answer is 3", False),
        ("any", True, "ok " + block("add", ADD_CALL), False),
        ("any", True, block("add", '{"a": 1}'), False),  # "b" is required
        ("any", True, block("add", '{"a": 1, "b": "two"}'), False),
        ("any", True, block("add", '{"a": 1, "b": 2, "c": 3}'), False),
        ("any", True, block("add", '{"a":  1, "b": 2}'), False),  # a whitespace run
        ("any", True, block("mul", ADD_CALL), False),
        ("any", False, bare("add", ADD_CALL), True),
        ("any", False, bare("now", "{}"), True),
        ("required", False, bare("add", ADD_CALL) + bare("now", "{}"), False),
        # a named tool: exactly one call of it
        ("add", True, block("add", ADD_CALL), True),
        ("add", True, block("now", "{}"), False),
        ("add", True, block("add", ADD_CALL) + "\n" + block("add", ADD_CALL), False),
        ({"type": "function", "function": {"name": "now"}}, True, block("now", "{}"), True),
        ("add", False, bare("add", ADD_CALL), True),
        ("add", False, bare("add", '{"a": 1}'), False),
        ("now", False, "the time", False),
        # auto over blocks: free text, but a started block is a valid call
        ("auto", True, "no call needed", True),
        (None, True, "first " + block("add", ADD_CALL) + " then text", True),
        ("auto", True, "first " + block("add", '{"a": "x"}'), False),
        ("auto", True, "first " + block("mul", ADD_CALL), False),
    ],
)
def test_each_choice_accepts_the_calls_it_allows(
    compiler: xgr.GrammarCompiler, tool_choice, blocks: bool, text: str, accepted: bool
) -> None:
    constraint = tool_call_constraint(TOOLS, tool_choice, blocks)
    assert constraint is not None
    assert accepts(compiler, constraint, text) is accepted
    if accepted and tool_choice not in (None, "auto"):
        assert parse_tool_calls(text)[1], "an accepted forced reply parses as tool calls"


@pytest.mark.parametrize(
    ("tool_choice", "blocks"),
    [("none", True), ("none", False), ("auto", False), (None, False), (False, False)],
)
def test_free_choices_without_blocks_or_with_none_are_unconstrained(tool_choice, blocks) -> None:
    assert tool_call_constraint(TOOLS, tool_choice, blocks) is None


def test_auto_without_tools_is_unconstrained() -> None:
    assert tool_call_constraint([], "auto", blocks=True) is None


def test_the_constraint_is_json_serialisable_and_keeps_the_schema_as_given() -> None:
    constraint = tool_call_constraint([ADD], "add", blocks=True)
    assert json.loads(json.dumps(constraint)) == constraint
    content = constraint["structural_tag"]["format"]["content"]
    assert content["json_schema"] == ADD["function"]["parameters"]


@pytest.mark.parametrize(
    ("tools", "tool_choice", "field"),
    [
        (TOOLS, "mul", "tool_choice"),
        (TOOLS, {"type": "function", "function": {"name": "mul"}}, "tool_choice"),
        (TOOLS, {"type": "function"}, "tool_choice"),
        (TOOLS, 3, "tool_choice"),
        ([], "any", "tool_choice"),
        ([{"type": "web_search"}], "auto", "tools[0]"),
    ],
)
def test_bad_choices_and_tools_are_request_errors_naming_the_field(tools, tool_choice, field):
    with pytest.raises(RequestError, match=field.replace("[", r"\[")) as caught:
        tool_call_constraint(tools, tool_choice, blocks=True)
    if field == "tool_choice" and tools:
        assert "add" in str(caught.value) and "now" in str(caught.value)
