"""`ChatFusedLLM`: a LangChain chat model over a fusion engine (each model's chat template)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, ClassVar

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field

from fusion_llm.engine import FusionPrompt, StreamChunk
from fusion_llm.routing.chat import (
    NO_TOOL_TEMPLATE,
    chat_message,
    non_text_content,
    parse_tool_calls,
    parses_tool_calls,
    tool_call_constraint,
)
from fusion_llm.routing.client import RoutedGeneration, iterate_in_thread
from fusion_llm.routing.router import RoutingDecision

from .base import FusionLanguageModel, logprobs_info
from .structured import RoutedBinding, structured_output

# Content blocks of an AI message that restate its `tool_calls` (rendered from those).
TOOL_CALL_BLOCKS = ("tool_use", "tool_call", "function_call")


class ChatFusedLLM(FusionLanguageModel, BaseChatModel):
    """A large chat model decoded with small task experts by dynamic logit fusion.

    >>> chat = ChatFusedLLM(config_path="fusion.yaml")
    >>> chat.bind(task="math").invoke("What is 2 + 3?").content

    See `langchain_fusion_llm.base` for the routing precedence. Replies stop at the end of the
    assistant turn of the large model's chat template.
    """

    streaming: bool = Field(
        default=False, description="Stream tokens to callbacks during `invoke` as well."
    )

    extra_call_keywords: ClassVar[tuple[str, ...]] = ("tools", "tool_choice")

    @property
    def _llm_type(self) -> str:
        return "fusion-llm-chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        return {"ls_model_type": "chat", **self._ls_fields(stop, kwargs)}

    # -- one call ------------------------------------------------------------------------------
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        (result,) = self._generate_rows([messages], stop, [run_manager], kwargs)
        return result

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        sync_manager = run_manager.get_sync() if run_manager else None
        return await asyncio.to_thread(self._generate, messages, stop, sync_manager, **kwargs)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        if parses_tool_calls(kwargs):  # tool calls are parsed from the whole reply: one chunk
            chunk = self._whole_reply_chunk(messages, stop, run_manager, kwargs)
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk
            return
        decision, chunks = self._start_stream(messages, stop, run_manager, kwargs)
        try:
            for piece in chunks:
                chunk = _chunk(piece, decision, self.model_name)
                if run_manager:
                    run_manager.on_llm_new_token(piece.text, chunk=chunk)
                yield chunk
        finally:
            chunks.close()

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        sync_manager = run_manager.get_sync() if run_manager else None
        if parses_tool_calls(kwargs):  # tool calls are parsed from the whole reply: one chunk
            chunk = await asyncio.to_thread(
                self._whole_reply_chunk, messages, stop, sync_manager, kwargs
            )
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk
            return
        decision, chunks = await asyncio.to_thread(
            self._start_stream, messages, stop, sync_manager, kwargs
        )
        async for piece in iterate_in_thread(chunks):
            chunk = _chunk(piece, decision, self.model_name)
            if run_manager:
                await run_manager.on_llm_new_token(piece.text, chunk=chunk)
            yield chunk

    # -- bindings that keep routing in structured output -------------------------------------
    def bind(self, **kwargs: Any) -> RoutedBinding:
        return RoutedBinding(bound=self, kwargs=kwargs, config={})

    def with_config(self, config: RunnableConfig | None = None, **kwargs: Any) -> RoutedBinding:
        return RoutedBinding(bound=self, kwargs={}, config={**(config or {}), **kwargs})

    # -- token counting (LangChain memory, trimming, splitters) --------------------------------
    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence[Any] | None = None
    ) -> int:
        """Tokens of the prompt the messages (and tools) render to: the call's `input_tokens`."""
        openai_tools = [convert_to_openai_tool(t) for t in tools] if tools else None
        return self.client.count_prompt_tokens(self._prompt(messages, openai_tools))

    # -- tools and structured output -------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: str | dict | bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer tools through the chat template; `tool_choice` is enforced by constrained decoding.

        `tool_choice`: None / "auto" (the model decides; when the template writes `<tool_call>`
        blocks, a block it opens must be a valid call), "any" / "required" / True (at least one
        call of a bound tool), a tool name or `{"type": "function", "function": {"name": ...}}`
        (one call of that tool), "none" (no calls parsed). Arguments follow each tool's schema;
        `strict=True` converts the schemas as OpenAI's strict mode (`additionalProperties`
        false, every field required). See `fusion_llm.routing.chat.tool_call_constraint`.

        Tool calls are parsed from the reply (`<tool_call>` JSON blocks, or a reply that is one
        JSON call). Raises NotImplementedError when the large model's chat template has no tools,
        RequestError (a ValueError) when `tool_choice` names no bound tool.
        """
        return self.bind(
            **self.tool_keywords(tools, tool_choice=tool_choice, strict=strict, **kwargs)
        )

    def tool_keywords(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: str | dict | bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The call keywords `bind_tools` binds (checked now: a bad `tool_choice` fails here)."""
        if not self.client.supports_tools():
            raise NotImplementedError(NO_TOOL_TEMPLATE)
        openai_tools = [convert_to_openai_tool(t, strict=strict) for t in tools]
        tool_call_constraint(openai_tools, tool_choice, self.client.writes_tool_call_blocks())
        choice = {} if tool_choice is None else {"tool_choice": tool_choice}
        return {"tools": openai_tools, **choice, **kwargs}

    def with_structured_output(
        self,
        schema: Any = None,
        *,
        method: str = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """Answer as `schema` (pydantic class, TypedDict or JSON schema), generated under it.

        `method`: "json_schema" (default: the reply is constrained to the schema),
        "json_mode" (any JSON object) or "function_calling" (one forced call of a tool built
        from the schema). A pydantic class yields an instance, anything else a dict;
        `include_raw=True` yields `{"raw", "parsed", "parsing_error"}`. See
        `langchain_fusion_llm.structured`.
        """
        return structured_output(
            self, schema, method=method, include_raw=include_raw, strict=strict, **kwargs
        )

    # -- helpers ---------------------------------------------------------------------------
    def _generate_rows(
        self,
        message_lists: Sequence[list[BaseMessage]],
        stop: list[str] | None,
        run_managers: Sequence[CallbackManagerForLLMRun | None],
        kwargs: dict[str, Any],
        return_exceptions: bool = False,
    ) -> list[ChatResult | Exception]:
        """Route each row with its own run manager; one engine batch per expert set."""
        tools = kwargs.get("tools")
        overrides = self.chat_keywords(kwargs, self.max_tokens, stop)
        routed = self._routed_rows(
            lambda messages: self._prompt(messages, tools),
            message_lists,
            run_managers,
            overrides,
            kwargs,
            return_exceptions,
        )
        return [
            r
            if isinstance(r, Exception)
            else _result(r, self.model_name, parses_tool_calls(kwargs))
            for r in routed
        ]

    def _whole_reply_chunk(self, messages, stop, run_manager, kwargs) -> ChatGenerationChunk:
        generation = self._generate(messages, stop, run_manager, **kwargs).generations[0]
        message = generation.message
        chunk = AIMessageChunk(
            content=message.content,
            tool_call_chunks=[
                {"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i}
                for i, c in enumerate(message.tool_calls)
            ],
            usage_metadata=message.usage_metadata,
            response_metadata=message.response_metadata,
            chunk_position="last",
        )
        return ChatGenerationChunk(message=chunk, generation_info=generation.generation_info)

    def _start_stream(self, messages, stop, run_manager, kwargs):
        overrides = self.chat_keywords(kwargs, self.max_tokens, stop)
        route, source = self._route(kwargs, run_manager)
        prompt = self._prompt(messages, kwargs.get("tools"))
        return self.client.stream(prompt, route, source, **overrides)

    def _prompt(self, messages: list[BaseMessage], tools: list[dict] | None = None) -> FusionPrompt:
        turns = [convert_message(m, i) for i, m in enumerate(messages)]
        return self.client.chat_prompt(turns, tools)

    # -- batch hooks (see FusionLanguageModel.batch) ---------------------------------------------
    def _batch_payload(self, value: LanguageModelInput) -> list[BaseMessage]:
        return self._convert_input(value).to_messages()

    def _run_starter(self, callbacks: CallbackManager) -> Callable[..., list]:
        return callbacks.on_chat_model_start

    def _batch_output(self, result: ChatResult) -> tuple[LLMResult, BaseMessage]:
        run_result = LLMResult(generations=[result.generations], llm_output=result.llm_output)
        return run_result, result.generations[0].message


def convert_message(message: BaseMessage, index: int = 0) -> dict[str, Any]:
    """A LangChain message (the `index`-th of a conversation) as a chat-template message."""
    text = message_text(message, index)
    if isinstance(message, ChatMessage):
        return chat_message(message.role, text)
    if isinstance(message, (HumanMessage, SystemMessage, FunctionMessage)):
        return chat_message(message.type, text)
    if isinstance(message, AIMessage):
        calls = [
            {
                "type": "function",
                "id": c["id"],
                "function": {"name": c["name"], "arguments": c["args"]},
            }
            for c in message.tool_calls
        ]
        return chat_message("ai", text, tool_calls=calls or None)
    if isinstance(message, ToolMessage):
        return chat_message("tool", text, tool_call_id=message.tool_call_id)
    msg = (
        f"unsupported message type {type(message).__name__}; use system, human, AI or tool messages"
    )
    raise TypeError(msg)


def message_text(message: BaseMessage, index: int) -> str:
    """The text of a message; text blocks are joined, any other block is refused (RequestError)."""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for block in message.content:
        kind = block.get("type") if isinstance(block, dict) else None
        if isinstance(block, str):
            parts.append(block)
        elif kind == "text":
            parts.append(block.get("text") or "")
        elif not (isinstance(message, AIMessage) and kind in TOOL_CALL_BLOCKS):
            raise non_text_content(str(kind or "untyped"), index, message.type)
    return "".join(parts)


def _result(routed: RoutedGeneration, model_name: str, parse_tools: bool) -> ChatResult:
    content, tool_calls = (
        parse_tool_calls(routed.generation.text) if parse_tools else (routed.generation.text, [])
    )
    info = {**routed.info, **logprobs_info(routed.generation.logprobs)}
    message = AIMessage(
        content=content,
        tool_calls=tool_calls,
        usage_metadata=_usage_metadata(routed),
        response_metadata={"model_name": model_name, **info},
    )
    return ChatResult(
        generations=[ChatGeneration(message=message, generation_info=info)],
        llm_output={"token_usage": routed.usage, "model_name": model_name},
    )


def _chunk(piece: StreamChunk, decision: RoutingDecision, model_name: str) -> ChatGenerationChunk:
    """A streamed piece with its tokens' log-probabilities (when asked); the last one carries
    usage, response metadata and generation info."""
    scores = logprobs_info(piece.logprobs)
    if piece.generation is None:
        message = AIMessageChunk(content=piece.text, response_metadata=scores)
        return ChatGenerationChunk(message=message, generation_info=scores or None)
    routed = RoutedGeneration(piece.generation, decision)
    info = {**routed.info, **scores}
    message = AIMessageChunk(
        content=piece.text,
        usage_metadata=_usage_metadata(routed),
        response_metadata={"model_name": model_name, **info},
        chunk_position="last",
    )
    return ChatGenerationChunk(message=message, generation_info=info)


def _usage_metadata(routed: RoutedGeneration) -> dict[str, int]:
    usage = routed.usage
    return {
        "input_tokens": usage["prompt_tokens"],
        "output_tokens": usage["completion_tokens"],
        "total_tokens": usage["total_tokens"],
    }
