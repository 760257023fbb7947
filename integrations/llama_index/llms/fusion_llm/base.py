"""`FusedLLM`: a LlamaIndex LLM over a fusion engine (no fusion logic here).

The fields both frameworks expose live in `fusion_llm.routing.fields.AdapterFields`; LlamaIndex
adds `max_new_tokens` (alias `max_tokens`) and `context_window`.

Routing for one call (first present wins, see `fusion_llm.routing.router`):
    1. call keywords: `llm.complete(prompt, tasks=["math"])`, `experts=[...]` or `task="math"`;
    2. instrument tags: `with instrument_tags({"fusion_tasks": ["math"]}): query_engine.query(q)`
       (the way to route through a query engine, which passes no keywords to the LLM);
    3. the `route` field: "all" (default), "none", "auto", "examples" or task names.

Call keywords: the routing ones above, `max_new_tokens` (alias `max_tokens`), `temperature`,
`top_k`, `top_p`, `seed`, `mode`, `stop` (a bare string is one stop string), `logprobs` and
`top_logprobs`; any other keyword is refused with a typed `RequestError`. Chat replies stop at the
end of the assistant turn.

Log-probabilities (`logprobs=True`, `top_logprobs=k`, as fields or call keywords) fill
`CompletionResponse.logprobs` / `ChatResponse.logprobs`: per generated token, its k most likely
alternatives as `LogProb`s (OpenAI's `top_logprobs`, as LlamaIndex's OpenAI LLM reports them; the
distribution is the fused one before temperature, top-k and top-p); a streamed response carries
those of its delta's tokens.

For RAG, let LlamaIndex count tokens as the model does: `Settings.tokenizer = llm.engine.tokenizer.encode`.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Iterator, Sequence
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
    LogProb,
    MessageRole,
    TextBlock,
)
from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
from llama_index.core.instrumentation.dispatcher import active_instrument_tags
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.response_synthesizers.refine import DEFAULT_RESPONSE_PADDING_SIZE
from pydantic import BaseModel, Field

from fusion_llm import FusionPrompt
from fusion_llm.engine import StreamChunk, TokenLogprob
from fusion_llm.routing.chat import chat_message, no_messages, non_text_content
from fusion_llm.routing.client import RoutedGeneration, iterate_in_thread, openai_logprobs
from fusion_llm.routing.fields import AdapterFields, token_limit_field
from fusion_llm.routing.router import Route, RoutingDecision, Source, choose_route

QA_TEMPLATE_TOKENS = 128  # LlamaIndex's default QA / refine templates, generously counted


class FusedLLM(AdapterFields, CustomLLM):
    """A large language model decoded with small task experts by dynamic logit fusion.

    >>> llm = FusedLLM(config_path="fusion.yaml")
    >>> llm.complete("Question: 2 + 3 = ?\\nAnswer:", tasks=["math"]).text
    """

    max_new_tokens: int | None = token_limit_field("max_new_tokens")
    context_window: int | None = Field(
        default=None,
        description="Context window reported to LlamaIndex (None: the engine's, less the chat "
        "template's).",
    )

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
        client = self.client
        engine = client.engine
        window = self.context_window or (
            (engine.context_window or DEFAULT_CONTEXT_WINDOW) - client.chat_overhead_tokens()
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
        # Unpickling calls `__init__`, which rebuilds the engine from config_path, and the client.
        state = BaseModel.__getstate__(self)
        state["__dict__"] = {**state["__dict__"], "engine": None}
        state["__pydantic_private__"] = {**(state["__pydantic_private__"] or {}), "_client": None}
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
                yield _piece_response(text, piece, decision)

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
                yield _chat_response(_piece_response(text, piece, decision))

        return responses()

    # -- the one request path shared by sync, streaming and async calls ----------------------
    def _text_prompt(self, prompt: str, formatted: bool) -> FusionPrompt:
        return FusionPrompt(prompt if formatted else self.completion_to_prompt(prompt))

    def _chat_prompt(self, messages: Sequence[ChatMessage]) -> FusionPrompt:
        if not messages:
            raise no_messages()
        turns = [chat_message(_role(m), _text(m, i)) for i, m in enumerate(messages)]
        if not self.client.engine.has_chat_template():
            return FusionPrompt(self.messages_to_prompt(messages))
        return self.client.chat_prompt(turns)

    def _complete(
        self, prompt: FusionPrompt, kwargs: dict[str, Any], chat: bool = False
    ) -> CompletionResponse:
        (routed,) = self.client.generate(
            [prompt], [self._route(kwargs)], **self._engine_keywords(kwargs, chat)
        )
        generation = routed.generation
        return CompletionResponse(
            text=generation.text, raw=_info(routed), logprobs=_logprobs(generation.logprobs)
        )

    def _start_stream(
        self, prompt: FusionPrompt, kwargs: dict[str, Any], chat: bool = False
    ) -> tuple[RoutingDecision, Iterator[StreamChunk]]:
        route, source = self._route(kwargs)
        return self.client.stream(prompt, route, source, **self._engine_keywords(kwargs, chat))

    def _route(self, kwargs: dict[str, Any]) -> tuple[Route, Source]:
        return choose_route(kwargs, active_instrument_tags.get(), None, self.route)

    def _engine_keywords(self, kwargs: dict[str, Any], chat: bool) -> dict[str, Any]:
        """A chat reply also stops at the end of the assistant turn."""
        chat_stops = self.client.chat_stops() if chat else []
        return self.engine_keywords(kwargs, self.max_new_tokens, chat_stops)


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


def _logprobs(entries: list[TokenLogprob] | None) -> list[list[LogProb]] | None:
    """Per token, its alternatives as `LogProb`s; None when the call did not ask."""
    if entries is None:
        return None
    content = openai_logprobs(entries)["content"]
    return [[LogProb(**alternative) for alternative in e["top_logprobs"]] for e in content]


def _piece_response(text: str, piece: StreamChunk, decision: RoutingDecision) -> CompletionResponse:
    """A streamed piece: cumulative `text`, the new `delta` and its tokens' log-probabilities."""
    return CompletionResponse(
        text=text, delta=piece.text, raw=_raw(piece, decision), logprobs=_logprobs(piece.logprobs)
    )


def _completions(decision: RoutingDecision, pieces: Iterator[StreamChunk]) -> CompletionResponseGen:
    """Cumulative `text` and the new `delta` per piece; closing early stops the engine."""
    text = ""
    try:
        for piece in pieces:
            text += piece.text
            yield _piece_response(text, piece, decision)
    finally:
        pieces.close()


def _chat_response(completion: CompletionResponse) -> ChatResponse:
    message = ChatMessage(role=MessageRole.ASSISTANT, content=completion.text)
    return ChatResponse(
        message=message, delta=completion.delta, raw=completion.raw, logprobs=completion.logprobs
    )
