"""`ChatFusedLLM`: a LangChain chat model over a fusion engine (each model's chat template)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.globals import get_llm_cache
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
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.utils.function_calling import convert_to_openai_tool

from fusion_llm.chat import NO_TOOL_TEMPLATE, chat_message, parse_tool_calls
from fusion_llm.client import RoutedGeneration, iterate_in_thread
from fusion_llm.engine import FusionPrompt, StreamChunk
from fusion_llm.router import RoutingDecision

from .batching import batch_chat
from .params import FusionFields
from .structured import structured_output


class ChatFusedLLM(FusionFields, BaseChatModel):
    """A large chat model decoded with small task experts by dynamic logit fusion.

    >>> chat = ChatFusedLLM(config_path="fusion.yaml")
    >>> chat.bind(task="math").invoke("What is 2 + 3?").content

    See `langchain_fusion_llm.params` for the fields and the routing precedence.
    """

    @property
    def _llm_type(self) -> str:
        return "fusion-llm-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self._fusion_params

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
        return self._generate_rows([messages], stop, [run_manager], **kwargs)[0]

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
        if kwargs.get("tools"):  # tool calls are parsed from the whole reply: one chunk
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
        if kwargs.get("tools"):  # tool calls are parsed from the whole reply: one chunk
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

    # -- batches: one engine batch per expert set ------------------------------------------
    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[BaseMessage | Exception]:
        if len(inputs) < 2 or self._caches():
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        return batch_chat(self, inputs, config, return_exceptions, kwargs)

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[BaseMessage | Exception]:
        if len(inputs) < 2 or self._caches():
            return await super().abatch(
                inputs, config, return_exceptions=return_exceptions, **kwargs
            )
        return await asyncio.to_thread(batch_chat, self, inputs, config, return_exceptions, kwargs)

    # -- tools and structured output -------------------------------------------------------
    def bind_tools(
        self, tools: Sequence[Any], *, tool_choice: str | None = None, **kwargs: Any
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer tools through the chat template; the model decides whether to call one.

        Tool calls are parsed from the reply (`<tool_call>` JSON blocks, or a reply that is one
        JSON call). Raises NotImplementedError when the large model's chat template has no tools.
        """
        if not self.client.supports_tools():
            raise NotImplementedError(NO_TOOL_TEMPLATE)
        if tool_choice not in (None, "auto"):
            msg = f"tool_choice={tool_choice!r} cannot be enforced on generated text; use None or 'auto'"
            raise NotImplementedError(msg)
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def with_structured_output(
        self, schema: Any, *, include_raw: bool = False, **kwargs: Any
    ) -> Runnable[LanguageModelInput, Any]:
        """Answer as JSON matching `schema` (pydantic class, TypedDict or JSON schema), validated.

        The schema is given to the model in a system message; the reply is parsed and validated
        (a pydantic class yields an instance, anything else a dict). `method` and `strict` are
        accepted for compatibility; generation itself is not constrained.
        """
        return structured_output(self, schema, include_raw)

    # -- helpers ---------------------------------------------------------------------------
    def _generate_rows(
        self,
        message_lists: Sequence[list[BaseMessage]],
        stop: list[str] | None,
        run_managers: Sequence[CallbackManagerForLLMRun | None],
        **kwargs: Any,
    ) -> list[ChatResult]:
        """Route each row with its own run manager; one engine batch per expert set."""
        tools = kwargs.get("tools")
        prompts = [self._prompt(m, tools) for m in message_lists]
        routes = [self._route(kwargs, manager) for manager in run_managers]
        results = self.client.generate(prompts, routes, **self._overrides(stop, kwargs))
        return [_result(r, self.model_name, bool(tools)) for r in results]

    def _whole_reply_chunk(self, messages, stop, run_manager, kwargs) -> ChatGenerationChunk:
        (result,) = self._generate_rows([messages], stop, [run_manager], **kwargs)
        generation = result.generations[0]
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
        route, source = self._route(kwargs, run_manager)
        return self.client.stream(
            self._prompt(messages), route, source, **self._overrides(stop, kwargs)
        )

    def _prompt(self, messages: list[BaseMessage], tools: list[dict] | None = None) -> FusionPrompt:
        return self.client.chat_prompt([convert_message(m) for m in messages], tools)

    def _caches(self) -> bool:
        """Whether calls go through a LangChain cache (then the standard batch path keeps it)."""
        return self.cache is not False and (self.cache is not None or get_llm_cache() is not None)


def convert_message(message: BaseMessage) -> dict[str, Any]:
    """A LangChain message as a chat-template message."""
    if isinstance(message, ChatMessage):
        return chat_message(message.role, message.text)
    if isinstance(message, (HumanMessage, SystemMessage, FunctionMessage)):
        return chat_message(message.type, message.text)
    if isinstance(message, AIMessage):
        calls = [
            {
                "type": "function",
                "id": c["id"],
                "function": {"name": c["name"], "arguments": c["args"]},
            }
            for c in message.tool_calls
        ]
        return chat_message("ai", message.text, tool_calls=calls or None)
    if isinstance(message, ToolMessage):
        return chat_message("tool", message.text, tool_call_id=message.tool_call_id)
    msg = (
        f"unsupported message type {type(message).__name__}; use system, human, AI or tool messages"
    )
    raise TypeError(msg)


def _result(routed: RoutedGeneration, model_name: str, parse_tools: bool) -> ChatResult:
    content, tool_calls = (
        parse_tool_calls(routed.generation.text) if parse_tools else (routed.generation.text, [])
    )
    message = AIMessage(
        content=content,
        tool_calls=tool_calls,
        usage_metadata=_usage_metadata(routed),
        response_metadata={"model_name": model_name, **routed.info},
    )
    return ChatResult(
        generations=[ChatGeneration(message=message, generation_info=routed.info)],
        llm_output={"token_usage": routed.usage, "model_name": model_name},
    )


def _chunk(piece: StreamChunk, decision: RoutingDecision, model_name: str) -> ChatGenerationChunk:
    """A streamed piece; the last one carries usage, response metadata and generation info."""
    if piece.generation is None:
        return ChatGenerationChunk(message=AIMessageChunk(content=piece.text))
    routed = RoutedGeneration(piece.generation, decision)
    message = AIMessageChunk(
        content=piece.text,
        usage_metadata=_usage_metadata(routed),
        response_metadata={"model_name": model_name, **routed.info},
        chunk_position="last",
    )
    return ChatGenerationChunk(message=message, generation_info=routed.info)


def _usage_metadata(routed: RoutedGeneration) -> dict[str, int]:
    usage = routed.usage
    return {
        "input_tokens": usage["prompt_tokens"],
        "output_tokens": usage["completion_tokens"],
        "total_tokens": usage["total_tokens"],
    }
