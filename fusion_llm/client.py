"""What the LangChain and LlamaIndex adapters share: one engine per config, routed generation and
the metadata they report (chat messages and tool calls: `chat.py`). Imports neither framework.

An adapter translates its framework's messages and parameters into a `FusionClient` call and the
`RoutedGeneration`s back into framework objects; the client routes (see `router.py`), groups rows
that share experts into one engine batch each, and runs the engine.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .chat import NO_TOOL_TEMPLATE
from .compose import WeightComposer
from .config import FusionConfig
from .engine import FusionEngine, FusionPrompt, Generation, StreamChunk
from .errors import RequestError
from .router import Route, RoutingDecision, Source, TaskRouter

T = TypeVar("T")

COMPOSE_MODES = ("logits", "weights", "both")

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
    the engine's fusion), "weights" (one expert merged by task arithmetic, see `compose.py`,
    written under `compose_dir`, default a folder in the temp directory) or "both" (the experts
    and their merge, fused by joint alpha).
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
        routes: Sequence[tuple[Route, Source]],
        **overrides: Any,
    ) -> list[RoutedGeneration]:
        """Route each prompt (`routes[i]` = (route, source)), then one engine call per expert set."""
        batch = [p if isinstance(p, FusionPrompt) else FusionPrompt(p) for p in prompts]
        decisions = self._decide(batch, routes)
        groups: dict[tuple[str, ...], list[int]] = {}
        for row, decision in enumerate(decisions):
            groups.setdefault(tuple(decision.experts), []).append(row)

        def run(experts: tuple[str, ...], rows: list[int]) -> list[Generation]:
            engine, names = self._runner(list(experts))
            return engine.generate([batch[r] for r in rows], experts=names, **overrides)

        # The groups are submitted together, so the engine can decode concurrent calls as one batch.
        with ThreadPoolExecutor(max_workers=len(groups)) as pool:
            futures = [(rows, pool.submit(run, experts, rows)) for experts, rows in groups.items()]
        results: list[RoutedGeneration | None] = [None] * len(batch)
        for rows, future in futures:
            for row, generation in zip(rows, future.result(), strict=True):
                results[row] = RoutedGeneration(generation, decisions[row])
        return results  # type: ignore[return-value]  # every row was filled

    def stream(
        self, prompt: str | FusionPrompt, route: Route, source: Source, **overrides: Any
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
        merged = config.expert_names[-1]
        return shared_engine(config), [merged] if self.compose == "weights" else [*experts, merged]

    def _decide(
        self, batch: Sequence[FusionPrompt], routes: Sequence[tuple[Route, Source]]
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
