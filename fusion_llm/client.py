"""What the LangChain and LlamaIndex adapters share: one engine per config, chat messages in the
engine's format, routed generation and the metadata they report. Imports neither framework.

An adapter translates its framework's messages and parameters into a `FusionClient` call and the
`RoutedGeneration`s back into framework objects; the client routes (see `router.py`), groups rows
that share experts into one engine batch each, and runs the engine.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .compose import WeightComposer
from .config import FusionConfig
from .engine import FusionEngine, FusionPrompt, Generation, StreamChunk
from .errors import RequestError
from .router import Route, RoutingDecision, TaskRouter

T = TypeVar("T")

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
COMPOSE_MODES = ("logits", "weights")
TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)

_engines: dict[str, FusionEngine] = {}
_engines_lock = threading.Lock()


def shared_engine(config: FusionConfig | dict[str, Any] | str | Path) -> FusionEngine:
    """The engine of a config, shared by every adapter built from an equal config (lazy: cheap)."""
    resolved = FusionConfig.load(
        str(Path(config).resolve()) if isinstance(config, (str, Path)) else config
    )
    key = resolved.model_dump_json()
    with _engines_lock:
        if key not in _engines:
            _engines[key] = FusionEngine(resolved)
        return _engines[key]


def chat_message(role: str, content: str, **extra: Any) -> dict[str, Any]:
    """A chat-template message; `extra` (e.g. tool_calls, tool_call_id, name) is kept when not None."""
    if role not in CHAT_ROLES:
        msg = f"unsupported chat role {role!r}; use one of {', '.join(sorted(CHAT_ROLES))}"
        raise RequestError(msg)
    return {"role": CHAT_ROLES[role], "content": content} | {
        k: v for k, v in extra.items() if v is not None
    }


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


@dataclass
class RoutedGeneration:
    """One prompt's generation and the routing decision it ran under."""

    generation: Generation
    decision: RoutingDecision

    @property
    def usage(self) -> dict[str, int]:
        prompt, completion = self.generation.prompt_tokens, self.generation.completion_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    @property
    def info(self) -> dict[str, Any]:
        """Finish reason, token counts, experts, fusion mode, alpha summary, routing decision."""
        g = self.generation
        return {
            "finish_reason": g.finish_reason,
            **self.usage,
            "experts": list(g.experts),
            "fusion_mode": g.mode,
            "alpha_summary": g.alpha_summary(),
            "routing": self.decision.as_dict(),
        }


class FusionClient:
    """Routed generation over one engine: the work behind both adapters.

    `compose`: how several active experts combine: "logits" (joint dynamic alpha over the experts,
    the engine's fusion) or "weights" (one expert merged by task arithmetic, see `compose.py`,
    written under `compose_dir`, default a folder in the temp directory).
    """

    def __init__(
        self,
        engine: FusionEngine,
        threshold: float = 0.0,
        max_experts: int | None = None,
        compose: str = "logits",
        compose_dir: str | None = None,
    ):
        if compose not in COMPOSE_MODES:
            msg = f"compose must be one of {', '.join(COMPOSE_MODES)}, got {compose!r}"
            raise RequestError(msg)
        self.engine = engine
        self.router = TaskRouter(engine, threshold, max_experts)
        self.compose = compose
        self.compose_dir = compose_dir

    def chat_prompt(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping] | None = None
    ) -> FusionPrompt:
        """Each model's chat template; without one, `role: content` lines and `assistant:`."""
        if self.engine.has_chat_template():
            return self.engine.render_chat(messages, tools or None)
        if tools:
            raise RequestError(NO_TOOL_TEMPLATE)
        lines = [f"{m['role']}: {m['content']}\n" for m in messages]
        return FusionPrompt("".join(lines) + "assistant:")

    def chat_overhead_tokens(self) -> int:
        """Tokens the chat template adds around a system and a user message (0 without one).

        Frameworks that pack a context to the window count only message text; this is the rest.
        """
        if not self.engine.has_chat_template():
            return 0
        empty = [{"role": "system", "content": ""}, {"role": "user", "content": ""}]
        rendered = self.engine.render_chat(empty).large
        return len(self.engine.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def supports_tools(self) -> bool:
        """Whether the large model's chat template renders tool definitions."""
        template = getattr(self.engine.tokenizer, "chat_template", None) or ""
        return "tools" in template

    def generate(
        self,
        prompts: Sequence[str | FusionPrompt],
        routes: Sequence[tuple[Route, str]],
        **overrides: Any,
    ) -> list[RoutedGeneration]:
        """Route each prompt (`routes[i]` = (route, source)), then one engine batch per expert set."""
        batch = [p if isinstance(p, FusionPrompt) else FusionPrompt(p) for p in prompts]
        decisions = self._decide(batch, routes)
        groups: dict[tuple[str, ...], list[int]] = {}
        for row, decision in enumerate(decisions):
            groups.setdefault(tuple(decision.experts), []).append(row)
        results: list[RoutedGeneration | None] = [None] * len(batch)
        for experts, rows in groups.items():
            engine, names = self._runner(list(experts))
            generations = engine.generate([batch[r] for r in rows], experts=names, **overrides)
            for row, generation in zip(rows, generations, strict=False):
                results[row] = RoutedGeneration(generation, decisions[row])
        return results  # type: ignore[return-value]  # every row was filled

    def stream(
        self, prompt: str | FusionPrompt, route: Route, source: str, **overrides: Any
    ) -> tuple[RoutingDecision, Iterator[StreamChunk]]:
        """Route one prompt and start streaming it; close the iterator to stop early."""
        prompt = prompt if isinstance(prompt, FusionPrompt) else FusionPrompt(prompt)
        (decision,) = self._decide([prompt], [(route, source)])
        engine, names = self._runner(decision.experts)
        return decision, engine.stream(prompt, experts=names, **overrides)

    def _runner(self, experts: list[str]) -> tuple[FusionEngine, list[str]]:
        """The engine and expert names that run an expert set (under "weights": one merged expert)."""
        if self.compose == "logits" or len(experts) < 2:
            return self.engine, experts
        composer = WeightComposer(self.engine, self.compose_dir)
        config = composer.config_for(experts)
        return shared_engine(config), config.expert_names

    def _decide(
        self, batch: Sequence[FusionPrompt], routes: Sequence[tuple[Route, str]]
    ) -> list[RoutingDecision]:
        decisions: list[RoutingDecision | None] = [None] * len(batch)
        by_route: dict[str, list[int]] = {}
        for row, (route, source) in enumerate(routes):
            by_route.setdefault(repr((route, source)), []).append(row)
        for rows in by_route.values():
            route, source = routes[rows[0]]
            for row, d in zip(
                rows, self.router.decide([batch[r] for r in rows], route, source), strict=False
            ):
                decisions[row] = d
        return decisions  # type: ignore[return-value]  # every row was filled


async def iterate_in_thread(iterator: Iterator[T]) -> AsyncIterator[T]:
    """Drive a blocking iterator from async code without blocking the event loop.

    Each `next` runs in a worker thread; leaving the `async for` early (break, error, cancel)
    lets a running `next` finish, then closes the iterator (for an engine stream: stops decoding
    and frees the engine for the next call).
    """
    finished = object()
    step: asyncio.Future | None = None
    try:
        while True:
            step = asyncio.ensure_future(asyncio.to_thread(next, iterator, finished))
            item = await asyncio.shield(step)  # a cancelled consumer leaves the step running
            if item is finished:
                return
            yield item  # type: ignore[misc]
    finally:
        if step is not None and not step.done():
            await asyncio.wait([step])  # a generator cannot be closed while it runs
        close = getattr(iterator, "close", None)
        if close is not None:
            await asyncio.to_thread(close)
