"""An agent loop over the fused model with a calculator tool.

If the large model's chat template renders tools, `ChatFusedLLM` runs inside LangChain's
`create_agent` (tool calls parsed from the reply). Otherwise (the shipped zoo has no chat template)
a ReAct-style prompt chain runs instead: the model writes `Action: calculate[<expression>]`, the
loop appends `Observation: <result>`, until the model writes `Final answer:`.

    python cookbooks/langchain_agent.py --question "What is 19 - 19 + 14?"
"""

from __future__ import annotations

import argparse
import ast
import operator
import re

from _setup import add_model_arguments, fusion_config
from langchain_core.messages import HumanMessage
from langchain_core.runnables import Runnable
from langchain_core.tools import tool
from langchain_fusion_llm import ChatFusedLLM, FusedLLM

OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.USub: operator.neg,
}
REACT_PROMPT = (
    "Answer the question. To compute, write `Action: calculate[<expression>]` and wait for the "
    "Observation. End with `Final answer: <answer>`.\nQuestion: {question}\n"
)
ACTION = re.compile(r"Action:\s*calculate\[(.*?)\]")


@tool
def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / and parentheses, e.g. `19 - 19 + 14`."""
    return str(_evaluate(ast.parse(expression, mode="eval").body))


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        return OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in OPERATORS:
        return OPERATORS[type(node.op)](_evaluate(node.operand))
    raise ValueError(f"not an arithmetic expression: {ast.dump(node)}")


def tool_agent(chat: ChatFusedLLM, question: str) -> str:
    from langchain.agents import create_agent

    agent = create_agent(chat, tools=[calculate])
    state = agent.invoke({"messages": [HumanMessage(question)]}, {"recursion_limit": 8})
    for message in state["messages"]:
        print(f"  {message.type}: {message.text!r} {getattr(message, 'tool_calls', '') or ''}")
    return state["messages"][-1].text


def react_loop(llm: Runnable[str, str], question: str, max_steps: int = 4) -> str:
    transcript = REACT_PROMPT.format(question=question)
    for _ in range(max_steps):
        step = llm.invoke(transcript, stop=["Observation:"])
        transcript += step
        print(f"  model: {step!r}")
        if "Final answer:" in step:
            return step.split("Final answer:", 1)[1].strip()
        action = ACTION.search(step)
        if action is None:
            return step.strip()  # neither an action nor an answer: stop here
        try:
            observation = calculate.invoke({"expression": action.group(1)})
        except (ValueError, SyntaxError, ZeroDivisionError) as err:
            observation = f"error: {err}"
        print(f"  tool:  {observation}")
        transcript += f"\nObservation: {observation}\n"
    return transcript.rsplit("\n", 1)[-1].strip()


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, solve="math")
    parser.add_argument("--question", default="What is 19 - 19 + 14?")
    args = parser.parse_args(argv)
    config = fusion_config(args.config, [args.solve_task])
    chat = ChatFusedLLM.from_config(config, max_tokens=args.max_new_tokens, route=[args.solve_task])
    if chat.client.supports_tools():
        print("agent: create_agent with tool calling")
        answer = tool_agent(chat, args.question)
    else:
        print("agent: ReAct-style prompt chain (the chat template has no tools)")
        llm = FusedLLM.from_engine(chat.engine, max_tokens=args.max_new_tokens)  # the same models
        answer = react_loop(llm.bind(task=args.solve_task), args.question)
    print(f"answer: {answer}")
    return answer


if __name__ == "__main__":
    main()
