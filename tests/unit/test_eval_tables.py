"""Rendering of the reproduced tables: marks, gap closed and the cost table's sums (no models)."""

import pytest

from fusion_llm.eval.cost import cost_table
from fusion_llm.eval.reproduce import RowResult, Table, gap_closed, markdown, table1, table2
from fusion_llm.eval.tasks import TASKS


def _result(value: float, seconds: float | None = None, tokens: int = 0) -> RowResult:
    scores = dict.fromkeys(TASKS, value) | {"avg": value}
    return RowResult(scores=scores, seconds=seconds, samples=10, new_tokens=tokens)


def test_gap_closed_is_the_share_of_the_fine_tuning_gain():
    assert gap_closed(30.0, 10.0, 50.0) == pytest.approx(0.5)
    assert gap_closed(5.0, 10.0, 50.0) == pytest.approx(-0.125)  # below the base: negative
    assert gap_closed(12.0, 10.0, 10.0) is None  # fine-tuning gained nothing: undefined


def test_markdown_bolds_the_best_per_source_and_daggers_fusion_over_its_expert():
    table = table1()
    values = {row.name: 10.0 for row in table.rows}
    values |= {"large full FT": 50.0, "small expert": 30.0, "dynamic from small": 35.0}
    values |= {"mid expert": 40.0, "static from mid": 20.0}
    text = markdown(table, {name: _result(v) for name, v in values.items()})
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()[2:]}
    assert "**35.0†**" in lines["dynamic from small"]  # best of small and above its expert
    assert "**" not in lines["small expert"] and "†" not in lines["static from small"]
    assert "**40.0**" in lines["mid expert"] and "†" not in lines["static from mid"]
    assert "**" not in lines["large base"]  # ungrouped rows are never marked
    assert lines["dynamic from small"].endswith("| 62.5 % |")  # (35 - 10) / (50 - 10)
    assert lines["large base"].endswith("| - |") and lines["large full FT"].endswith("| - |")
    assert len(lines) == len(table.rows)


def test_committed_rows_are_labelled_and_gap_closed_needs_the_same_settings():
    table = Table("t", table2().rows[:3], full_ft="large multi-task FT")
    names = [row.name for row in table.rows]
    results = {name: _result(v) for name, v in zip(names, (10, 20, 15), strict=True)}
    results["large multi-task FT"].committed = True
    text = markdown(table, results)
    assert "| large multi-task FT (committed) |" in text
    assert text.splitlines()[-1].endswith("| 50.0 % |")  # (15 - 10) / (20 - 10)
    results["large multi-task FT"].comparable = False  # committed at another --n
    assert markdown(table, results).splitlines()[-1].endswith("| - |")


def test_cost_table_sums_the_five_experts_and_charges_baselines_the_large_forwards():
    rows = {row.name: _result(0.0, seconds=2.0, tokens=100) for row in table1().rows}
    rows["dynamic from small"] = _result(0.0, seconds=5.0, tokens=200)
    seconds = {f"{base}-{t}": 1.0 for base in ("small", "mid", "large") for t in TASKS}
    seconds |= {f"large-{t}-lora": 3.0 for t in TASKS}
    seconds["mid-math"] = 4.0
    cost = cost_table(rows, seconds)
    assert cost["large base"]["train_s"] is None and cost["large base"]["train_total_s"] is None
    assert cost["large full FT"]["train_total_s"] == 5.0
    assert cost["large LoRA"]["train_total_s"] == 15.0
    assert cost["dynamic from mid"]["train_s"] == {t: 4.0 if t == "math" else 1.0 for t in TASKS}
    assert cost["static from mid"]["train_total_s"] == 8.0
    assert set(cost) == {r.name for r in table1().rows} - {"small expert", "mid expert"}
    assert cost["large LoRA"]["infer_s_per_1000"] == cost["large base"]["infer_s_per_1000"] == 200.0
    assert cost["dynamic from small"]["vs_large"] == pytest.approx(2.5)
    assert cost["dynamic from small"]["ms_per_token"] == pytest.approx(25.0)
