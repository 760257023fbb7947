"""Structured output by JSON-schema prompting: the schema goes into a system message, the reply
is parsed and validated against it (generation itself is not constrained).

Routing survives both orders: `chat.bind(task="math").with_structured_output(S)` (a
`RoutedBinding` keeps its keywords and config) and `chat.with_structured_output(S).bind(task=...)`
(the structured runnable hands call keywords to the model).
"""

from __future__ import annotations

import json
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, SystemMessage
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig, RunnableLambda
from langchain_core.utils.function_calling import convert_to_json_schema
from pydantic import BaseModel

INSTRUCTION = (
    "Answer with one JSON object only, no other text. It must match this JSON schema:\n{schema}"
)


class RoutedBinding(RunnableBinding):
    """A bound chat model whose `with_structured_output` keeps the bound keywords and config.

    LangChain's binding forwards `with_structured_output` to the model itself, which would drop
    `bind(task=...)` and `with_config(tags=...)`.
    """

    def with_structured_output(
        self, schema: Any, *, include_raw: bool = False, **kwargs: Any
    ) -> Runnable:
        return structured_output(self, schema, include_raw)


def structured_output(
    model: BaseChatModel | RunnableBinding, schema: Any, include_raw: bool
) -> Runnable:
    """`prompt -> model -> parsed` (or `{"raw", "parsed", "parsing_error"}` with include_raw).

    Call keywords (`.bind(task=...)` on the result) reach the model.
    """
    is_pydantic = isinstance(schema, type) and issubclass(schema, BaseModel)
    json_schema = convert_to_json_schema(schema)
    parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
    instruction = SystemMessage(INSTRUCTION.format(schema=json.dumps(json_schema)))
    # Traced like other chat models' structured output (the run's `ls_structured_output_format`).
    traced = model.bind(
        ls_structured_output_format={"kwargs": {"method": "json_schema"}, "schema": schema}
    )

    def with_instruction(value: Any) -> list[BaseMessage]:
        return [instruction, *model._convert_input(value).to_messages()]

    def parsed(raw: BaseMessage, config: RunnableConfig) -> Any:
        if not include_raw:
            return parser.invoke(raw, config)
        return {"raw": raw, **_parse(parser, raw, config)}

    def answer(value: Any, config: RunnableConfig, **call: Any) -> Any:
        return parsed(traced.invoke(with_instruction(value), config, **call), config)

    async def aanswer(value: Any, config: RunnableConfig, **call: Any) -> Any:
        return parsed(await traced.ainvoke(with_instruction(value), config, **call), config)

    return RunnableLambda(answer, afunc=aanswer, name="structured_output")


def _parse(parser, raw: BaseMessage, config: RunnableConfig) -> dict[str, Any]:
    try:
        return {"parsed": parser.invoke(raw, config), "parsing_error": None}
    except Exception as err:  # noqa: BLE001 - reported to the caller, like other chat models
        return {"parsed": None, "parsing_error": err}
