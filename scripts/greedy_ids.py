"""Greedy token ids of the shipped family, to check that a change of the decode path changes none.

    python scripts/greedy_ids.py before.json            # record (e.g. on the commit before)
    python scripts/greedy_ids.py after.json before.json # record and compare

The first 10 eval prompts of each task x modes none / static / paper / dynamic, 48 tokens (EOS
ignored): one batched call per (task, mode), then the same rows routed per row in one mixed call per
mode (continuous batching across tasks). 400 rows in all.
"""

from __future__ import annotations

import json
import sys

import torch

from fusion_llm import FusionEngine
from fusion_llm.core.config import FUSION_MODES
from fusion_llm.eval.tasks import TASKS, load_task
from fusion_llm.zoo import zoo_config


def greedy_ids() -> dict[str, list[list[int]]]:
    engine = FusionEngine(zoo_config(list(TASKS), "small", "lora", "dynamic")).load()
    settings = {"max_new_tokens": 48, "ignore_eos": True}
    prompts = {task: [q.prompt for q in load_task(task, "eval", 10)] for task in TASKS}
    rows = {
        f"{task}/{mode}": [
            g.token_ids
            for g in engine.generate(prompts[task], experts=[task], mode=mode, **settings)
        ]
        for task in TASKS
        for mode in FUSION_MODES
    }
    mixed = [p for task in TASKS for p in prompts[task]]
    routes = [[task] for task in TASKS for _ in prompts[task]]
    for mode in FUSION_MODES:
        generations = engine.generate(mixed, experts=routes, mode=mode, **settings)
        rows[f"mixed/{mode}"] = [g.token_ids for g in generations]
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    rows = greedy_ids()
    with open(sys.argv[1], "w") as out:
        json.dump(rows, out)
    if len(sys.argv) > 2:
        with open(sys.argv[2]) as before_file:
            before = json.load(before_file)
        same = sum(a == b for key in before for a, b in zip(before[key], rows[key], strict=True))
        total = sum(len(v) for v in before.values())
        print(f"{same} of {total} rows identical")
        sys.exit(0 if same == total else 1)
