"""`FusedLLM`: a LlamaIndex LLM over a fusion engine (no fusion logic here).

The fields both frameworks expose live in `fusion_llm.routing.fields.AdapterFields`; LlamaIndex
adds `max_new_tokens` (alias `max_tokens`) and `context_window`.

Routing for one call (first present wins, see `fusion_llm.routing.router`):
    1. call keywords: `llm.complete(prompt, tasks=["math"])`, `experts=[...]` or `task="math"`;
    2. instrument tags: `with instrument_tags({"fusion_tasks": ["math"]}): query_engine.query(q)`
       (the way to route through a query engine, which passes no keywords to the LLM);
    3. the `route` field: "all" (default), "none", "auto", "examples" or task names.

Call keywords: the routing ones above, `max_new_tokens` (alias `max_tokens`), `temperature`,
`top_k`, `top_p`, `seed`, `mode`, `stop` (a bare string is one stop string), `logprobs`,
`top_logprobs`, a grammar the output follows (`structured_outputs` or `response_format`, below)
and, for chat, `tools` and `tool_choice` (below); any other keyword is refused with a typed
`RequestError`. Chat replies stop at the end of the assistant turn (or where a grammar that shapes
the whole reply ends).

Log-probabilities (`logprobs=True`, `top_logprobs=k`, as fields or call keywords) fill
`CompletionResponse.logprobs` / `ChatResponse.logprobs`: per generated token, its k most likely
alternatives as `LogProb`s (OpenAI's `top_logprobs`, as LlamaIndex's OpenAI LLM reports them; the
distribution is the fused one before temperature, top-k and top-p); a streamed response carries
those of its delta's tokens.

Constrained decoding (see `fusion_llm.runtime.grammar`): `structured_outputs` (`{"json":
schema}`, `{"regex": ...}`, `{"choice": [...]}`, `{"grammar": ...}`, `{"json_object": True}`,
`{"structural_tag": ...}`) or OpenAI's `response_format`. `structured_predict`,
`stream_structured_predict`, their async twins and `as_structured_llm(cls)` constrain the reply by
the output class's JSON schema (see `structured.py`), so it parses whatever the weights.

Function calling (when the large model's chat template renders tools: `metadata.
is_function_calling_model`): `chat_with_tools` and its streaming / async twins offer LlamaIndex
tools through the chat template; `tool_required=True` or `tool_choice` (a tool's name, "required",
"none", "auto") is enforced by the tool-call grammar, so a forced call is always a valid call of
an offered tool. Calls are read from the reply (`<tool_call>` blocks, or one JSON call) into
`ToolCallBlock`s; `get_tool_calls_from_response` returns them as `ToolSelection`s. A reply that
may call tools streams as one chunk (calls are read from the whole reply). LlamaIndex's
`FunctionAgent` runs on it.

For RAG, let LlamaIndex count tokens as the model does: `Settings.tokenizer = llm.engine.tokenizer.encode`.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import llama_index.core.instrumentation as instrument
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
    ToolCallBlock,
)
from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
from llama_index.core.instrumentation.dispatcher import active_instrument_tags
from llama_index.core.instrumentation.events.llm import (
    LLMStructuredPredictEndEvent,
    LLMStructuredPredictStartEvent,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.prompts import BasePromptTemplate
from llama_index.core.response_synthesizers.refine import DEFAULT_RESPONSE_PADDING_SIZE
from pydantic import BaseModel, Field

from fusion_llm import FusionPrompt
from fusion_llm.core.errors import RequestError
from fusion_llm.engine import StreamChunk, TokenLogprob
from fusion_llm.routing.chat import (
    NO_TOOL_TEMPLATE,
    chat_message,
    no_messages,
    non_text_content,
    parse_tool_calls,
    parses_tool_calls,
)
from fusion_llm.routing.client import RoutedGeneration, iterate_in_thread, openai_logprobs
from fusion_llm.routing.fields import AdapterFields, token_limit_field
from fusion_llm.routing.router import Route, RoutingDecision, Source, choose_route

from .structured import structured_program

if TYPE_CHECKING:
    from llama_index.core.tools import BaseTool

dispatcher = instrument.get_dispatcher(__name__)

QA_TEMPLATE_TOKENS = 128  # LlamaIndex's default QA / refine templates, generously counted


class FusedLLM(AdapterFields, FunctionCallingLLM):
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

    # What `_prepare_chat_with_tools` passes to `chat`.
    extra_call_keywords: ClassVar[tuple[str, ...]] = ("tools", "tool_choice")

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
            is_function_calling_model=client.supports_tools(),
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
        prompt = self._chat_prompt(messages, kwargs)
        return _chat_response(self._complete(prompt, kwargs, chat=True), parses_tool_calls(kwargs))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        prompt = self._chat_prompt(messages, kwargs)
        if parses_tool_calls(kwargs):  # tool calls are read from the whole reply: one chunk
            return _one(_whole_reply(self._complete(prompt, kwargs, chat=True)))
        decision, pieces = self._start_stream(prompt, kwargs, chat=True)
        return (_chat_response(c) for c in _completions(decision, pieces))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        prompt = self._chat_prompt(messages, kwargs)
        completion = await asyncio.to_thread(self._complete, prompt, kwargs, True)
        return _chat_response(completion, parses_tool_calls(kwargs))

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        prompt = self._chat_prompt(messages, kwargs)
        if parses_tool_calls(kwargs):  # tool calls are read from the whole reply: one chunk
            completion = await asyncio.to_thread(self._complete, prompt, kwargs, True)
            return _aone(_whole_reply(completion))
        decision, pieces = await asyncio.to_thread(self._start_stream, prompt, kwargs, True)

        async def responses() -> ChatResponseAsyncGen:
            text = ""
            async for piece in iterate_in_thread(pieces):
                text += piece.text
                yield _chat_response(_piece_response(text, piece, decision))

        return responses()

    # -- function calling ----------------------------------------------------------------------
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """`chat` keywords offering `tools` (their OpenAI definitions) with the tool choice.

        `tool_choice` (a tool's name, OpenAI's `{"type": "function", "function": {"name": ...}}`,
        "required", "none" or "auto") wins over `tool_required` (True: "required"); the grammar
        enforces it (`fusion_llm.routing.chat.tool_call_constraint`). Without tools: a plain chat.
        """
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        if user_msg is not None:
            messages.append(user_msg)
        if not tools:
            return {"messages": messages, **kwargs}
        if tool_choice is None:
            tool_choice = "required" if tool_required else "auto"
        specs = [tool.metadata.to_openai_tool(skip_length_check=True) for tool in tools]
        return {"messages": messages, "tools": specs, "tool_choice": tool_choice, **kwargs}

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[BaseTool],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        """Without parallel calls, the first call only (as LlamaIndex's OpenAI LLM does)."""
        blocks = response.message.blocks
        calls = [b for b in blocks if isinstance(b, ToolCallBlock)]
        if not allow_parallel_tool_calls and len(calls) > 1:
            extra = {id(b) for b in calls[1:]}
            response.message.blocks = [b for b in blocks if id(b) not in extra]
        return response

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The reply's tool calls; raises ValueError when there is none and `error_on_no_tool_call`."""
        calls = [
            ToolSelection(
                tool_id=block.tool_call_id or "",
                tool_name=block.tool_name,
                tool_kwargs=block.tool_kwargs,
            )
            for block in response.message.blocks
            if isinstance(block, ToolCallBlock)
        ]
        if not calls and error_on_no_tool_call:
            msg = f"expected a tool call, but the reply has none: {response.message.content!r}"
            raise ValueError(msg)
        return calls

    # -- structured output: the output class's JSON schema is the grammar (structured.py) -----
    @dispatcher.span
    def structured_predict(
        self,
        output_cls: type[BaseModel],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> BaseModel:
        dispatcher.event(
            LLMStructuredPredictStartEvent(
                output_cls=output_cls, template=prompt, template_args=prompt_args
            )
        )
        program, call_kwargs = structured_program(self, output_cls, prompt, llm_kwargs)
        result = program(llm_kwargs=call_kwargs, **prompt_args)
        dispatcher.event(LLMStructuredPredictEndEvent(output=result))
        return result

    @dispatcher.span
    async def astructured_predict(
        self,
        output_cls: type[BaseModel],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> BaseModel:
        dispatcher.event(
            LLMStructuredPredictStartEvent(
                output_cls=output_cls, template=prompt, template_args=prompt_args
            )
        )
        program, call_kwargs = structured_program(self, output_cls, prompt, llm_kwargs)
        result = await program.acall(llm_kwargs=call_kwargs, **prompt_args)
        dispatcher.event(LLMStructuredPredictEndEvent(output=result))
        return result

    # LlamaIndex's `stream_structured_predict` / `astream_structured_predict` (partial objects,
    # with their events) get their stream from these two.
    def _structured_stream_call(
        self,
        output_cls: type[BaseModel],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Iterator[Any]:
        program, call_kwargs = structured_program(self, output_cls, prompt, llm_kwargs)
        return program.stream_call(llm_kwargs=call_kwargs, **prompt_args)

    async def _structured_astream_call(
        self,
        output_cls: type[BaseModel],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> AsyncIterator[Any]:
        program, call_kwargs = structured_program(self, output_cls, prompt, llm_kwargs)
        return await program.astream_call(llm_kwargs=call_kwargs, **prompt_args)

    # -- the one request path shared by sync, streaming and async calls ----------------------
    def _text_prompt(self, prompt: str, formatted: bool) -> FusionPrompt:
        return FusionPrompt(prompt if formatted else self.completion_to_prompt(prompt))

    def _chat_prompt(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> FusionPrompt:
        """The chat template over the messages and the offered tools (`tools`, OpenAI's shape)."""
        if not messages:
            raise no_messages()
        tools = kwargs.get("tools")
        if tools and not self.client.supports_tools():
            raise RequestError(NO_TOOL_TEMPLATE)
        turns = [_turn(m, i) for i, m in enumerate(messages)]
        if not self.client.engine.has_chat_template():
            return FusionPrompt(self.messages_to_prompt(messages))
        return self.client.chat_prompt(turns, tools)

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
        """A chat call's engine keywords (`chat_keywords`: its grammar and turn's end), or a
        completion's (`engine_keywords`), which takes no tools."""
        if chat:
            return self.chat_keywords(kwargs, self.max_new_tokens)
        if kwargs.get("tools") or kwargs.get("tool_choice") is not None:
            msg = "tools and tool_choice are chat keywords; use chat or chat_with_tools"
            raise RequestError(msg)
        return self.engine_keywords(kwargs, self.max_new_tokens)


def _role(message: ChatMessage) -> str:
    return message.role.value if isinstance(message.role, MessageRole) else str(message.role)


def _turn(message: ChatMessage, index: int) -> dict[str, Any]:
    """A LlamaIndex message as a chat-template message, with its tool calls (`ToolCallBlock`s)
    and, for a tool's reply, the id of the call it answers (`additional_kwargs["tool_call_id"]`)."""
    role = _role(message)
    calls = [
        {
            "type": "function",
            "id": block.tool_call_id,
            "function": {"name": block.tool_name, "arguments": block.tool_kwargs},
        }
        for block in message.blocks
        if isinstance(block, ToolCallBlock)
    ]
    answers = message.additional_kwargs.get("tool_call_id") if role == "tool" else None
    return chat_message(role, _text(message, index), tool_calls=calls or None, tool_call_id=answers)


def _text(message: ChatMessage, index: int) -> str:
    """The text of a message; text blocks are joined, tool calls are kept apart (see `_turn`),
    any other block is refused (RequestError)."""
    for block in message.blocks:
        if not isinstance(block, (TextBlock, ToolCallBlock)):
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


def _chat_response(completion: CompletionResponse, reads_calls: bool = False) -> ChatResponse:
    """The assistant's reply; with `reads_calls`, its tool calls become `ToolCallBlock`s after
    the remaining text (`parse_tool_calls`: `<tool_call>` blocks, else one JSON call)."""
    text, calls = parse_tool_calls(completion.text) if reads_calls else (completion.text, [])
    blocks: list[TextBlock | ToolCallBlock] = [TextBlock(text=text)] if text or not calls else []
    blocks += [
        ToolCallBlock(tool_call_id=c["id"], tool_name=c["name"], tool_kwargs=c["args"])
        for c in calls
    ]
    message = ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks)
    return ChatResponse(
        message=message, delta=completion.delta, raw=completion.raw, logprobs=completion.logprobs
    )


def _whole_reply(completion: CompletionResponse) -> ChatResponse:
    """A reply that may call tools, as the one chunk of its stream (its text is the delta)."""
    response = _chat_response(completion, reads_calls=True)
    return response.model_copy(update={"delta": response.message.content or ""})


def _one(response: ChatResponse) -> ChatResponseGen:
    yield response


async def _aone(response: ChatResponse) -> ChatResponseAsyncGen:
    yield response
