"""LangChain models over a fusion-llm engine: `ChatFusedLLM` (chat) and `FusedLLM` (text)."""

from langchain_fusion_llm.chat_models import ChatFusedLLM
from langchain_fusion_llm.llms import FusedLLM

__all__ = ["ChatFusedLLM", "FusedLLM"]
