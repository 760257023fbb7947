"""A LlamaIndex RAG pipeline over a folder of documents, answered by the fused model, streaming.

The embedding is a deterministic hashed bag of words (`HashEmbedding`, shipped here): no network
and no embedding model to download. The answer step is routed to an expert with
`instrument_tags({"fusion_tasks": [...]})`, the way a routing hint passes through a query engine.

    python cookbooks/llama_index_rag.py --question "Where does Grulfour Gemgrour live?"
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
from pathlib import Path

from _setup import add_model_arguments, fusion_config
from llama_index.core import PromptTemplate, Settings, SimpleDirectoryReader, VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.instrumentation.dispatcher import instrument_tags
from llama_index.llms.fusion_llm import FusedLLM

DOCS = Path(__file__).parent / "data" / "docs"
# The zoo's question-answer format, with the retrieved context first.
QA_TEMPLATE = PromptTemplate("{context_str}\nQuestion: {query_str}\nAnswer:")


class HashEmbedding(BaseEmbedding):
    """Each lower-cased word adds 1 to one of `dim` buckets (chosen by hash); L2-normalised."""

    dim: int = 256

    def _vector(self, text: str) -> list[float]:
        vector = [0.0] * self.dim
        for word in re.findall(r"\w+", text.lower()):
            vector[int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        return [v / norm for v in vector]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._vector(text)

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, answer="trivia")
    parser.add_argument("--docs", default=str(DOCS), help="folder of text documents")
    parser.add_argument("--question", default="In which city does Grulfour Gemgrour live?")
    args = parser.parse_args(argv)

    config = fusion_config(args.config, [args.answer_task])
    llm = FusedLLM.from_config(config, max_new_tokens=args.max_new_tokens, stop=["\n"])
    Settings.llm = llm
    Settings.tokenizer = llm.engine.tokenizer.encode  # count tokens as the model does when packing
    Settings.embed_model = HashEmbedding()
    index = VectorStoreIndex.from_documents(SimpleDirectoryReader(args.docs).load_data())
    query_engine = index.as_query_engine(
        streaming=True,
        similarity_top_k=1,
        text_qa_template=QA_TEMPLATE,
        response_mode="simple_summarize",  # one retrieval, one answer: fits small contexts
    )
    with instrument_tags({"fusion_tasks": [args.answer_task]}):
        response = query_engine.query(args.question)
        print(f"source: {response.source_nodes[0].node.metadata.get('file_name')}\nanswer:", end="")
        answer = ""
        for delta in response.response_gen:
            print(delta, end="", flush=True)
            answer += delta
    print()
    return answer


if __name__ == "__main__":
    main()
