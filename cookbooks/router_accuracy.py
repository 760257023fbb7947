"""Measure the automatic routers on the shipped family's eval prompts.

Every eval prompt of each task is routed with `--route likelihood` (likelihood ratio of each expert
over the small base, no extra data), `--route examples` (nearest centroid of each expert's example
prompts, in the small base's embedding space) or `--route auto` (the default: `examples` when every
expert has example prompts, else `likelihood`). On the shipped family the experts get the first
`--examples` train prompts of their task as examples, which is what `fusion-llm train-expert` writes
into an expert's card; with `--config`, the experts' own examples (config or card) are used. The
report gives, per task, how often the task's own expert scores best (`top1`), is chosen (`selected`)
and is the only one chosen (`exact`).

    python cookbooks/router_accuracy.py --n 100 --tasks math truthful trivia summary mc
"""

from __future__ import annotations

import argparse

from _setup import fusion_config

from fusion_llm import FusionEngine
from fusion_llm.eval.tasks import SEEN_TASKS, load_task
from fusion_llm.routing.router import TaskRouter, routing_accuracy


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="fusion config whose experts are named after zoo tasks")
    parser.add_argument("--tasks", nargs="+", default=list(SEEN_TASKS))
    parser.add_argument("--n", type=int, default=100, help="eval prompts per task")
    parser.add_argument("--threshold", type=float, default=0.0, help="auto: gain in nats per token")
    parser.add_argument("--route", choices=["auto", "examples", "likelihood"], default="auto")
    parser.add_argument("--examples", type=int, default=20, help="train prompts per expert")
    args = parser.parse_args(argv)
    config = fusion_config(args.config, args.tasks)
    if args.route != "likelihood" and not args.config:
        for expert in config["experts"]:  # the zoo: experts are named after their tasks
            examples = load_task(expert["name"], "train", args.examples)
            expert["examples"] = [e.prompt for e in examples]
    engine = FusionEngine(config)
    labelled = {task: [e.prompt for e in load_task(task, n=args.n)] for task in args.tasks}
    report = routing_accuracy(TaskRouter(engine, args.threshold), labelled, route=args.route)
    print(f"{'task':<10} {'top1':>6} {'selected':>9} {'exact':>6}")
    for task, scores in report.items():
        print(
            f"{task:<10} {scores['top1']:>6.2f} {scores['selected']:>9.2f} {scores['exact']:>6.2f}"
        )
    return report


if __name__ == "__main__":
    main()
