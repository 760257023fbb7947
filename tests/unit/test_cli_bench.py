"""The bench report: the solver table follows --batch-sizes / --experts, and every performance
target says whether it was met."""

from __future__ import annotations

import pytest

from fusion_llm.bench.run import _against, markdown, solver_bench


def test_the_solver_table_covers_the_requested_batch_sizes_and_expert_counts():
    rows = solver_bench((300,), batch_sizes=(1, 3), experts=(2,), device="cpu", repeats=1)
    assert [(r["vocab"], r["batch"], r["experts"]) for r in rows] == [(300, 1, 2), (300, 3, 2)]
    assert all(r["dynamic objective"] <= r["paper objective"] + 1e-6 for r in rows)


@pytest.mark.parametrize(
    ("measured", "bound", "met"),
    [(1.05, "<= 1.10", True), (1.2, "<= 1.10", False), (4.0, ">= 4", True), (3.9, ">= 4", False)],
)
def test_a_target_is_met_only_on_the_right_side_of_its_bound(measured, bound, met):
    assert _against(measured, bound) == {"measured": measured, "bound": bound, "met": met}


def test_the_markdown_target_table_has_a_met_column():
    shape = {
        "vocab": 10, "prompt_tokens": 2, "new_tokens": 2,
        "targets": {"1. a (lora|k1)": _against(1.0, "<= 1.1"), "6. b": _against(2.0, ">= 4")},
        "step ms": {}, "grammar": [], "parts ms": {}, "baselines ms": {}, "concurrency": {},
        "memory": {},
    }  # fmt: skip
    text = markdown({"settings": {}, "solver": [], "shapes": {"toy": shape}})
    assert "| target | bound | measured | met |" in text
    assert (
        "| 1. a (lora\\|k1) | <= 1.1 | 1.000 | met |" in text
        and "| 6. b | >= 4 | 2.000 | missed |" in text
    )
