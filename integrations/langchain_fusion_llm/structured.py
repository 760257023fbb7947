"""Structured output by JSON-schema prompting: the schema goes into a system message, the reply
is parsed and validated against it (generation itself is not constrained)."""

from __future__ import annotations

import json
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, SystemMessage
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.runnables import Runnable, RunnableLambda
from langchain_core.utils.function_calling import convert_to_json_schema
from pydantic import BaseModel

INSTRUCTION = (
    "Answer with one JSON object only, no other text. It must match this JSON schema:\n{schema}"
)


def structured_output(model: BaseChatModel, schema: Any, include_raw: bool) -> Runnable:
    """`prompt -> model -> parsed` (or `{"raw", "parsed", "parsing_error"}` with include_raw)."""
    is_pydantic = isinstance(schema, type) and issubclass(schema, BaseModel)
    json_schema = convert_to_json_schema(schema)
    parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
    instruction = SystemMessage(INSTRUCTION.format(schema=json.dumps(json_schema)))

    def with_instruction(value: Any) -> list[BaseMessage]:
        messages = model._convert_input(value).to_messages()
        return [instruction, *messages]

    # Traced like other chat models' structured output (the run's `ls_structured_output_format`).
    traced = model.bind(
        ls_structured_output_format={"kwargs": {"method": "json_schema"}, "schema": schema}
    )
    ask = RunnableLambda(with_instruction) | traced
    if not include_raw:
        return ask | parser
    return ask | RunnableLambda(lambda raw: {"raw": raw, **_parse(parser, raw)})


def _parse(parser, raw: BaseMessage) -> dict[str, Any]:
    try:
        return {"parsed": parser.invoke(raw), "parsing_error": None}
    except Exception as err:  # noqa: BLE001 - reported to the caller, like other chat models
        return {"parsed": None, "parsing_error": err}
