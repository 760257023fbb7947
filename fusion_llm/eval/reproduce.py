"""Table 1 of the paper (single task, large target) on the shipped model family.

Rows: the large base alone, the `small` and `mid` experts alone, and static alpha=1 / `paper` /
`dynamic` fusion from each of them; columns: the five tasks and their average. Every row reads the
same eval prompts with greedy decoding, and every answer is scored on its first line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..engine import FusionEngine
from ..zoo import zoo_config, zoo_path
from .metrics import score
from .tasks import TASKS, load_task

FUSION_MODES = ("static", "paper", "dynamic")


@dataclass(frozen=True)
class Row:
    name: str
    source: str | None  # the expert's base for fusion and expert rows
    mode: str  # "none" for a model alone


def table1_rows() -> list[Row]:
    rows = [Row("large base", None, "none")]
    for source in ("small", "mid"):
        rows.append(Row(f"{source} expert", source, "expert"))
        rows += [Row(f"{mode} from {source}", source, mode) for mode in FUSION_MODES]
    return rows


def _answers(row: Row, task: str, prompts: list[str], max_new_tokens: int) -> list[str]:
    request = {"max_new_tokens": max_new_tokens, "stop": ["\n"]}
    if row.mode == "expert":
        engine = FusionEngine({"large": {"path": str(zoo_path(_expert_name(row.source, task)))},
                               "small": {"path": str(zoo_path(row.source))}})  # fmt: skip
        return [g.text for g in engine.generate(prompts, mode="none", **request)]
    config = zoo_config([task], source=row.source or "small", kind="full")
    engine = FusionEngine(config)
    return [g.text for g in engine.generate(prompts, mode=row.mode, **request)]


def _expert_name(source: str | None, task: str) -> str:
    return f"{source}-{task}"


def table1(n: int = 50, max_new_tokens: int = 48, log=print) -> dict[str, dict[str, float]]:
    """{row name: {task: score in %, "avg": mean}} over the first `n` eval examples per task."""
    results: dict[str, dict[str, float]] = {}
    for row in table1_rows():
        scores = {}
        for task in TASKS:
            examples = load_task(task, "eval", n)
            answers = _answers(row, task, [e.prompt for e in examples], max_new_tokens)
            scores[task] = (
                100
                * sum(score(task, a, e.answer) for a, e in zip(answers, examples, strict=True))
                / n
            )
        scores["avg"] = sum(scores[t] for t in TASKS) / len(TASKS)
        results[row.name] = scores
        log(f"{row.name}: " + " ".join(f"{t} {v:.1f}" for t, v in scores.items()))
    return results


def markdown(results: dict[str, dict[str, float]]) -> str:
    columns = [*TASKS, "avg"]
    lines = ["| row | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, scores in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[c]:.1f}" for c in columns) + " |")
    return "\n".join(lines)


def write(results: dict, out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table1.json").write_text(json.dumps(results, indent=2))
    (out / "table1.md").write_text(markdown(results) + "\n")
