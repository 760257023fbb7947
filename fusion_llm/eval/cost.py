"""Table 3 of the paper on the shipped family: the wall time to train what each method needs, and
its inference time per 1000 samples.

Training seconds are each model's fine-tuning wall time summed over the five tasks, as the zoo
build recorded them (every model timed by one build; with `--full`, the large baselines as retrained
in that run). Inference seconds come from `Reproduction.timed` in the same run (rows interleaved,
median of rounds), so the ratios between methods are measured under one load. A large full FT or
LoRA (merged) baseline runs exactly the large base's forwards, so it is charged the large base's
measured inference time.
"""

from __future__ import annotations

from .reproduce import FUSION_MODES, SOURCES, Row, RowResult, table1
from .tasks import TASKS

# method -> the Table 1 row whose measured inference time it is charged
INFERENCE_ROW = {
    "large base": "large base",
    "large full FT": "large base",
    "large LoRA": "large base",
    **{f"{m} from {s}": f"{m} from {s}" for s in SOURCES for m in FUSION_MODES},
}


def train_seconds(row: str, seconds: dict[str, float]) -> float | None:
    """Seconds to train the five task models `row` needs, from {model name: train seconds}."""
    if row == "large base":
        return None
    if row.startswith("large "):
        suffix = "-lora" if row == "large LoRA" else ""
        return sum(seconds[f"large-{task}{suffix}"] for task in TASKS)
    source = row.rsplit(" ", 1)[-1]
    return sum(seconds[f"{source}-{task}"] for task in TASKS)


def timed_rows() -> list[Row]:
    """The Table 1 rows whose inference the cost table times."""
    return [row for row in table1().rows if row.name in set(INFERENCE_ROW.values())]


def cost_table(timed: dict[str, RowResult], seconds: dict[str, float]) -> dict[str, dict]:
    """{method: {"train_s", "infer_s_per_1000", "vs_large", "ms_per_token"}} from the timed Table 1
    rows and {model name: train seconds}."""
    large = timed["large base"]
    table = {}
    for name, infer_row in INFERENCE_ROW.items():
        measured = timed[infer_row]
        per_sample = measured.seconds / measured.samples
        table[name] = {
            "train_s": train_seconds(name, seconds),
            "infer_s_per_1000": 1000 * per_sample,
            "vs_large": per_sample / (large.seconds / large.samples),
            "ms_per_token": 1000 * measured.seconds / max(1, measured.new_tokens),
        }
    return table


def cost_markdown(table: dict[str, dict]) -> str:
    lines = [
        "| method | train s (5 tasks) | inference s / 1000 samples | x large alone | ms / new token |",
        "|---|---|---|---|---|",
    ]
    for name, c in table.items():
        train = "-" if c["train_s"] is None else f"{c['train_s']:.0f}"
        lines.append(
            f"| {name} | {train} | {c['infer_s_per_1000']:.1f} | {c['vs_large']:.2f} "
            f"| {c['ms_per_token']:.2f} |"
        )
    return "\n".join(lines)
