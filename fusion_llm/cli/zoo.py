"""`fusion-llm zoo build`, `info`, `config` and `export`; `register` plugs them into the main CLI.

Registering imports no torch: the build recipe is imported when `zoo build` runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

from ..core.config import FUSION_MODES
from ..core.errors import RequestError
from ..zoo import DEFAULT_EXPERT_KIND, MODELS_DIR, zoo_config, zoo_info, zoo_path
from ..zoo.manifest import read_manifest
from ..zoo.task_families import TASKS
from .args import THREADS_HELP, DefaultsFormatter, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `zoo` command; each leaf sets `run(args) -> int`, the main CLI's dispatch key."""
    zoo = subparsers.add_parser("zoo", help="the shipped toy model family")
    commands = zoo.add_subparsers(dest="zoo_command", required=True)

    build = commands.add_parser(
        "build", help="train every zoo model from seeds (full: about an hour with --processes 2)"
    )
    build.add_argument("--scale", choices=["toy", "full"], default="full")
    build.add_argument("--out", type=Path, default=MODELS_DIR, help="where the models go")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument(
        "--baselines",
        type=Path,
        help="where the large fine-tuned baselines go, not shipped (default: zoo-baselines/)",
    )
    build.add_argument("--no-baselines", action="store_true", help="skip the large baselines")
    build.add_argument("--threads", type=positive_int, help=THREADS_HELP + " (per process)")
    build.add_argument(
        "--processes",
        type=int,
        choices=[1, 2],
        default=1,
        help="2: pretrain the large base in a second process beside the rest (the same family, "
        "sooner on a machine with 2 free cores)",
    )
    build.set_defaults(run=_build)

    info = commands.add_parser("info", help="list the zoo's models and their folders")
    info.add_argument("--dir", type=Path, default=MODELS_DIR)
    info.set_defaults(run=_info)

    config = commands.add_parser(
        "config",
        help="print an engine config for the shipped family (fusion-llm zoo config > fusion.yaml)",
        formatter_class=DefaultsFormatter,
    )
    config.add_argument(
        "--source", choices=list(DEFAULT_EXPERT_KIND), default="small", help="the experts' base"
    )
    config.add_argument(
        "--kind", choices=["lora", "full"], help="expert kind (default: lora on small, full on mid)"
    )
    config.add_argument(
        "--experts", default=",".join(TASKS), help="comma-separated tasks, one expert each"
    )
    config.add_argument("--mode", choices=FUSION_MODES, default="dynamic", help="fusion")
    config.set_defaults(run=_config)

    export = commands.add_parser(
        "export",
        help="write a task's train or eval split as JSONL rows (for train-expert, gate and eval)",
        formatter_class=DefaultsFormatter,
    )
    export.add_argument("task", choices=TASKS, help="the task whose rows to write")
    export.add_argument(
        "--split",
        choices=["train", "eval"],
        default="train",
        help="the experts' train split or eval",
    )
    export.add_argument(
        "--n", type=positive_int, help="only the first n rows (default: the whole split)"
    )
    export.add_argument("--out", type=Path, help="JSONL file (default: stdout)")
    export.add_argument("--dir", type=Path, default=MODELS_DIR, help="the zoo whose data it is")
    export.set_defaults(run=_export)


def _build(args: argparse.Namespace) -> int:
    from ..zoo.build import DEFAULT_BASELINES_DIR, build_zoo

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    baselines = None if args.no_baselines else (args.baselines or DEFAULT_BASELINES_DIR)
    build_zoo(
        args.out,
        scale=args.scale,
        seed=args.seed,
        baselines_dir=baselines,
        threads=args.threads,
        processes=args.processes,
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    rows = zoo_info(args.dir)
    print(
        f"{'name':<22} {'kind':<5} {'base':<6} {'task':<9} {'seed':>4} {'params':>10} "
        f"{'train s':>8}  folder"
    )
    for r in rows:
        folder = zoo_path(r["name"], args.dir) if r["shipped"] else "(not shipped)"
        seed = "-" if r["seed"] is None else r["seed"]
        print(
            f"{r['name']:<22} {r['kind']:<5} {r['base'] or '-':<6} {r['task'] or '-':<9} "
            f"{seed:>4} {r['params']:>10,} {r['train_seconds']:>8.1f}  {folder}"
        )
    return 0


def _export(args: argparse.Namespace) -> int:
    """The split the build trained (or evaluates) on, regenerated from the zoo's scale and seed."""
    from ..eval.tasks import load_task

    manifest = read_manifest(args.dir)
    examples = load_task(args.task, args.split, args.n, manifest["scale"], manifest["seed"])
    lines = "".join(
        json.dumps({"prompt": e.prompt, "completion": e.target}) + "\n" for e in examples
    )
    if args.out is None:
        sys.stdout.write(lines)
    else:
        args.out.write_text(lines, encoding="utf-8")
        print(f"wrote {len(examples)} {args.task} {args.split} rows to {args.out}", file=sys.stderr)
    return 0


def _config(args: argparse.Namespace) -> int:
    """YAML with absolute folders, so the file works from any directory; answers are one line."""
    tasks = [t for t in args.experts.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        msg = f"unknown task(s) {', '.join(unknown)}; the zoo's tasks are {', '.join(TASKS)}"
        raise RequestError(msg)
    config = zoo_config(tasks, args.source, args.kind, args.mode)
    config["generation"] = {"max_new_tokens": 48, "stop": ["\n"]}
    print(yaml.safe_dump(config, sort_keys=False), end="")
    return 0
