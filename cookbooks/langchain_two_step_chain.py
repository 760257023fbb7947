"""A LangChain prompt-template chain whose two steps run different experts.

Step 1 solves a word problem with the math expert (`llm.bind(task=...)`), step 2 summarises the
worked answer with the summary expert (`with_config(metadata={"fusion_tasks": [...]})`); the router
decision of every step is printed from the generation info.

    python cookbooks/langchain_two_step_chain.py                  # the shipped zoo
    python cookbooks/langchain_two_step_chain.py --config fusion.yaml --solve-task math ...
"""

from __future__ import annotations

import argparse
from typing import Any

from _setup import add_model_arguments, fusion_config
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.outputs import LLMResult
from langchain_core.prompts import PromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_fusion_llm import FusedLLM

QUESTION = (
    "Drailgan Temrum has 19 coins. Drailgan sells 19 to Zassoun Trampo and then buys 14 more. "
    "How many coins does Drailgan have now?"
)


class PrintRouting(BaseCallbackHandler):
    """Prints each LLM step's routing decision and alpha summary."""

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        info = response.generations[0][0].generation_info or {}
        print(f"  [router] {info['routing']['reason']}; alpha {info['alpha_summary']}")


def build_chain(llm: FusedLLM, solve_task: str, summary_task: str):
    solve = PromptTemplate.from_template("Question: {question}\nAnswer:") | llm.bind(
        task=solve_task
    )
    summarise = PromptTemplate.from_template(
        "Article: {question} {answer}\nSummary:"
    ) | llm.with_config(metadata={"fusion_tasks": [summary_task]})
    return RunnablePassthrough.assign(answer=solve) | RunnablePassthrough.assign(summary=summarise)


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, solve="math", summary="summary")
    parser.add_argument("--question", default=QUESTION)
    args = parser.parse_args(argv)
    config = fusion_config(args.config, [args.solve_task, args.summary_task])
    llm = FusedLLM.from_config(config, max_tokens=args.max_new_tokens, stop=["\n"])
    chain = build_chain(llm, args.solve_task, args.summary_task)
    result = chain.invoke({"question": args.question}, config={"callbacks": [PrintRouting()]})
    print(f"answer:  {result['answer'].strip()}\nsummary: {result['summary'].strip()}")
    return result


if __name__ == "__main__":
    main()
