"""What every cookbook shares: which models to run.

By default the cookbooks run the shipped model family (`fusion_llm.zoo`) with one expert per task;
`--config PATH` runs any fusion config file instead (the smoke tests use the tiny test family).
"""

from __future__ import annotations

import argparse
from typing import Any


def add_model_arguments(parser: argparse.ArgumentParser, **task_defaults: str) -> None:
    """`--config` plus one `--<step>-task` option per cookbook step (its expert's task name)."""
    parser.add_argument("--config", help="fusion config file (default: the shipped zoo)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    for step, task in task_defaults.items():
        parser.add_argument(f"--{step}-task", default=task, help=f"expert of the {step} step")


def fusion_config(path: str | None, tasks: list[str]) -> str | dict[str, Any]:
    """The given config file, else the shipped zoo with one expert per task."""
    if path:
        return path
    from fusion_llm.zoo import zoo_config  # raises ZooNotBuiltError with the command to build it

    return zoo_config(list(dict.fromkeys(tasks)))
