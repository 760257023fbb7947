"""The two tasks (metric, expert description, row generator), their disjoint splits, and step
`data`: CACHE/data/<task>/{train,gate,eval}.jsonl and CACHE/fusion.yaml."""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from arith import arith_row
from bookkeeping import done_marker, is_done, mark_done, own_command, timed, write_json, write_jsonl
from pyout import pyout_row


@dataclass(frozen=True)
class Task:
    name: str
    metric: str  # `fusion-llm eval --metric`
    description: str  # the expert's description in fusion.yaml
    row: Callable[[random.Random], dict]  # one generated row: prompt, completion and its parts


TASKS = {
    "pyout": Task("pyout", "exact", "predicts what a short Python snippet prints", pyout_row),
    "arith": Task("arith", "number", "solves arithmetic word problems step by step", arith_row),
}


def make_splits(
    row: Callable[[random.Random], dict], seed: int, sizes: Mapping[str, int]
) -> dict[str, list[dict]]:
    """{split: rows} of the given sizes, in order, from rows with unique prompts: no question is in
    two splits. The same seed gives the same splits."""
    rng = random.Random(seed)
    wanted = sum(sizes.values())
    unique: dict[str, dict] = {}
    for _ in range(50 * wanted):
        if len(unique) == wanted:
            break
        item = row(rng)
        unique.setdefault(item["prompt"], item)
    if len(unique) < wanted:
        raise SystemExit(f"only {len(unique)} unique rows of the {wanted} asked for")
    rows, splits, start = list(unique.values()), {}, 0
    for name, size in sizes.items():
        splits[name] = rows[start : start + size]
        start += size
    return splits


def step_data(args: argparse.Namespace) -> None:
    sizes = {"train": args.train_rows, "gate": args.gate_rows, "eval": args.eval_rows}
    for task in TASKS.values():
        key, folder = f"data {task.name}", args.cache / "data" / task.name
        stamp = {"seed": args.seed, "sizes": sizes}
        if not args.force and is_done(args.cache, key, stamp, folder / "eval.jsonl"):
            print(f"{folder}: present", flush=True)
            continue
        options = [f"--{split}-rows={size}" for split, size in sizes.items()]
        done_marker(args.cache, key).unlink(missing_ok=True)
        with timed(args.cache, key, own_command(args, "data", *options)):
            for split, rows in make_splits(task.row, args.seed, sizes).items():
                write_jsonl(folder / f"{split}.jsonl", rows)
        mark_done(args.cache, key, stamp)
        print(f"{folder}: " + ", ".join(f"{n} {s} rows" for s, n in sizes.items()), flush=True)
    model = {"dtype": args.dtype, "device": "cpu"}
    config = {
        "large": {"path": str(args.cache / "models/large"), **model},
        "small": {"path": str(args.cache / "models/small"), **model},
        "experts": [
            {
                "name": task.name,
                "path": str(args.cache / "experts" / task.name),
                "description": task.description,
                **model,
            }
            for task in TASKS.values()
        ],
        "gate": "warn",
    }
    write_json(args.cache / "fusion.yaml", config)  # JSON is YAML
