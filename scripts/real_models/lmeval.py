"""Step `lmeval`: a generated 4-option pyout task scored by log-likelihood through lm-eval's
`simple_evaluate` over `FusionLM`; CACHE/lmeval/results.json."""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path

from bookkeeping import (
    digest,
    expert_stamp,
    in_process_priority,
    own_command,
    read_json,
    read_jsonl,
    timed,
    write_json,
    write_jsonl,
)
from pyout import pyout_choices

LMEVAL_TASK = "fusion_pyout_mc"
LMEVAL_EXPERT = "pyout"
LMEVAL_ROWS = (
    ("large alone", [], "none"),
    ("dynamic", [LMEVAL_EXPERT], "dynamic"),
    ("static", [LMEVAL_EXPERT], "static"),
)


def step_lmeval(args: argparse.Namespace) -> None:
    cache = args.cache
    folder, out = cache / "lmeval", cache / "lmeval/results.json"
    data = folder / f"{LMEVAL_TASK}.jsonl"
    eval_rows = read_jsonl(cache / "data" / LMEVAL_EXPERT / "eval.jsonl")
    write_jsonl(data, mc_rows(eval_rows, args.lmeval_rows, args.seed))
    write_json(folder / f"{LMEVAL_TASK}.yaml", lmeval_task(data))  # JSON is YAML
    stamp = {"expert": expert_stamp(cache, LMEVAL_EXPERT), "data": digest(data)}
    previous = read_json(out) if out.is_file() and not args.force else {}
    results = previous.get("rows", {}) if previous.get("stamp") == stamp else {}
    if all(name in results for name, _, _ in LMEVAL_ROWS):
        print(f"{out}: done already", flush=True)
        return
    command = own_command(args, "lmeval", f"--lmeval-rows={args.lmeval_rows}")
    with timed(cache, "lmeval", command):
        in_process_priority(args.threads)
        os.environ["HF_DATASETS_OFFLINE"] = "1"  # the task's data is a local file
        import lm_eval
        from lm_eval.tasks import TaskManager

        from fusion_llm.engine import FusionEngine
        from fusion_llm.eval.harness import FusionLM

        engine = FusionEngine(cache / "fusion.yaml")
        tasks = TaskManager(include_path=str(folder))
        for name, experts, mode in LMEVAL_ROWS:
            if name in results:
                continue
            start = time.perf_counter()
            output = lm_eval.simple_evaluate(
                model=FusionLM(engine, experts=experts, mode=mode),
                tasks=[LMEVAL_TASK],
                task_manager=tasks,
                log_samples=True,
            )
            results[name] = lmeval_result(output, time.perf_counter() - start)
            write_json(out, {"stamp": stamp, "rows": results})
            print(f"lmeval {name}: acc {results[name]['acc']:.3f}", flush=True)


def mc_rows(rows: Sequence[dict], count: int, seed: int) -> list[dict]:
    """4-option questions from the first pyout rows that get three wrong options
    (`pyout_choices`); the right option's place is drawn with the seed."""
    rng = random.Random(seed)
    questions = []
    for row in rows:
        wrong = pyout_choices(row["code"], row["output"], rng)
        if wrong is None:
            continue
        choices = [row["output"], *wrong]
        rng.shuffle(choices)
        questions.append(
            {"prompt": row["prompt"], "choices": choices, "answer": choices.index(row["output"])}
        )
        if len(questions) == count:
            break
    return questions


def lmeval_task(data: Path) -> dict:
    """lm-eval's task config: each option scored by its log-likelihood after the prompt."""
    return {
        "task": LMEVAL_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "prompt",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "metric_list": [
            {"metric": name, "aggregation": "mean", "higher_is_better": True}
            for name in ("acc", "acc_norm")
        ],
    }


def lmeval_result(output: dict, seconds: float) -> dict:
    """Accuracies, lm-eval's standard error, and per question (by doc id): the accuracy (for the
    report's paired intervals), each option's log-likelihood and the option chosen, the likeliest
    (lm-eval's `acc`), of one simple_evaluate run."""
    scores = output["results"][LMEVAL_TASK]
    samples = sorted(output["samples"][LMEVAL_TASK], key=lambda s: s["doc_id"])
    # A multiple-choice sample's filtered_resps: (log-likelihood, is_greedy) per option.
    likelihoods = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    return {
        "acc": scores["acc,none"],
        "acc_stderr": scores["acc_stderr,none"],
        "acc_norm": scores["acc_norm,none"],
        "per_question": [float(s["acc"]) for s in samples],
        "log_likelihoods": [[round(ll, 4) for ll in lls] for lls in likelihoods],
        "chosen": [max(range(len(lls)), key=lls.__getitem__) for lls in likelihoods],
        "seconds": round(seconds, 1),
    }
