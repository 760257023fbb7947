"""Step `agent`: the cookbook's calculator tool under LangChain's `create_agent` over
`ChatFusedLLM`, on arith eval problems; CACHE/agent/results.json."""

from __future__ import annotations

import argparse
import importlib
import itertools
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from bookkeeping import (
    expert_stamp,
    in_process_priority,
    own_command,
    read_json,
    read_jsonl,
    timed,
    write_json,
)

AGENT_TASK = "arith"
AGENT_SYSTEM = (
    "Use the calculate tool for the arithmetic. When you know the result, reply with one "
    "sentence: The answer is <number>."
)
AGENT_MAX_TOKENS = 96  # a tool call with a 4-operation expression is about 40 tokens
AGENT_RECURSION_LIMIT = 12  # graph steps: up to 5 model turns, one tool round between each two
FIRST_CALL_CHOICES = {"auto": "auto", "forced": "calculate"}  # tool_choice of the first turn
# A call the parser could not read stays in the reply's text: a `<tool_call>` block, or a reply
# that is one JSON call (cut short by the token limit, say).
UNPARSED_CALL = re.compile(r'<tool_call>|^\s*\{\s*"name"')
AGENT_MODELS = ("large alone", "dynamic", "static", f"{AGENT_TASK} alone")  # `agent_chats` order


def step_agent(args: argparse.Namespace) -> None:
    cache = args.cache
    out = cache / "agent/results.json"
    stamp = {
        "expert": expert_stamp(cache, AGENT_TASK),
        "rows": args.agent_rows,
        "system": AGENT_SYSTEM,
        "max_tokens": AGENT_MAX_TOKENS,
        "recursion_limit": AGENT_RECURSION_LIMIT,
    }
    previous = read_json(out) if out.is_file() and not args.force else {}
    runs = previous.get("runs", {}) if previous.get("stamp") == stamp else {}
    if not runs:
        shutil.rmtree(cache / "agent/merged", ignore_errors=True)  # the expert may have changed
    problems = read_jsonl(cache / "data" / AGENT_TASK / "eval.jsonl")[: args.agent_rows]
    if runs:  # scored again from the stored final replies: a change of the rule needs no new run
        for key, run in runs.items():
            run["correct"] = answered(run["final"], problems[int(key.rsplit("|", 1)[1])]["answer"])
        write_json(out, {"stamp": stamp, "runs": runs})
    wanted = [
        f"{model}|{choice}|{i}"
        for model in AGENT_MODELS
        for choice in FIRST_CALL_CHOICES
        for i in range(len(problems))
    ]
    if all(key in runs for key in wanted):
        print(f"{out}: done already", flush=True)
        return
    command = own_command(args, "agent", f"--agent-rows={args.agent_rows}")
    with timed(cache, "agent", command):
        in_process_priority(args.threads)
        calculate = _cookbook("langchain_agent").calculate
        for model, chat in agent_chats(cache):
            every = itertools.product(FIRST_CALL_CHOICES, range(len(problems)))
            todo = [(c, i) for c, i in every if f"{model}|{c}|{i}" not in runs]
            # The engine's continuous batcher decodes concurrent conversations as one batch.
            with ThreadPoolExecutor(max(1, min(args.agent_concurrency, len(todo)))) as pool:
                futures = {
                    pool.submit(agent_run, chat, calculate, c, problems[i]): f"{model}|{c}|{i}"
                    for c, i in todo
                }
                for future in as_completed(futures):
                    key = futures[future]
                    runs[key] = future.result()
                    write_json(out, {"stamp": stamp, "runs": runs})
                    print(f"agent {key}: {_run_summary(runs[key])}", flush=True)
            del chat  # no reference here keeps an engine alive while the next one loads


def agent_chats(cache: Path) -> Iterator[tuple[str, object]]:
    """(row, ChatFusedLLM) per agent row, one engine in memory at a time (models load on first
    use, so a row whose runs are all done costs nothing)."""
    from langchain_fusion_llm import ChatFusedLLM

    from fusion_llm.engine import FusionEngine

    settings = {"max_tokens": AGENT_MAX_TOKENS, "temperature": 0.0}
    engine = FusionEngine(cache / "fusion.yaml")
    yield "large alone", ChatFusedLLM(engine=engine, route="none", **settings)
    for mode in ("dynamic", "static"):
        yield mode, ChatFusedLLM(engine=engine, route=[AGENT_TASK], mode=mode, **settings)
    del engine
    alone = ChatFusedLLM(engine=_expert_engine(cache, AGENT_TASK), route="none", **settings)
    yield f"{AGENT_TASK} alone", alone


def _expert_engine(cache: Path, task: str):
    """An engine whose large model is the expert itself (a LoRA merged into the small base), as
    `fusion-llm eval` builds its expert-alone row."""
    from fusion_llm.core.config import FusionConfig, ModelSpec
    from fusion_llm.engine import FusionEngine
    from fusion_llm.eval.baselines import merge_lora
    from fusion_llm.runtime.models import is_lora_adapter

    config = FusionConfig.load(cache / "fusion.yaml")
    spec = next(e for e in config.experts if e.name == task)
    fields = spec.model_dump(include=set(ModelSpec.model_fields))
    if is_lora_adapter(spec):
        merged = cache / "agent/merged" / task
        if not (merged / "config.json").is_file():
            merge_lora(Path(spec.path), config.small.path, merged, half=False)
        fields.update(path=str(merged), tokenizer=None, revision=None)
    return FusionEngine({"large": fields, "small": config.small.model_dump()})


def _cookbook(name: str):
    folder = Path(__file__).resolve().parents[2] / "cookbooks"  # scripts/real_models/agent.py
    sys.path.insert(0, str(folder))  # the cookbooks import their shared `_setup` module
    return importlib.import_module(name)


def agent_run(chat, calculate, choice: str, problem: dict) -> dict:
    """One agent run on one problem: its outcome (`agent_outcome`), error and wall time (shared
    with the conversations decoded beside it). A run that fails keeps the messages it had
    produced: the failure is a result, not a reason to stop."""
    from langchain.agents import create_agent
    from langchain.agents.middleware import ToolErrorMiddleware
    from langchain_core.messages import HumanMessage

    middleware = [_first_call_choice(FIRST_CALL_CHOICES[choice]), ToolErrorMiddleware(_tool_error)]
    agent = create_agent(chat, tools=[calculate], system_prompt=AGENT_SYSTEM, middleware=middleware)
    state, error = {"messages": []}, None
    start = time.perf_counter()
    try:
        for update in agent.stream(
            {"messages": [HumanMessage(problem["question"])]},
            {"recursion_limit": AGENT_RECURSION_LIMIT},
            stream_mode="values",
        ):
            state = update  # the last state survives an error in a later step
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
    outcome = agent_outcome(state["messages"], problem["answer"])
    return {**outcome, "error": error, "seconds": round(time.perf_counter() - start, 1)}


def _first_call_choice(first: str):
    """Middleware: `first` as the first model turn's tool_choice, "auto" after it (forcing every
    turn would never let the agent answer)."""
    from langchain.agents.middleware import wrap_model_call

    @wrap_model_call
    def first_call_choice(request, handler):
        later_turn = any(m.type == "ai" for m in request.messages)
        return handler(request.override(tool_choice="auto" if later_turn else first))

    return first_call_choice


def _tool_error(error: Exception, request) -> str | None:
    """A bad expression goes back to the model as the tool's reply, as in the cookbook's loop."""
    if isinstance(error, (ValueError, SyntaxError, ZeroDivisionError)):
        return f"error: {error}"
    return None


def answered(final: str, reference: float) -> bool:
    """Whether a final reply answers with the reference: its last number, in a reply that is not a
    tool call the parser could not read (such a call's arguments may hold the number)."""
    from fusion_llm.eval.metrics import final_number

    return not UNPARSED_CALL.search(final) and final_number(final) == reference


def agent_outcome(messages: Sequence, reference: float) -> dict:
    """What one run did: whether every tool-call block parsed, the calls, the tools' errors, and
    whether the final reply answers with the reference (`answered`)."""
    replies = [m for m in messages if m.type == "ai"]
    final = replies[-1].text if replies else ""
    return {
        "parsed": not any(UNPARSED_CALL.search(m.text) for m in replies),
        "calls": sum(len(m.tool_calls) for m in replies),
        "tool_errors": sum(m.type == "tool" and m.status == "error" for m in messages),
        "final": final,
        "correct": answered(final, reference),
        "transcript": [_transcript_entry(m) for m in messages],
    }


def _transcript_entry(message) -> dict:
    entry = {"type": message.type, "text": message.text}
    if getattr(message, "tool_calls", None):
        entry["tool_calls"] = [{"name": c["name"], "args": c["args"]} for c in message.tool_calls]
    return entry


def _run_summary(run: dict) -> str:
    verdict = "correct" if run["correct"] else "wrong"
    return f"{verdict}, {run['calls']} calls, {run['seconds']:.0f} s" + (
        f", {run['error']}" if run["error"] else ""
    )
