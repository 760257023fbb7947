"""Table 3 of the paper on the shipped family: the wall time to train what each method needs, and
its inference time per 1000 samples.

Training seconds are each model's fine-tuning wall time per task, as the zoo build recorded them
(every model timed by one build; with `--full`, the large baselines as retrained in that run).
Inference seconds come from `Reproduction.timed` in the same run (rows interleaved, median of
rounds), so the ratios between methods are measured under one load. A large full FT or LoRA
(merged) baseline runs exactly the large base's forwards, so it is charged the large base's
measured inference time.
"""

from __future__ import annotations

from ..core.config import FUSED_MODES
from .reproduce import Row, RowResult, table1
from .tasks import TASKS


def cost_rows() -> list[Row]:
    """The Table 1 rows Table 3 prices: the large base, its fine-tuned baselines, every fusion row."""
    return [
        row
        for row in table1().rows
        if row.mode in FUSED_MODES or (row.mode == "none" and row.model.startswith("large"))
    ]


def trained_models(row: Row) -> list[str]:
    """The zoo models `row` needs fine-tuned, one per task (none for the large base)."""
    if row.mode in FUSED_MODES:
        return [f"{row.source}-{task}" for task in TASKS]  # the full fine-tunes fusion rows fuse
    return [] if row.model == "large" else [row.model.format(task=task) for task in TASKS]


def inference_row(row: Row) -> str:
    """The row whose measured inference time `row` is charged."""
    return row.name if row.mode in FUSED_MODES else "large base"


def timed_rows() -> list[Row]:
    """The rows whose inference `Reproduction.timed` measures for this table."""
    return [row for row in cost_rows() if inference_row(row) == row.name]


def cost_table(timed: dict[str, RowResult], seconds: dict[str, float]) -> dict[str, dict]:
    """{method: {"train_s": {task: s} or None, "train_total_s", "infer_s_per_1000", "vs_large",
    "ms_per_token"}} from the timed rows and {model name: train seconds}."""
    large = timed["large base"]
    table = {}
    for row in cost_rows():
        models = trained_models(row)
        measured = timed[inference_row(row)]
        per_sample = measured.seconds / measured.samples
        table[row.name] = {
            "train_s": {t: seconds[m] for t, m in zip(TASKS, models, strict=True)}
            if models
            else None,
            "train_total_s": sum(seconds[m] for m in models) if models else None,
            "infer_s_per_1000": 1000 * per_sample,
            "vs_large": per_sample / (large.seconds / large.samples),
            "ms_per_token": 1000 * measured.seconds / max(1, measured.new_tokens),
        }
    return table


def cost_markdown(table: dict[str, dict]) -> str:
    header = [
        "method",
        *[f"train s: {t}" for t in TASKS],
        "train s: total",
        "inference s / 1000 samples",
        "x large alone",
        "ms / new token",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, c in table.items():
        train = [f"{c['train_s'][t]:.1f}" for t in TASKS] if c["train_s"] else ["-"] * len(TASKS)
        total = "-" if c["train_total_s"] is None else f"{c['train_total_s']:.0f}"
        cells = [name, *train, total, f"{c['infer_s_per_1000']:.1f}", f"{c['vs_large']:.2f}"]
        lines.append("| " + " | ".join([*cells, f"{c['ms_per_token']:.2f}"]) + " |")
    return "\n".join(lines)
