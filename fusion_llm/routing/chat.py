"""Chat messages across frameworks: role names, and tool calls in generated text.

Both adapters turn their framework's messages into `chat_message(role, content)` dicts, which the
engine renders with each model's chat template; `end_of_turn` finds the text that closes an
assistant turn (a chat reply stops there); `parse_tool_calls` reads tool calls back out of a
reply (`parses_tool_calls`: whether a call's reply is read for them) and `tool_call_constraint` is
the grammar that makes a reply follow a `tool_choice`. No framework is imported here.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Collection, Mapping
from typing import Any

from ..core.errors import RequestError

# Role names of both frameworks -> the role names chat templates expect.
CHAT_ROLES = {
    "system": "system",
    "developer": "system",
    "human": "user",
    "user": "user",
    "ai": "assistant",
    "assistant": "assistant",
    "chatbot": "assistant",
    "model": "assistant",
    "tool": "tool",
    "function": "tool",
}

NO_TOOL_TEMPLATE = (
    "the large model's chat template does not render tools, so the model cannot call them; "
    "use a model whose chat template takes `tools`, or a ReAct-style prompt"
)
TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
TOOL_CALL_TRIGGER = "<tool_call>"
# OpenAI's tool_choice strings; "any" is LangChain's name for "required".
FORCED_TOOL_CHOICES = ("any", "required")
# A reply no template alters (no spaces to trim, no markup to escape), found again after rendering.
REPLY_SENTINEL = "FUSIONLLMREPLYSENTINEL"


def chat_message(role: str, content: str, **extra: Any) -> dict[str, Any]:
    """A chat-template message; `extra` (e.g. tool_calls, tool_call_id, name) is kept when not None."""
    if role not in CHAT_ROLES:
        msg = f"unsupported chat role {role!r}; use one of {', '.join(sorted(CHAT_ROLES))}"
        raise RequestError(msg)
    return {"role": CHAT_ROLES[role], "content": content} | {
        k: v for k, v in extra.items() if v is not None
    }


def non_text_content(kind: str, index: int, role: str) -> RequestError:
    """The error for a content block the models cannot read (an image, audio, a file...)."""
    msg = (
        f"message {index} ({role}) has a {kind!r} content block; fusion-llm models read text "
        "only: send its content as text (text blocks are joined)"
    )
    return RequestError(msg)


def no_messages() -> RequestError:
    return RequestError("no messages given; pass at least one chat message")


def end_of_turn(render: Callable[[list[dict[str, Any]]], str], specials: Collection[str]) -> str:
    """The text a chat template writes after an assistant reply, before the next turn ("" if none).

    `render(messages)` renders a conversation without a generation prompt. The reply text is a
    sentinel; what follows it is the end of the turn. A special token there (e.g. `</s>`) is cut
    with what follows: it never appears in decoded text, and an end-of-turn token that is the
    tokenizer's eos already ends generation.
    """
    rendered = render([chat_message("user", "hi"), chat_message("assistant", REPLY_SENTINEL)])
    if REPLY_SENTINEL not in rendered:
        return ""
    tail = rendered.split(REPLY_SENTINEL, 1)[1]
    cut = min((i for i in (tail.find(s) for s in specials if s) if i >= 0), default=len(tail))
    if cut < len(tail) and not tail[:cut].strip():
        return ""  # the turn ends with a token, not with text
    return tail[:cut]


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """(remaining text, tool calls) from generated text.

    Understands `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes, Qwen)
    and a reply that is one JSON object with `name` and `arguments`/`parameters` (Llama 3.1).
    Each call is `{"name", "args", "id"}`; blocks that are not valid calls stay in the text.
    """
    calls, kept = [], text
    for block in TOOL_CALL_BLOCK.finditer(text):
        call = _tool_call(block.group(1))
        if call is not None:
            calls.append(call)
            kept = kept.replace(block.group(0), "")
    if not calls and (call := _tool_call(text)) is not None:
        return "", [call]
    return kept.strip() if calls else text, calls


def parses_tool_calls(kwargs: Mapping[str, Any]) -> bool:
    """Whether a chat call's reply is read for tool calls: tools offered, tool_choice not "none"."""
    return bool(kwargs.get("tools")) and kwargs.get("tool_choice") != "none"


def _tool_call(candidate: str) -> dict[str, Any] | None:
    try:
        data = json.loads(candidate.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"name": data["name"], "args": args, "id": f"call_{uuid.uuid4().hex[:12]}"}


def tool_call_constraint(
    tools: list[dict[str, Any]], tool_choice: Any, blocks: bool
) -> dict[str, Any] | None:
    """The engine's `structured_outputs` that make a reply follow `tool_choice` (None: free text).

    `tools`: OpenAI function tools, `{"type": "function", "function": {"name", "parameters"}}`
    (parameters as given: strict tools already carry `additionalProperties: false`).
    `blocks`: whether the chat template writes calls as `<tool_call>...</tool_call>` blocks;
    otherwise a call is a reply that is one JSON object. A call is the text `parse_tool_calls`
    reads: `{"name": <tool>, "arguments": <object valid for its parameters>}`, in a block
    `<tool_call>\n{...}\n</tool_call>`; the arguments are single-line JSON (no whitespace runs).

        tool_choice                          blocks=True                       blocks=False
        None, "auto", False                  free text; a started `<tool_call>`  None
                                             must be one valid call (triggered)
        "none"                               None (the caller parses no calls)   None
        "any", "required", True              one or more call blocks, newline-   exactly one call
                                             separated, and nothing else
        a tool name, or {"type": "function", exactly one call block of it      exactly one call of it
          "function": {"name": ...}}

    The result is an xgrammar structural tag `{"structural_tag": {"type": "structural_tag",
    "format": ...}}`. Raises RequestError naming `tool_choice` (and the tools' names) when it
    names no tool in `tools` or is not one of the values above, and when it forces a call
    with no tools.
    """
    calls = {name: _call_format(name, params, blocks) for name, params in _functions(tools)}
    forced = _forced_tools(tool_choice, list(calls))
    if forced is None:
        if not blocks or tool_choice == "none" or not calls:
            return None
        # Text until "<tool_call>", which must then open one call of a bound tool.
        format_ = {
            "type": "triggered_tags",
            "triggers": [TOOL_CALL_TRIGGER],
            "tags": list(calls.values()),
        }
    elif len(forced) == 1:
        format_ = calls[forced[0]]
    elif blocks:
        format_ = {
            "type": "tags_with_separator",
            "tags": [calls[name] for name in forced],
            "separator": "\n",
            "at_least_one": True,
        }
    else:
        format_ = {"type": "or", "elements": [calls[name] for name in forced]}
    return {"structural_tag": {"type": "structural_tag", "format": format_}}


def _functions(tools: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(name, parameters schema) of each function tool."""
    found = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            msg = (
                f"tools[{index}] is not a function tool; give "
                '{"type": "function", "function": {"name": ..., "parameters": {...}}}'
            )
            raise RequestError(msg)
        params = function.get("parameters") or {"type": "object", "properties": {}}
        found.append((function["name"], params))
    return found


def _forced_tools(tool_choice: Any, names: list[str]) -> list[str] | None:
    """The tools one of which the reply must call (None: a call is optional or off)."""
    if tool_choice in (None, False, "auto", "none"):
        return None
    if tool_choice is True or tool_choice in FORCED_TOOL_CHOICES:
        chosen = names
    elif isinstance(tool_choice, str):
        chosen = [tool_choice]
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        chosen = [tool_choice["function"].get("name")]
    else:
        chosen = [None]
    if not chosen or not set(chosen) <= set(names):
        msg = (
            f"tool_choice={tool_choice!r} names no bound tool; bound tools: "
            f"{', '.join(names) or 'none'}; use one of their names, 'auto', 'none', 'any' or "
            "'required' (a forced call needs at least one tool)"
        )
        raise RequestError(msg)
    return chosen


def _call_format(name: str, parameters: dict[str, Any], blocks: bool) -> dict[str, Any]:
    """One call of tool `name` as an xgrammar tag: its name fixed, its arguments by schema."""
    head = f'{{"name": {json.dumps(name)}, "arguments": '
    return {
        "type": "tag",
        "begin": f"{TOOL_CALL_TRIGGER}\n{head}" if blocks else head,
        # At most one whitespace character in a row: a weak model cannot spend its tokens on
        # whitespace runs (single-line JSON, as chat templates write calls).
        "content": {"type": "json_schema", "json_schema": parameters, "max_whitespace_cnt": 1},
        "end": "}\n</tool_call>" if blocks else "}",
    }
