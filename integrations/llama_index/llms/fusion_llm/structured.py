"""Structured output by constrained decoding: the output class's JSON schema is the grammar.

`FusedLLM.structured_predict` (with its async and streaming twins, and `as_structured_llm`, which
calls them) runs LlamaIndex's own `LLMTextCompletionProgram` with two changes: the prompt carries
no schema text (the grammar makes it unneeded, and a small model's window may not hold it), and
the call carries `structured_outputs={"json": schema}`, so every generated token keeps the reply a
prefix of a valid instance: a complete reply parses as the output class whatever the weights. A
reply cut by `max_new_tokens` is a valid prefix only, and fails to parse: raise the limit.

Any other `pydantic_program_mode` runs LlamaIndex's program for that mode (FUNCTION: a forced
tool call, itself constrained by the tool-call grammar).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llama_index.core.output_parsers.pydantic import PydanticOutputParser
from llama_index.core.program.llm_program import LLMTextCompletionProgram
from llama_index.core.program.utils import get_program_for_llm
from llama_index.core.prompts import BasePromptTemplate
from llama_index.core.types import BasePydanticProgram, PydanticProgramMode
from pydantic import BaseModel

if TYPE_CHECKING:
    from llama_index.core.llms.llm import LLM


def schema_grammar(output_cls: type[BaseModel]) -> dict[str, Any]:
    """The engine's `structured_outputs` for an output class: its JSON schema, compact (without
    optional whitespace a weak model cannot spend its tokens on blanks)."""
    return {"json": output_cls.model_json_schema(), "disable_any_whitespace": True}


class SchemaFreeParser(PydanticOutputParser):
    """Parses a reply as the output class; puts no schema in the prompt (the grammar holds it)."""

    def format(self, query: str) -> str:
        return query

    def parse(self, text: str) -> Any:
        """The instance; a reply that does not parse was cut before its grammar's end."""
        try:
            return super().parse(text)
        except ValueError as err:  # pydantic's ValidationError is one
            name = self.output_cls.__name__
            msg = f"the reply is not a complete {name}, it was cut: raise max_new_tokens ({err})"
            raise ValueError(msg) from err


def structured_program(
    llm: LLM,
    output_cls: type[BaseModel],
    prompt: BasePromptTemplate,
    llm_kwargs: dict[str, Any] | None,
) -> tuple[BasePydanticProgram, dict[str, Any]]:
    """The program for one structured call and the LLM keywords to run it with."""
    mode = llm.pydantic_program_mode
    if mode != PydanticProgramMode.DEFAULT:
        program = get_program_for_llm(output_cls, prompt, llm, pydantic_program_mode=mode)
        return program, dict(llm_kwargs or {})
    program = LLMTextCompletionProgram(SchemaFreeParser(output_cls), output_cls, prompt, llm)
    return program, {**(llm_kwargs or {}), "structured_outputs": schema_grammar(output_cls)}
