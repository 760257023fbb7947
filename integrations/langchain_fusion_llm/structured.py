"""Structured output by constrained decoding: the reply is generated under a grammar, then parsed.

    method            generation is constrained to                 parsed as
    "json_schema"     the schema (`structured_outputs={"json"}`),  the schema (default, as chat
                      compact JSON; no schema text in the prompt   models with structured outputs)
    "json_mode"       any JSON object (`{"json_object": True}`);   the schema, or a dict when None
                      a given schema is described in a system
                      message (the grammar does not know it)
    "function_calling" one forced call of a tool built from the    that call's arguments
                      schema (`bind_tools(..., tool_choice=name)`)

A pydantic class gives an instance; a TypedDict or JSON schema gives a dict; `include_raw=True`
gives `{"raw": AIMessage, "parsed": ..., "parsing_error": None | exception}`. A reply cut at
`max_tokens` is a valid prefix that LangChain's JSON parser closes; a pydantic schema then
reports the missing fields as the parsing error.

Routing survives both orders: `chat.bind(task="math").with_structured_output(S)` (a
`RoutedBinding` keeps its keywords and config) and `chat.with_structured_output(S).bind(task=...)`
(the structured runnable hands call keywords to the model).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, SystemMessage
from langchain_core.output_parsers import (
    JsonOutputKeyToolsParser,
    JsonOutputParser,
    PydanticOutputParser,
    PydanticToolsParser,
)
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig, RunnableLambda
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

from fusion_llm.core.errors import RequestError

if TYPE_CHECKING:
    from .chat_models import ChatFusedLLM

METHODS = ("json_schema", "json_mode", "function_calling")
JSON_MODE_INSTRUCTION = (
    "Answer with one JSON object only, no other text. It must match this JSON schema:\n{schema}"
)


class RoutedBinding(RunnableBinding):
    """A bound chat model whose `with_structured_output` and `bind_tools` keep the bound keywords
    and config.

    LangChain's binding forwards both to the model itself, which would drop `bind(task=...)` and
    `with_config(tags=...)`.
    """

    def with_structured_output(self, schema: Any = None, **kwargs: Any) -> Runnable:
        return structured_output(self, schema, **kwargs)

    def bind_tools(self, tools: Any, **kwargs: Any) -> RoutedBinding:
        return self.bind(**self.bound.tool_keywords(tools, **kwargs))


def structured_output(
    model: ChatFusedLLM | RoutedBinding | BaseChatModel,
    schema: Any = None,
    *,
    method: str = "json_schema",
    include_raw: bool = False,
    strict: bool | None = None,
    **kwargs: Any,
) -> Runnable:
    """`prompt -> model (constrained) -> parsed` (or `{"raw", "parsed", "parsing_error"}`).

    Call keywords (`.bind(task=...)` on the result) reach the model. Raises ValueError for an
    unknown method or keyword, a missing schema (needed except by "json_mode") and `strict`
    with "json_mode" (it has no schema to be strict about).
    """
    if kwargs:
        raise RequestError(f"with_structured_output got unsupported arguments {sorted(kwargs)}")
    if method not in METHODS:
        msg = f"with_structured_output method must be one of {', '.join(METHODS)}, got {method!r}"
        raise RequestError(msg)
    if schema is None and method != "json_mode":
        raise RequestError(f"with_structured_output(method={method!r}) needs a schema")
    if strict is not None and method == "json_mode":
        raise RequestError("with_structured_output: strict is not supported with json_mode")
    is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
    traced = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
    preamble: list[BaseMessage] = []
    if method == "function_calling":
        name = convert_to_openai_tool(schema)["function"]["name"]

        def bound() -> Runnable:  # at call time: bind_tools refuses a template without tools
            tools = model.bind_tools([schema], tool_choice=name, strict=strict)
            return tools.bind(ls_structured_output_format=traced)

        parser: Runnable = (
            PydanticToolsParser(tools=[schema], first_tool_only=True)
            if is_pydantic
            else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
        )
    else:
        if method == "json_schema":
            grammar = {"json": convert_to_json_schema(schema, strict=strict)}
        else:
            grammar = {"json_object": True}
            if schema is not None:
                described = json.dumps(convert_to_json_schema(schema))
                preamble = [SystemMessage(JSON_MODE_INSTRUCTION.format(schema=described))]
        # Compact JSON: weak models otherwise spend their tokens on whitespace runs.
        constrained = model.bind(
            structured_outputs={**grammar, "disable_any_whitespace": True},
            ls_structured_output_format=traced,
        )

        def bound() -> Runnable:
            return constrained

        parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()

    def messages(value: Any) -> list[BaseMessage]:
        return [*preamble, *_chat_model(model)._convert_input(value).to_messages()]

    def parsed(raw: BaseMessage, config: RunnableConfig) -> Any:
        if not include_raw:
            return parser.invoke(raw, config)
        return {"raw": raw, **_parse(parser, raw, config)}

    def answer(value: Any, config: RunnableConfig, **call: Any) -> Any:
        return parsed(bound().invoke(messages(value), config, **call), config)

    async def aanswer(value: Any, config: RunnableConfig, **call: Any) -> Any:
        return parsed(await bound().ainvoke(messages(value), config, **call), config)

    return RunnableLambda(answer, afunc=aanswer, name="structured_output")


def _chat_model(model: Any) -> BaseChatModel:
    return model.bound if isinstance(model, RunnableBinding) else model


def _parse(parser: Runnable, raw: BaseMessage, config: RunnableConfig) -> dict[str, Any]:
    try:
        return {"parsed": parser.invoke(raw, config), "parsing_error": None}
    except Exception as err:  # noqa: BLE001 - reported to the caller, like other chat models
        return {"parsed": None, "parsing_error": err}
