"""`fusion-llm zoo build` and `fusion-llm zoo info`; `register` plugs them into the main CLI."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fusion_llm.zoo import MODELS_DIR, build_zoo, zoo_info
from fusion_llm.zoo.build import DEFAULT_BASELINES_DIR


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `zoo` command; each leaf sets `run(args) -> int`, the main CLI's dispatch key."""
    zoo = subparsers.add_parser("zoo", help="the shipped toy model family")
    commands = zoo.add_subparsers(dest="zoo_command", required=True)

    build = commands.add_parser(
        "build", help="re-create every zoo model from seeds (full: about 75 min on one thread)"
    )
    build.add_argument("--scale", choices=["toy", "full"], default="full")
    build.add_argument("--out", type=Path, default=MODELS_DIR, help="where the models go")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument(
        "--baselines",
        type=Path,
        default=DEFAULT_BASELINES_DIR,
        help="where the large fine-tuned baselines go (not shipped)",
    )
    build.add_argument("--no-baselines", action="store_true", help="skip the large baselines")
    build.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    build.set_defaults(run=_build)

    info = commands.add_parser("info", help="list the zoo's models")
    info.add_argument("--dir", type=Path, default=MODELS_DIR)
    info.set_defaults(run=_info)


def _build(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    baselines = None if args.no_baselines else args.baselines
    build_zoo(
        args.out, scale=args.scale, seed=args.seed, baselines_dir=baselines, threads=args.threads
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    rows = zoo_info(args.dir)
    print(f"{'name':<22} {'kind':<5} {'base':<6} {'task':<9} {'params':>10} {'train s':>8} shipped")
    for r in rows:
        print(
            f"{r['name']:<22} {r['kind']:<5} {r['base'] or '-':<6} {r['task'] or '-':<9} "
            f"{r['params']:>10,} {r['train_seconds']:>8.1f} {'yes' if r['shipped'] else 'no'}"
        )
    return 0
