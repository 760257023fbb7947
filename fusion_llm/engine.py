"""FusionEngine: the public entry point. Validates requests, tokenizes, decodes, assembles results.

Constructing an engine is cheap: models load on first use, once. Every call goes to one
`runtime.decoder.Decoder` (the continuous batcher over HF models, or `VllmDecoder` under
`backend: vllm`) that runs concurrent calls in one continuously batched decode: requests join and
leave at step boundaries, and each caller gets exactly the rows it asked for. The request checks
(experts, mode, context windows) live in `runtime.validation`; the engine tokenizes and assembles.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .backends.vllm.backend import VllmDecoder
from .backends.vllm.launch import small_models
from .core.config import (
    FusionConfig,
    FusionMode,
    GenerationSpec,
    structured_from_response_format,
)
from .core.errors import RequestError, UnknownExpertError, described
from .core.text import IncrementalText
from .runtime.batcher import ContinuousBatcher
from .runtime.decoder import Decoder
from .runtime.grammar import Grammar, GrammarCompiler
from .runtime.models import LoadedModel, ModelSet, load_models
from .runtime.request import DONE, PromptBatch, Request, TokenScores
from .runtime.scoring import Score, score_rows
from .runtime.step import ConfigSolvers
from .runtime.validation import fit_to_window, fusion_mode, row_experts


@dataclass(frozen=True)
class FusionPrompt:
    """A prompt, with optional renderings for particular models.

    `large` is what the large model reads (e.g. with few-shot examples or its chat template),
    `small` what the small base and experts read, `experts` a rendering for a single expert.
    Each defaults to `text`. After the prompt, every model reads the same generated tokens.
    """

    text: str
    large: str | None = None
    small: str | None = None
    experts: Mapping[str, str] = field(default_factory=dict)
    add_special_tokens: bool = True  # False for chat-template renderings, which carry their own BOS


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the fused distribution it was sampled from, and
    the most likely tokens of that distribution (`GenerationSpec.logprobs` of them, most likely
    first). The distribution is the fused one before temperature, top-k and top-p:
    log p(v) = log_softmax(z_fused)[v] (see `runtime.sampler`), so a greedy token is `top[0]`."""

    token_id: int
    token: str  # the token decoded alone
    logprob: float
    top: list[tuple[int, str, float]]  # (token_id, token, logprob)


@dataclass
class Generation:
    """The outcome of one prompt."""

    text: str  # new text only, cut at the first stop string
    token_ids: list[int]  # generated ids (including a final EOS)
    finish_reason: str  # "stop" | "length" | "eos"
    prompt_tokens: int  # as the large model read it
    experts: list[str]  # experts fused, in alpha's column order
    mode: str
    alpha: list[list[float]] = field(default_factory=list)  # [step][expert]
    fallback_steps: list[int] = field(default_factory=list)  # steps where the large model ruled
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def alpha_summary(self) -> dict[str, dict[str, float]]:
        """Mean, min and max alpha per expert over the generated tokens."""
        if not self.alpha:
            return {}
        table = torch.tensor(self.alpha)
        return {
            name: {
                "mean": round(float(table[:, i].mean()), 4),
                "min": round(float(table[:, i].min()), 4),
                "max": round(float(table[:, i].max()), 4),
            }
            for i, name in enumerate(self.experts)
        }


@dataclass
class StreamChunk:
    """A piece of one row's text; the row's last chunk carries its `Generation`."""

    row: int
    text: str
    generation: Generation | None = None
    # When the request asked: the entries of the tokens decoded since the row's previous chunk.
    logprobs: list[TokenLogprob] | None = None


class _RowResult:
    """What one row has produced so far: tokens, alpha trace, fallbacks, text, log-probabilities."""

    def __init__(self, tokenizer, request: Request, row: int):
        self.request = request
        self.tokenizer = tokenizer
        self.experts = request.row_experts[row]
        self.text = IncrementalText(tokenizer, request.spec.stop, request.eos_ids)
        self.alpha: list[list[float]] = []
        self.fallback_steps: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if request.spec.logprobs is not None else None
        self._chunked = 0  # log-probability entries already given out in chunks

    def add(
        self,
        token: int,
        alpha: list[float],
        fallback: bool,
        stream: bool,
        scores: TokenScores | None = None,
    ) -> str:
        """Record one token; the text delta is decoded only when streaming."""
        if fallback:
            self.fallback_steps.append(len(self.alpha))
        self.alpha.append([round(a, 4) for a in alpha])
        if scores is not None:
            top_ids = [token_id for token_id, _ in scores.top]
            texts = self.tokenizer.batch_decode([[i] for i in (token, *top_ids)])
            top = [(i, t, lp) for (i, lp), t in zip(scores.top, texts[1:], strict=True)]
            self.logprobs.append(TokenLogprob(token, texts[0], scores.logprob, top))
        return self.text.push(token) if stream else self.text.append(token)

    def unchunked_logprobs(self) -> list[TokenLogprob] | None:
        """The entries not yet given out in a chunk (None when the request did not ask)."""
        if self.logprobs is None:
            return None
        entries, self._chunked = self.logprobs[self._chunked :], len(self.logprobs)
        return entries

    def finish(self, reason: str, row: int) -> tuple[str, Generation]:
        """The last text delta and the row's `Generation`."""
        return self.text.finish(), Generation(
            text=self.text.final_text(),
            token_ids=list(self.text.token_ids),
            finish_reason=reason,
            prompt_tokens=len(self.request.tokens.large[row]),
            experts=list(self.experts),
            mode=self.request.mode if self.experts else "none",
            alpha=self.alpha,
            fallback_steps=self.fallback_steps,
            logprobs=self.logprobs,
        )


class FusionEngine:
    """Decode a large model with small experts by logit fusion.

    >>> engine = FusionEngine("fusion.yaml")
    >>> engine.generate("Question: 2 + 3 = ?\\nAnswer:", experts=["math"])[0].text
    """

    def __init__(self, config: FusionConfig | dict[str, Any] | str | Path):
        self.config = FusionConfig.load(config)
        self._models: ModelSet | None = None
        self._load_lock = threading.Lock()
        # Held while the models run (decoding, or a router scoring prompts): peft's per-row
        # adapter selection installs hooks for the length of a forward, so forwards must not overlap.
        self._run_lock = threading.RLock()
        self._solvers = ConfigSolvers(self.config)  # decoding's and scoring's alpha solvers
        self._grammar_compiler: GrammarCompiler | None = None  # made with the first grammar
        self._decoder: Decoder = self._new_decoder()

    def _new_decoder(self) -> Decoder:
        """Who decodes: the continuous batcher over HF models, or vLLM (`backend: vllm`; the
        backend's modules import vllm only inside the functions that start it)."""
        if self.config.backend == "vllm":
            return VllmDecoder(self.config, self._run_lock)
        batching = self.config.batching
        return ContinuousBatcher(
            lambda: self.models,
            self._solvers,
            self._run_lock,
            batching.window_ms / 1000,
            batching.max_rows,
        )

    # -- loading -------------------------------------------------------------------------------
    @property
    def models(self) -> ModelSet:
        if self._models is None:
            with self._load_lock:
                if self._models is None:
                    self._models = self._load()
        return self._models

    def _load(self) -> ModelSet:
        if self.config.backend == "vllm":  # vLLM holds the large weights; the rest is shared
            return small_models(self.config.model_dump_json())
        return load_models(self.config)

    def load(self) -> FusionEngine:
        """Load every model now, and start vLLM on that backend (otherwise the first request does)."""
        _ = self.models
        self._decoder.start()
        return self

    def exclusive(self) -> threading.RLock:
        """`with engine.exclusive():` run forwards on `engine.models` outside generation.

        Decoding holds the same lock, so a router scoring prompts or an adapter merge never
        overlaps a decoding step (peft's per-row adapter selection lives for one forward).
        """
        return self._run_lock

    @property
    def loaded(self) -> bool:
        return self._models is not None

    @property
    def expert_names(self) -> list[str]:
        return self.config.expert_names

    @property
    def context_window(self) -> int | None:
        """The smallest context window of the models that read a prompt (every one is enforced)."""
        models = self.models
        readers = [models.large, models.small, *models.full_experts.values()]
        windows = [m.context_window for m in readers if m.context_window is not None]
        return min(windows, default=None)

    @property
    def tokenizer(self):
        """The large model's tokenizer: it decodes the generated ids."""
        return self.models.large.tokenizer

    # -- generation ----------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | FusionPrompt | Sequence[str | FusionPrompt],
        *,
        experts: Sequence[str] | Sequence[Sequence[str] | None] | None = None,
        mode: FusionMode | None = None,
        **overrides: Any,
    ) -> list[Generation]:
        """Generate for every prompt in one batch; one `Generation` per prompt, in order.

        `experts`: names of the experts to fuse (None: all configured; []: the large model alone),
        or one such list per prompt (e.g. `[["math"], ["qa"], []]`) to route rows of one batch.
        `mode`: override the configured fusion mode. Other keywords override `GenerationSpec`
        fields (max_new_tokens, temperature, top_k, top_p, seed, stop, truncate_prompt, ignore_eos,
        logprobs: each `Generation.logprobs` then holds every token's `TokenLogprob`).
        """
        request = self._prepare(prompts, experts, mode, overrides)
        results = {c.row: c.generation for c in self._run(request, stream=False)}
        return [results[i] for i in range(len(request.tokens.large))]

    def stream(
        self,
        prompts: str | FusionPrompt | Sequence[str | FusionPrompt],
        *,
        experts: Sequence[str] | Sequence[Sequence[str] | None] | None = None,
        mode: FusionMode | None = None,
        **overrides: Any,
    ) -> Iterator[StreamChunk]:
        """Like `generate`, but yields text deltas per row as tokens are decoded.

        The request is validated before the first chunk. Text that might be the start of a stop
        string is held back until it is not. Closing the iterator early stops the generation and
        frees the models for the next call.
        """
        return self._run(self._prepare(prompts, experts, mode, overrides), stream=True)

    def _prepare(self, prompts, experts, mode, overrides) -> Request:
        """Validate and tokenize a request; raises typed errors before any decoding."""
        batch = _as_prompts(prompts, self.expert_names)
        spec = self.config.generation.updated(**_structured_overrides(overrides))
        mode = fusion_mode(mode, self.config.fusion.mode)
        routes = [
            [] if mode == "none" else e for e in row_experts(experts, len(batch), self.expert_names)
        ]
        chosen = list(dict.fromkeys(e for names in routes for e in names))
        eos_ids = set() if spec.ignore_eos else _eos_ids(self.models.large)
        tokens = self._generation_prompts(batch, chosen, spec)
        grammar = self._grammar(spec)
        return Request(tokens, chosen, mode if chosen else "none", spec, eos_ids, routes, grammar)

    def _grammar(self, spec: GenerationSpec) -> Grammar | None:
        """The request's grammar, compiled for the large tokenizer (None: unconstrained)."""
        if spec.structured_outputs is None:
            return None
        if self._grammar_compiler is None:
            models = self.models
            self._grammar_compiler = GrammarCompiler(models.large.tokenizer, models.vocab_size)
        stop_ids = _eos_ids(self.models.large)  # a complete grammar ends on EOS, ignore_eos or not
        return self._grammar_compiler.compile(spec.structured_outputs, stop_ids)

    async def agenerate(
        self,
        prompts: str | FusionPrompt | Sequence[str | FusionPrompt],
        *,
        experts: Sequence[str] | Sequence[Sequence[str] | None] | None = None,
        mode: FusionMode | None = None,
        **overrides: Any,
    ) -> list[Generation]:
        """`generate` for asyncio: waits on the decoder without holding a thread or the loop
        (validation, tokenizing and the first load run in a worker thread)."""
        request = await asyncio.to_thread(self._prepare, prompts, experts, mode, overrides)
        results = {c.row: c.generation async for c in self._arun(request, stream=False)}
        return [results[i] for i in range(request.rows)]

    def astream(
        self,
        prompts: str | FusionPrompt | Sequence[str | FusionPrompt],
        *,
        experts: Sequence[str] | Sequence[Sequence[str] | None] | None = None,
        mode: FusionMode | None = None,
        **overrides: Any,
    ) -> AsyncIterator[StreamChunk]:
        """`stream` for asyncio; cancelling the consuming task stops the request's rows.

        Validation errors are raised at the first chunk: preparing runs in a worker thread."""

        async def chunks() -> AsyncIterator[StreamChunk]:
            request = await asyncio.to_thread(self._prepare, prompts, experts, mode, overrides)
            async with contextlib.aclosing(self._arun(request, stream=True)) as pieces:
                async for chunk in pieces:
                    yield chunk

        return chunks()

    def _run(self, request: Request, stream: bool) -> Iterator[StreamChunk]:
        """Submit to the decoder and turn its row events into chunks; leaving cancels."""
        inbox: queue.Queue = queue.Queue()
        ticket = self._decoder.submit(request, inbox.put)
        rows = self._row_results(request)
        try:
            while (events := inbox.get()) is not DONE:
                yield from _chunks(rows, events, stream)
        finally:
            ticket.cancelled.set()

    async def _arun(self, request: Request, stream: bool) -> AsyncIterator[StreamChunk]:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def put(item: object) -> None:  # called on the decoder thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: so is the consumer
                loop.call_soon_threadsafe(inbox.put_nowait, item)

        ticket = self._decoder.submit(request, put)
        rows = self._row_results(request)
        try:
            while (events := await inbox.get()) is not DONE:
                for chunk in _chunks(rows, events, stream):
                    yield chunk
        finally:
            ticket.cancelled.set()

    def _row_results(self, request: Request) -> list[_RowResult]:
        tokenizer = self.models.large.tokenizer
        return [_RowResult(tokenizer, request, row) for row in range(request.rows)]

    # -- chat ----------------------------------------------------------------------------------
    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> FusionPrompt:
        """Render chat messages with each model's own chat template (large, small base, experts)."""
        models = self.models
        large = _apply_template(models.large, messages, tools)
        small = _apply_template(models.small, messages, tools)
        experts = {
            name: _apply_template(m, messages, tools) for name, m in models.full_experts.items()
        }
        return FusionPrompt(large, large, small, experts, add_special_tokens=False)

    def has_chat_template(self) -> bool:
        return bool(getattr(self.models.large.tokenizer, "chat_template", None))

    # -- scoring ----------------------------------------------------------------------------------
    @torch.no_grad()
    def score(
        self,
        prompts: str | FusionPrompt | Sequence[str | FusionPrompt],
        continuations: str | Sequence[str | Sequence[int]],
        *,
        experts: Sequence[str] | Sequence[Sequence[str] | None] | None = None,
        mode: FusionMode | None = None,
    ) -> list[Score]:
        """The fused teacher-forced log-likelihood of each continuation after its prompt, in one
        batch: one `runtime.scoring.Score` (total, per-token log-probs, tokens, is_greedy) each.

        Tokenization at the boundary: each model reads its prompt ids exactly as `generate`
        tokenizes them, then the continuation's ids, tokenized ALONE by the large model's
        tokenizer without special tokens (a leading space stays in the continuation: " Paris"),
        which are the ids decoding emitted only when its text re-tokenizes to them; a list of
        ids (each below the models' common vocabulary size) is read as given. Each prompt is
        fitted by `fit_to_window` with its continuation's length free (cut from the left under
        `truncate_prompt`). Every
        position is fused by `fusion_step` under decoding's solver for `experts` (one list for
        every row, or one per row as in `generate`; None: all) and `mode`; `mode="none"` or
        `experts=[]` scores the large model alone (rows with the same experts share a batch). An empty continuation, or one the window cannot hold, raises RequestError naming
        `continuations[i]`.
        """
        if self.config.backend == "vllm":
            raise RequestError("score runs the models here: use backend: hf, not vllm")
        batch = _as_prompts(prompts, self.expert_names)
        models = self.models
        targets = _continuation_ids(
            models.large.tokenizer, continuations, len(batch), models.vocab_size
        )
        mode = fusion_mode(mode, self.config.fusion.mode)
        routes = [
            [] if mode == "none" else e for e in row_experts(experts, len(batch), self.expert_names)
        ]
        chosen = list(dict.fromkeys(e for names in routes for e in names))
        truncate = self.config.generation.truncate_prompt
        tokens = self.scoring_prompts(batch, chosen, targets, truncate)
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, names in enumerate(routes):
            groups.setdefault(tuple(names), []).append(i)
        scores: list[Score | None] = [None] * len(batch)
        with self._run_lock:  # the models are shared with decoding
            for names, rows in groups.items():
                group = tokens.rows(rows, names)
                solver = self._solvers(mode, list(names)) if names else None
                found = score_rows(models, group, [targets[i] for i in rows], list(names), solver)
                for i, score in zip(rows, found, strict=True):
                    scores[i] = score
        return scores

    def scoring_prompts(
        self,
        batch: Sequence[FusionPrompt],
        chosen: Sequence[str],
        continuations: Sequence[Sequence[int]],
        truncate: bool,
    ) -> PromptBatch:
        """Each model's prompt ids for teacher-forcing `continuations[i]` after `batch[i]`: each
        prompt fitted with its continuation's length free (`truncate`: cut from the left)."""
        room = [(len(c), f"the length of continuations[{i}]") for i, c in enumerate(continuations)]
        return self._tokenize(list(batch), list(chosen), room, truncate)

    # -- tokenizing -----------------------------------------------------------------------------
    def _generation_prompts(
        self, batch: list[FusionPrompt], chosen: list[str], spec: GenerationSpec
    ) -> PromptBatch:
        return self._tokenize(
            batch, chosen, [(spec.max_new_tokens, "max_new_tokens")] * len(batch),
            spec.truncate_prompt,
        )  # fmt: skip

    def _tokenize(
        self,
        batch: list[FusionPrompt],
        chosen: list[str],
        room: Sequence[tuple[int, str]],
        truncate: bool,
    ) -> PromptBatch:
        """Each model's ids of each prompt (its own rendering), prompt i fitted with `room[i]` =
        (positions kept free after it, what they are for)."""
        models = self.models
        large = [
            self._encode([models.large], p.large or p.text, p, r, truncate)
            for p, r in zip(batch, room, strict=True)
        ]
        if not chosen:
            return PromptBatch(large=large, small=[])
        # Experts without a rendering of their own read the small base's ids: check their windows too.
        full = [models.full_experts[e] for e in chosen if e in models.full_experts]
        small_readers = [models.small, *full]
        small = [
            self._encode(small_readers, p.small or p.text, p, r, truncate)
            for p, r in zip(batch, room, strict=True)
        ]
        experts = {}
        for name in chosen:
            if any(name in p.experts for p in batch):
                owner = models.full_experts.get(name, models.small)
                experts[name] = [
                    self._encode([owner], p.experts.get(name, p.small or p.text), p, r, truncate)
                    for p, r in zip(batch, room, strict=True)
                ]
        return PromptBatch(large=large, small=small, experts=experts)

    def _encode(
        self,
        readers: list[LoadedModel],
        text: str,
        prompt: FusionPrompt,
        room: tuple[int, str],
        truncate: bool,
    ) -> list[int]:
        """Token ids of `text` for the models in `readers` (which share a tokenizer), fitted to
        the smallest of their context windows with `room` = (count, what it is for) positions
        free after them (`fit_to_window`)."""
        ids = readers[0].tokenizer(text, add_special_tokens=prompt.add_special_tokens)["input_ids"]
        windows = [(m.context_window, m) for m in readers if m.context_window is not None]
        if not windows:
            return ids
        window, model = min(windows, key=lambda pair: pair[0])
        reserve, reserved = room
        return fit_to_window(ids, window, reserve, truncate, reader=model.name, reserved=reserved)


def _chunks(rows: list[_RowResult], events, stream: bool) -> Iterator[StreamChunk]:
    """The chunks of one decoder message: a list of `RowEvent`s (or an error to raise)."""
    if isinstance(events, BaseException):
        raise events
    for event in events:
        result = rows[event.row]
        delta = result.add(event.token, event.alpha, event.fallback, stream, event.scores)
        if event.finished is not None:
            tail, generation = result.finish(event.finished, event.row)
            yield StreamChunk(event.row, delta + tail, generation, result.unchunked_logprobs())
        elif delta:
            yield StreamChunk(event.row, delta, logprobs=result.unchunked_logprobs())


def _continuation_ids(tokenizer, continuations: Any, rows: int, vocab: int) -> list[list[int]]:
    """Each continuation's ids: a text tokenized alone without special tokens, or ids (each below
    `vocab`) as given; RequestError naming `continuations`."""
    items = [continuations] if isinstance(continuations, str) else continuations
    if (
        not isinstance(items, Sequence)
        or len(items) != rows
        or not all(isinstance(c, str) or _is_ids(c, vocab) for c in items)
    ):
        msg = (
            f"continuations must be one text or list of token ids (each below {vocab}) per "
            f"prompt ({rows}), got "
            f"{continuations!r:.200}"
        )
        raise RequestError(msg)
    ids = [
        tokenizer(c, add_special_tokens=False)["input_ids"] if isinstance(c, str) else list(c)
        for c in items
    ]
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        msg = f"continuations[{empty[0]}] is empty: no token to score; give a non-empty text"
        raise RequestError(msg)
    return ids


def _is_ids(item: Any, vocab: int) -> bool:
    return isinstance(item, Sequence) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in item
    )


def _as_prompts(prompts: Any, expert_names: Sequence[str]) -> list[FusionPrompt]:
    items = [prompts] if isinstance(prompts, (str, FusionPrompt)) else prompts
    if not isinstance(items, Sequence) or isinstance(items, (bytes, bytearray)):
        msg = f"prompts must be a string, a FusionPrompt or a list of them, got {type(prompts).__name__}"
        raise RequestError(msg)
    if len(items) == 0:
        raise RequestError("no prompts given; pass at least one prompt")
    batch = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = FusionPrompt(item)
        if not isinstance(item, FusionPrompt):
            msg = f"prompt {i} must be a string or a FusionPrompt, got {type(item).__name__}"
            raise RequestError(msg)
        _check_renderings(item, i, expert_names)
        if not item.text.strip():
            msg = f"prompt {i} is empty or whitespace; give the model something to continue"
            raise RequestError(msg)
        batch.append(item)
    return batch


def _check_renderings(prompt: FusionPrompt, index: int, expert_names: Sequence[str]) -> None:
    """Every rendering of a prompt is a string of valid Unicode, for a configured expert."""
    if not isinstance(prompt.experts, Mapping):
        msg = f"prompt {index}: FusionPrompt.experts must map expert names to prompts, got {type(prompt.experts).__name__}"
        raise RequestError(msg)
    unknown = [name for name in prompt.experts if name not in expert_names]
    if unknown:
        known = ", ".join(expert_names) or "none configured"
        msg = f"prompt {index}: FusionPrompt.experts names unknown expert(s) {', '.join(map(repr, unknown))}; configured experts: {known}"
        raise UnknownExpertError(msg)
    renderings = {"text": prompt.text, "large": prompt.large, "small": prompt.small}
    renderings.update({f"experts[{name!r}]": text for name, text in prompt.experts.items()})
    for field_name, text in renderings.items():
        if text is None and field_name != "text":
            continue
        if not isinstance(text, str):
            msg = f"prompt {index}: FusionPrompt.{field_name} must be a string, got {type(text).__name__}"
            raise RequestError(msg)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            msg = (
                f"prompt {index}: FusionPrompt.{field_name} has an invalid character at position "
                f"{err.start} ({err.reason}, e.g. a lone surrogate); send valid UTF-8 text"
            )
            raise RequestError(msg) from None


def _structured_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Request keywords with OpenAI's `response_format` read as `structured_outputs`."""
    if "response_format" not in overrides:
        return overrides
    overrides = dict(overrides)
    structured = structured_from_response_format(overrides.pop("response_format"))
    if structured is not None:
        if overrides.get("structured_outputs") is not None:
            msg = "give response_format or structured_outputs, not both"
            raise RequestError(msg)
        overrides["structured_outputs"] = structured
    return overrides


def _eos_ids(model: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model.model, "generation_config", None), model.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def _apply_template(model: LoadedModel, messages, tools) -> str:
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        msg = (
            f"the {model.name} has no chat template; render the prompt yourself or use a chat model"
        )
        raise RequestError(msg)
    try:
        rendered = tokenizer.apply_chat_template(
            list(messages), tools=tools, tokenize=False, add_generation_prompt=True
        )
    except Exception as err:  # the template is code shipped with the model: any error is its own
        msg = (
            f"the chat template of the {model.name} ({tokenizer.name_or_path}) cannot render these "
            f"messages: {described(err)}; send messages it accepts (e.g. "
            "alternating user/assistant turns) or fix its chat_template"
        )
        raise RequestError(msg) from err
    if not isinstance(rendered, str):
        msg = f"the chat template of the {model.name} rendered {type(rendered).__name__}, not text"
        raise RequestError(msg)
    return rendered
