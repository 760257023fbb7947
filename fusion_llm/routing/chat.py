"""Chat messages across frameworks: role names, and tool calls in generated text.

Both adapters turn their framework's messages into `chat_message(role, content)` dicts, which the
engine renders with each model's chat template; `end_of_turn` finds the text that closes an
assistant turn (a chat reply stops there); `parse_tool_calls` reads tool calls back out of a
reply. No framework is imported here.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Collection
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
