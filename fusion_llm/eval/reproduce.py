"""Tables 1 and 2 of the paper on the shipped model family.

Table 1 (single task): the large base alone, the `small` and `mid` experts alone, and static
alpha=1 / `paper` / `dynamic` fusion from each. Table 2 (multi-task): the large base, the small and
mid multi-task fine-tunes, and `paper` / `dynamic` fusion of the four seen experts at once (`mc`
unseen). Columns: the five tasks and their average. Every row reads the same eval prompts with
greedy decoding, and every answer is scored on its first line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..engine import FusionEngine
from ..zoo import zoo_config, zoo_path
from .metrics import score
from .tasks import SEEN_TASKS, TASKS, load_task

FUSION_MODES = ("static", "paper", "dynamic")


@dataclass(frozen=True)
class Row:
    name: str
    mode: str  # "none": `model` generates alone; otherwise the fusion mode
    model: str = "large"  # zoo model name, "{task}" is filled in (e.g. "small-{task}")
    source: str = "small"  # fusion: the base whose experts are fused
    experts: str = "task"  # fusion: "task" (the question's own expert) or "seen" (all four seen)


def table1_rows() -> list[Row]:
    """Single task: each question fuses its own task's expert."""
    rows = [Row("large base", "none")]
    for source in ("small", "mid"):
        rows.append(Row(f"{source} expert", "none", model=f"{source}-{{task}}"))
        rows += [Row(f"{mode} from {source}", mode, source=source) for mode in FUSION_MODES]
    return rows


def table2_rows() -> list[Row]:
    """Multi-task: the four seen experts are active for every question (`mc` is unseen)."""
    rows = [Row("large base", "none")]
    rows += [
        Row(f"{source} multi-task FT", "none", model=f"{source}-multi")
        for source in ("small", "mid")
    ]
    for source in ("small", "mid"):
        rows += [
            Row(f"{mode}, 4 {source} experts", mode, source=source, experts="seen")
            for mode in ("paper", "dynamic")
        ]
    return rows


def table(
    rows: list[Row], n: int = 50, max_new_tokens: int = 48, log=print
) -> dict[str, dict[str, float]]:
    """{row name: {task: score in %, "avg": mean}} over the first `n` eval examples per task."""
    engines: dict[str, FusionEngine] = {}  # one engine per distinct config, reused across tasks
    request = {"max_new_tokens": max_new_tokens, "stop": ["\n"]}
    results: dict[str, dict[str, float]] = {}
    for row in rows:
        scores = {}
        for task in TASKS:
            examples = load_task(task, "eval", n)
            config, experts = _config(row, task)
            key = json.dumps(config, sort_keys=True)
            engine = engines.setdefault(key, FusionEngine(config))
            mode = row.mode if experts else "none"
            generations = engine.generate(
                [e.prompt for e in examples], experts=experts, mode=mode, **request
            )
            total = sum(
                score(task, g.text, e.answer) for g, e in zip(generations, examples, strict=True)
            )
            scores[task] = 100 * total / n
        scores["avg"] = sum(scores[t] for t in TASKS) / len(TASKS)
        results[row.name] = scores
        log(f"{row.name}: " + " ".join(f"{t} {v:.1f}" for t, v in scores.items()))
    return results


def _config(row: Row, task: str) -> tuple[dict, list[str]]:
    """The engine config and the experts to fuse for one row and task."""
    if row.mode == "none":
        large = zoo_path(row.model.format(task=task))
        return {"large": {"path": str(large)}, "small": {"path": str(zoo_path("small"))}}, []
    experts = [task] if row.experts == "task" else list(SEEN_TASKS)
    return zoo_config(experts, source=row.source, kind="full"), experts


def markdown(results: dict[str, dict[str, float]]) -> str:
    columns = [*TASKS, "avg"]
    lines = ["| row | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, scores in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[c]:.1f}" for c in columns) + " |")
    return "\n".join(lines)


def write(results: dict, out_dir: str | Path, name: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    (out / f"{name}.md").write_text(markdown(results) + "\n")
