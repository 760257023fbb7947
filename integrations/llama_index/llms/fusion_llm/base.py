"""`FusedLLM`: a LlamaIndex LLM over a fusion engine (no fusion logic here).

Routing for one call (first present wins, see `fusion_llm.routing.router`):
    1. call keywords: `llm.complete(prompt, tasks=["math"])`, `experts=[...]` or `task="math"`;
    2. instrument tags: `with instrument_tags({"fusion_tasks": ["math"]}): query_engine.query(q)`
       (the way to route through a query engine, which passes no keywords to the LLM);
    3. the `route` field: "all" (default), "none", "auto", "examples" or task names.

Call keywords: the routing ones above, `max_new_tokens` (alias `max_tokens`), `temperature`,
`top_k`, `top_p`, `seed`, `mode` and `stop` (a bare string is one stop string); any other keyword
is refused with a typed `RequestError`. Chat replies stop at the end of the assistant turn.

For RAG, let LlamaIndex count tokens as the model does: `Settings.tokenizer = llm.engine.tokenizer.encode`.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
)
from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
from llama_index.core.instrumentation.dispatcher import active_instrument_tags
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.response_synthesizers.refine import DEFAULT_RESPONSE_PADDING_SIZE
from pydantic import AliasChoices, BaseModel, Field, field_validator

from fusion_llm import FusionConfig, FusionEngine, FusionPrompt
from fusion_llm.core.errors import ConfigError
from fusion_llm.engine import StreamChunk
from fusion_llm.routing.chat import chat_message, no_messages, non_text_content
from fusion_llm.routing.client import (
    FusionClient,
    RoutedGeneration,
    check_keywords,
    iterate_in_thread,
    shared_engine,
    stop_strings,
    with_engine,
)
from fusion_llm.routing.router import CALL_KEYWORDS, Route, RoutingDecision, Source, choose_route

SAMPLING_KEYWORDS = ("mode", "temperature", "top_k", "top_p", "seed")
QA_TEMPLATE_TOKENS = 128  # LlamaIndex's default QA / refine templates, generously counted
CALL_KEYWORD_NAMES = (*CALL_KEYWORDS, *SAMPLING_KEYWORDS, "max_new_tokens", "max_tokens", "stop")


class FusedLLM(CustomLLM):
    """A large language model decoded with small task experts by dynamic logit fusion.

    >>> llm = FusedLLM(config_path="fusion.yaml")
    >>> llm.complete("Question: 2 + 3 = ?\\nAnswer:", tasks=["math"]).text
    """

    engine: FusionEngine | None = Field(default=None, repr=False, exclude=True)
    """The fusion engine (models load on first use). Built from `config_path` when not given."""
    config_path: str | None = None
    """Fusion config file (YAML/TOML/JSON); LLMs built from equal configs share one engine."""
    route: Route = "all"
    """Experts when no call keyword or instrument tag names them (see the module docstring)."""
    router_threshold: float = 0.0
    """`auto` routing: minimum log-likelihood gain per prompt token (nats) to activate an expert."""
    max_experts: int | None = None
    """`auto` routing: keep at most this many experts per prompt (None: no limit)."""
    compose: str = "logits"
    """Several active experts combine by "logits" (joint alpha), "weights" (merged) or "both"."""
    compose_dir: str | None = None
    """Where merged experts are written under compose="weights" (None: the temp directory)."""
    mode: str | None = None
    """Fusion mode: "dynamic", "paper", "static" or "none" (None: the engine config's)."""
    max_new_tokens: int | None = Field(
        default=None, validation_alias=AliasChoices("max_new_tokens", "max_tokens")
    )
    """Maximum number of new tokens (alias `max_tokens`), also `metadata.num_output` (None: the
    engine config's)."""
    temperature: float | None = None
    """Sampling temperature; 0 is greedy (None: the engine config's)."""
    top_k: int | None = None
    """Sample from the k most likely tokens only (None: the engine config's)."""
    top_p: float | None = None
    """Nucleus sampling mass (None: the engine config's)."""
    seed: int | None = None
    """Sampler seed; same seed, same output (None: the engine config's)."""
    stop: list[str] | None = None
    """Stop strings (a bare string is one), cut from the output; call-time `stop` is added."""
    context_window: int | None = None
    """Context window reported to LlamaIndex (None: the engine's, less the chat template's)."""

    def __init__(self, **fields: Any) -> None:
        super().__init__(**with_engine(fields))

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, stop: Any) -> Any:
        return [stop] if isinstance(stop, str) else stop

    @classmethod
    def from_engine(cls, engine: FusionEngine, **fields: Any) -> FusedLLM:
        """An LLM over an existing engine (LangChain models can share it)."""
        return cls(engine=engine, **fields)

    @classmethod
    def from_config(
        cls, config: FusionConfig | dict[str, Any] | str | Path, **fields: Any
    ) -> FusedLLM:
        """An LLM over the shared engine of `config` (a file path, dict or FusionConfig)."""
        path = str(config) if isinstance(config, (str, Path)) else None
        return cls(engine=shared_engine(config), config_path=path, **fields)

    @classmethod
    def class_name(cls) -> str:
        return "FusionLLM_FusedLLM"

    @property
    def metadata(self) -> LLMMetadata:
        """`context_window` (the engine's: the smallest window of the models that read a prompt)
        leaves room for the chat template, which LlamaIndex does not count; `num_output` is the
        `max_new_tokens` every call uses.

        LlamaIndex's compact/refine synthesizers (the query engine default) reserve 500 tokens
        on top of their prompt template (about 110) and `num_output`: for a smaller window pass
        `response_mode="simple_summarize"` or `"tree_summarize"` to `as_query_engine` (a warning
        says so when the window is that small).
        """
        engine = self._engine()
        window = self.context_window or (
            (engine.context_window or DEFAULT_CONTEXT_WINDOW)
            - self._client().chat_overhead_tokens()
        )
        num_output = self.max_new_tokens or engine.config.generation.max_new_tokens
        if window - num_output < DEFAULT_RESPONSE_PADDING_SIZE + QA_TEMPLATE_TOKENS:
            warnings.warn(
                f"the fused models read {window} tokens: LlamaIndex's default compact/refine "
                f"synthesizers need about {DEFAULT_RESPONSE_PADDING_SIZE + QA_TEMPLATE_TOKENS} "
                f"beyond num_output ({num_output}) and fail with 'Chunk size ... is not positive'; "
                'use as_query_engine(response_mode="simple_summarize") or "tree_summarize"',
                stacklevel=2,
            )
        return LLMMetadata(
            context_window=window,
            num_output=num_output,
            is_chat_model=engine.has_chat_template(),
            model_name=engine.config.large.path,
        )

    def __getstate__(self) -> dict[str, Any]:
        # BaseModel's state, not BaseComponent's: that one trial-pickles every field (the weights).
        state = BaseModel.__getstate__(self)
        state["__dict__"] = {**state["__dict__"], "engine": None}  # rebuilt from config_path
        return state

    # -- completion ------------------------------------------------------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._complete(self._text_prompt(prompt, formatted), kwargs)

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        decision, pieces = self._start_stream(self._text_prompt(prompt, formatted), kwargs)
        return _completions(decision, pieces)

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        return await asyncio.to_thread(self._complete, self._text_prompt(prompt, formatted), kwargs)

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        fusion_prompt = self._text_prompt(prompt, formatted)
        decision, pieces = await asyncio.to_thread(self._start_stream, fusion_prompt, kwargs)

        async def completions() -> CompletionResponseAsyncGen:
            text = ""
            async for piece in iterate_in_thread(pieces):
                text += piece.text
                yield CompletionResponse(text=text, delta=piece.text, raw=_raw(piece, decision))

        return completions()

    # -- chat (each model's chat template) ---------------------------------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return _chat_response(self._complete(self._chat_prompt(messages), kwargs, chat=True))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        decision, pieces = self._start_stream(self._chat_prompt(messages), kwargs, chat=True)
        return (_chat_response(c) for c in _completions(decision, pieces))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        prompt = self._chat_prompt(messages)
        completion = await asyncio.to_thread(self._complete, prompt, kwargs, True)
        return _chat_response(completion)

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        prompt = self._chat_prompt(messages)
        decision, pieces = await asyncio.to_thread(self._start_stream, prompt, kwargs, True)

        async def responses() -> ChatResponseAsyncGen:
            text = ""
            async for piece in iterate_in_thread(pieces):
                text += piece.text
                completion = CompletionResponse(
                    text=text, delta=piece.text, raw=_raw(piece, decision)
                )
                yield _chat_response(completion)

        return responses()

    # -- the one request path shared by sync, streaming and async calls ----------------------
    def _text_prompt(self, prompt: str, formatted: bool) -> FusionPrompt:
        return FusionPrompt(prompt if formatted else self.completion_to_prompt(prompt))

    def _chat_prompt(self, messages: Sequence[ChatMessage]) -> FusionPrompt:
        if not messages:
            raise no_messages()
        turns = [chat_message(_role(m), _text(m, i)) for i, m in enumerate(messages)]
        if not self._engine().has_chat_template():
            return FusionPrompt(self.messages_to_prompt(messages))
        return self._client().chat_prompt(turns)

    def _complete(
        self, prompt: FusionPrompt, kwargs: dict[str, Any], chat: bool = False
    ) -> CompletionResponse:
        client = self._client()
        overrides = self._overrides(kwargs, client.chat_stops() if chat else [])
        (routed,) = client.generate([prompt], [self._route(kwargs)], **overrides)
        return CompletionResponse(text=routed.generation.text, raw=_info(routed))

    def _start_stream(
        self, prompt: FusionPrompt, kwargs: dict[str, Any], chat: bool = False
    ) -> tuple[RoutingDecision, Iterator[StreamChunk]]:
        client = self._client()
        overrides = self._overrides(kwargs, client.chat_stops() if chat else [])
        route, source = self._route(kwargs)
        return client.stream(prompt, route, source, **overrides)

    def _route(self, kwargs: dict[str, Any]) -> tuple[Route, Source]:
        return choose_route(kwargs, active_instrument_tags.get(), None, self.route)

    def _overrides(self, kwargs: dict[str, Any], chat_stops: Sequence[str]) -> dict[str, Any]:
        """Engine keywords of one call: fields, then call keywords (routing keywords removed)."""
        check_keywords(kwargs, CALL_KEYWORD_NAMES)
        max_new_tokens = kwargs.get("max_new_tokens", kwargs.get("max_tokens"))
        params = {
            **{key: getattr(self, key) for key in SAMPLING_KEYWORDS},
            **{key: kwargs[key] for key in SAMPLING_KEYWORDS if key in kwargs},
            "max_new_tokens": self.max_new_tokens if max_new_tokens is None else max_new_tokens,
            "stop": stop_strings(self.stop, kwargs.get("stop"), chat_stops),
        }
        return {k: v for k, v in params.items() if v is not None}

    def _client(self) -> FusionClient:
        return FusionClient(
            self._engine(), self.router_threshold, self.max_experts, self.compose, self.compose_dir
        )

    def _engine(self) -> FusionEngine:
        if self.engine is None:
            msg = "this FusedLLM has no engine (unpickled without a config_path); pass engine= or config_path="
            raise ConfigError(msg)
        return self.engine


def _role(message: ChatMessage) -> str:
    return message.role.value if isinstance(message.role, MessageRole) else str(message.role)


def _text(message: ChatMessage, index: int) -> str:
    """The text of a message; text blocks are joined, any other block is refused (RequestError)."""
    for block in message.blocks:
        if not isinstance(block, TextBlock):
            kind = getattr(block, "block_type", type(block).__name__)
            raise non_text_content(str(kind), index, _role(message))
    return message.content or ""


def _info(routed: RoutedGeneration) -> dict[str, Any]:
    return {"usage": routed.usage, **routed.info}


def _raw(piece: StreamChunk, decision: RoutingDecision) -> dict[str, Any] | None:
    """Usage and generation info on a stream's last piece, None before it."""
    return None if piece.generation is None else _info(RoutedGeneration(piece.generation, decision))


def _completions(decision: RoutingDecision, pieces: Iterator[StreamChunk]) -> CompletionResponseGen:
    """Cumulative `text` and the new `delta` per piece; closing early stops the engine."""
    text = ""
    try:
        for piece in pieces:
            text += piece.text
            yield CompletionResponse(text=text, delta=piece.text, raw=_raw(piece, decision))
    finally:
        pieces.close()


def _chat_response(completion: CompletionResponse) -> ChatResponse:
    message = ChatMessage(role=MessageRole.ASSISTANT, content=completion.text)
    return ChatResponse(message=message, delta=completion.delta, raw=completion.raw)
