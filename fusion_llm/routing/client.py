"""What the LangChain and LlamaIndex adapters share: one engine per config, routed generation and
the metadata they report (chat messages and tool calls: `chat.py`; the adapters' fields:
`fields.py`). Imports neither framework.

An adapter translates its framework's messages and parameters into a `FusionClient` call and the
`RoutedGeneration`s back into framework objects; the client routes (see `router.py`), groups rows
that share experts into one engine batch each, and runs the engine.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from ..core.config import FusionConfig
from ..core.errors import RequestError
from ..engine import FusionEngine, FusionPrompt, Generation, StreamChunk, TokenLogprob
from .chat import NO_TOOL_TEMPLATE, TOOL_CALL_TRIGGER, end_of_turn, no_messages
from .compose import WeightComposer
from .router import Route, RoutingDecision, Source, TaskRouter

T = TypeVar("T")

COMPOSE_MODES = ("logits", "weights", "both")

# The engines of the configs adapters were built from, by config (its canonical JSON): adapters
# built from equal configs share one engine, so its models load once. Weak: an engine leaves the
# registry once no adapter (nor anything else) holds it, and its models are freed.
_engines: weakref.WeakValueDictionary[str, FusionEngine] = weakref.WeakValueDictionary()
_engines_lock = threading.Lock()


def shared_engine(config: FusionConfig | dict[str, Any] | str | Path) -> FusionEngine:
    """The engine of a config, shared by every holder of an equal config (lazy: cheap)."""
    resolved = FusionConfig.load(
        str(Path(config).resolve()) if isinstance(config, (str, Path)) else config
    )
    key = resolved.model_dump_json()
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = FusionEngine(resolved)
        return engine


def stop_strings(*sources: str | Sequence[str] | None) -> list[str] | None:
    """The stop strings of a call, in order, duplicates dropped; a bare string is ONE stop string."""
    stops: list[str] = []
    for source in sources:
        items = [source] if isinstance(source, str) else list(source or [])
        if not all(isinstance(s, str) for s in items):
            msg = f"stop must be a string or a list of strings, got {source!r}"
            raise RequestError(msg)
        stops.extend(items)
    return list(dict.fromkeys(stops)) or None


def openai_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, list[dict[str, Any]]]:
    """Log-probabilities in OpenAI's shape, as both frameworks read them: `{"content": [{"token",
    "logprob", "bytes" (the token's UTF-8 bytes), "top_logprobs": [{"token", "logprob",
    "bytes"}]}]}`, one entry per generated token. A token is decoded alone, so one that holds part
    of a multi-byte character reads as U+FFFD (and its bytes are that character's)."""

    def scored(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {
                **scored(e.token, e.logprob),
                "top_logprobs": [scored(token, logprob) for _, token, logprob in e.top],
            }
            for e in entries
        ]
    }


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

    `compose`: how several active experts combine: "logits" (the engine's fusion of every active
    expert, in the request's or the config's mode), "weights" (one expert merged by task
    arithmetic, see `compose.py`, written under `compose_dir`, default a folder in the temp
    directory) or "both" (the experts and their merge, fused together). The client holds the
    engines of the merges it ran, so they stay loaded as long as the client (the registry of
    shared engines holds them weakly).
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
        if compose != "logits" and engine.config.backend == "vllm":
            msg = (
                f"compose={compose!r} merges each expert set into a new checkpoint run by its own "
                "engine, which on the vllm backend would start one vLLM server per set; use "
                'compose="logits" there (the experts fused jointly in logit space)'
            )
            raise RequestError(msg)
        self.engine = engine
        self.router = TaskRouter(engine, threshold, max_experts)
        self.compose = compose
        self.compose_dir = compose_dir
        self._merged_engines: dict[tuple[str, ...], FusionEngine] = {}

    def chat_prompt(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping] | None = None
    ) -> FusionPrompt:
        """Each model's chat template; without one, `role: content` lines and `assistant:`."""
        if not messages:
            raise no_messages()
        if self.engine.has_chat_template():
            return self.engine.render_chat(messages, tools or None)
        if tools:
            raise RequestError(NO_TOOL_TEMPLATE)
        return FusionPrompt(_role_lines(messages) + "assistant:")

    def chat_stops(self) -> list[str]:
        """Stop strings of a chat reply: the end of an assistant turn in the large model's template.

        The tokenizer's eos (and any end-of-turn token that is one) stops generation by its id.
        """
        tokenizer = self.engine.tokenizer

        def render(messages: list[dict[str, Any]]) -> str:
            if not self.engine.has_chat_template():
                return _role_lines(messages)
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=False
            )

        try:
            end = end_of_turn(render, tokenizer.all_special_tokens)
        except Exception:  # noqa: BLE001 - a template refusing this probe: the render reports it
            return []
        return [end] if end else []

    def count_prompt_tokens(self, prompt: FusionPrompt) -> int:
        """Tokens of a prompt as the large model reads it (the `prompt_tokens` of its generation)."""
        text = prompt.large or prompt.text
        ids = self.engine.tokenizer(text, add_special_tokens=prompt.add_special_tokens)["input_ids"]
        return len(ids)

    def chat_overhead_tokens(self) -> int:
        """Tokens the chat template adds around a system and a user message (0 without one).

        Frameworks that pack a context to the window count only message text; this is the rest.
        """
        if not self.engine.has_chat_template():
            return 0
        empty = [{"role": "system", "content": ""}, {"role": "user", "content": ""}]
        return self.count_prompt_tokens(self.engine.render_chat(empty))

    def supports_tools(self) -> bool:
        """Whether the large model's chat template renders tool definitions."""
        return "tools" in self._chat_template()

    def writes_tool_call_blocks(self) -> bool:
        """Whether the large model's chat template writes tool calls as `<tool_call>` blocks."""
        return TOOL_CALL_TRIGGER in self._chat_template()

    def _chat_template(self) -> str:
        """The large model's chat template source ("" without one)."""
        return getattr(self.engine.tokenizer, "chat_template", None) or ""

    def generate(
        self,
        prompts: Sequence[str | FusionPrompt],
        routes: Sequence[tuple[Route, Source]],
        *,
        return_exceptions: bool = False,
        **overrides: Any,
    ) -> list[RoutedGeneration | Exception]:
        """Route each prompt (`routes[i]` = (route, source)), then ONE engine call with each row's
        own experts (under compose="weights"/"both", one call per merged engine).

        With `return_exceptions`, a row that fails gets its own exception in its place and every
        other row its own generation: a group that raises is rerun row by row (concurrently, so the
        engine still decodes the rows together), which finds the row at fault.
        """
        batch = [p if isinstance(p, FusionPrompt) else FusionPrompt(p) for p in prompts]
        results: list[RoutedGeneration | Exception | None] = [None] * len(batch)
        decisions = self._decide(batch, routes, return_exceptions)
        groups: dict[int, tuple[FusionEngine, list[int], list[list[str]]]] = {}
        for row, decision in enumerate(decisions):
            if isinstance(decision, Exception):
                results[row] = decision
                continue
            engine, names = self._runner(decision.experts)
            _, rows, experts = groups.setdefault(id(engine), (engine, [], []))
            rows.append(row)
            experts.append(names)

        def run(
            engine: FusionEngine, rows: list[int], experts: list[list[str]]
        ) -> list[Generation]:
            prompts = [_renderings_for(engine, batch[r]) for r in rows]
            return engine.generate(prompts, experts=experts, **overrides)

        # Engines run concurrently; each decodes all of its rows in one batch.
        calls = list(groups.values())
        for (engine, rows, experts), outcome in zip(calls, _concurrently(run, calls), strict=True):
            if isinstance(outcome, Exception):
                if not return_exceptions:
                    raise outcome
                # Find the rows at fault: each row alone gets its own generation or error.
                alone = (
                    _concurrently(
                        run, [(engine, [r], [e]) for r, e in zip(rows, experts, strict=True)]
                    )
                    if len(rows) > 1
                    else [outcome]
                )
                outcome = [a if isinstance(a, Exception) else a[0] for a in alone]
            for row, generation in zip(rows, outcome, strict=True):
                results[row] = (
                    generation
                    if isinstance(generation, Exception)
                    else RoutedGeneration(generation, decisions[row])
                )
        return results  # type: ignore[return-value]  # every row was filled

    def stream(
        self, prompt: str | FusionPrompt, route: Route, source: Source, **overrides: Any
    ) -> tuple[RoutingDecision, Iterator[StreamChunk]]:
        """Route one prompt and start streaming it; close the iterator to stop early."""
        prompt = prompt if isinstance(prompt, FusionPrompt) else FusionPrompt(prompt)
        (decision,) = self._decide([prompt], [(route, source)])
        engine, names = self._runner(decision.experts)
        return decision, engine.stream(_renderings_for(engine, prompt), experts=names, **overrides)

    def _runner(self, experts: list[str]) -> tuple[FusionEngine, list[str]]:
        """The engine and expert names that run an expert set (under "weights": one merged expert)."""
        if self.compose == "logits" or len(experts) < 2:
            return self.engine, experts
        config = WeightComposer(self.engine, self.compose_dir).config_for(experts)
        merged = config.expert_names[-1]
        engine = self._merged_engines[tuple(experts)] = shared_engine(config)
        return engine, [merged] if self.compose == "weights" else [*experts, merged]

    def _decide(
        self,
        batch: Sequence[FusionPrompt],
        routes: Sequence[tuple[Route, Source]],
        return_exceptions: bool = False,
    ) -> list[RoutingDecision | Exception]:
        """One decision per row; with `return_exceptions` a route that fails is its rows' error."""
        decisions: list[RoutingDecision | Exception | None] = [None] * len(batch)
        by_route: dict[str, list[int]] = {}
        for row, (route, source) in enumerate(routes):
            by_route.setdefault(repr((route, source)), []).append(row)
        for rows in by_route.values():
            route, source = routes[rows[0]]
            try:
                decided = self.router.decide([batch[r] for r in rows], route, source)
            except Exception as err:
                if not return_exceptions:
                    raise
                decided = [err] * len(rows)
            for row, d in zip(rows, decided, strict=True):
                decisions[row] = d
        return decisions  # type: ignore[return-value]  # every row was filled


def _renderings_for(engine: FusionEngine, prompt: FusionPrompt) -> FusionPrompt:
    """The prompt without renderings for experts `engine` lacks (a merged expert's engine)."""
    experts = {k: v for k, v in prompt.experts.items() if k in engine.expert_names}
    return prompt if experts == prompt.experts else replace(prompt, experts=experts)


def _role_lines(messages: Sequence[Mapping[str, Any]]) -> str:
    """Messages as `role: content` lines: the chat format of models without a chat template."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


def _concurrently(function: Any, calls: Sequence[tuple[Any, ...]]) -> list[Any | Exception]:
    """`function(*call)` for every call, in threads; each call's result or its exception."""

    def attempt(call: tuple[Any, ...]) -> Any:
        try:
            return function(*call)
        except Exception as err:  # noqa: BLE001 - handed to the caller in the call's place
            return err

    with ThreadPoolExecutor(max_workers=max(len(calls), 1)) as pool:
        return list(pool.map(attempt, calls))


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
