"""LlamaIndex LLM over a fusion-llm engine: `from llama_index.llms.fusion_llm import FusedLLM`."""

from llama_index.llms.fusion_llm.base import FusedLLM

__all__ = ["FusedLLM"]
