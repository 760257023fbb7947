"""Steps `train`, `gate` and `eval`: the fusion-llm command per task, each skipped when done."""

from __future__ import annotations

import argparse
from pathlib import Path

from bookkeeping import digest, expert_stamp, read_jsonl, run_tool
from tasks import TASKS

GATE_MODE = "static"  # the mode this evaluation picked; fusion-llm's default since it did


def step_train(args: argparse.Namespace) -> None:
    cache = args.cache
    for task in TASKS:
        data = cache / "data" / task / "train.jsonl"
        command = [
            "fusion-llm", "train-expert", "--threads", str(args.threads),
            "--bf16" if args.dtype == "bfloat16" else "--no-bf16",
            "--small", str(cache / "models/small"), "--data", str(data),
            "--out", str(cache / "experts" / task), "--rank", "16", "--epochs", str(args.epochs),
            "--lr", str(args.lr), "--seed", str(args.seed), "--device", "cpu",
        ]  # fmt: skip
        stamp = {"command": command, "data": digest(data)}
        output = cache / "experts" / task / "fusion_expert.json"
        run_tool(args, f"train {task}", command, output, stamp)


def step_gate(args: argparse.Namespace) -> None:
    cache = args.cache
    for task in TASKS:
        data = cache / "data" / task / "gate.jsonl"
        command = [
            "fusion-llm", "gate", "--config", str(cache / "fusion.yaml"), "--experts", task,
            "--validation", str(data), "--batch-size", "8", "--mode", GATE_MODE,
        ]  # fmt: skip
        stamp = {"command": command, "data": digest(data), "expert": expert_stamp(cache, task)}
        # the gate writes its verdict into the expert's card
        output = cache / "experts" / task / "fusion_expert.json"
        run_tool(args, f"gate {task}", command, output, stamp)


def step_eval(args: argparse.Namespace) -> None:
    cache = args.cache
    for task in TASKS.values():
        data = cache / "data" / task.name / "eval.jsonl"
        command = [
            "fusion-llm", "eval", "--config", str(cache / "fusion.yaml"), "--experts", task.name,
            "--data", str(data), "--metric", task.metric,
            "--max-new-tokens", str(answer_budget(cache, data)),
            "--batch-size", str(args.batch_size), "--out", str(cache / "eval" / task.name),
        ]  # fmt: skip
        stamp = {
            "command": command,
            "data": digest(data),
            "expert": expert_stamp(cache, task.name),
        }
        output = cache / "eval" / task.name / "eval.json"
        run_tool(args, f"eval {task.name}", command, output, stamp)


def answer_budget(cache: Path, data: Path) -> int:
    """New tokens per answer: the longest reference in the small model's tokenizer, plus 4 (the
    stop newline and room for a slightly longer correct answer); more would only let the rows that
    run on past their answer cost more steps."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cache / "models/small")
    completions = [row["completion"] for row in read_jsonl(data)]
    return max(len(ids) for ids in tokenizer(completions, add_special_tokens=False).input_ids) + 4
