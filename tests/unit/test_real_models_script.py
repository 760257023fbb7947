"""The pure parts of scripts/real_models (a folder run as a script): generated data, bootstrap
intervals, paired differences, the decision rule. No model is loaded."""

from __future__ import annotations

import importlib
import operator
import random
import sys
from pathlib import Path

import pytest

FOLDER = Path(__file__).resolve().parents[2] / "scripts" / "real_models"


def _load_modules(*names: str) -> list:
    """The script's modules, imported as `python scripts/real_models` runs them: with the folder on
    sys.path, as top-level modules that import each other by name."""
    sys.path.insert(0, str(FOLDER))
    try:
        modules = [importlib.import_module(name) for name in names]
    finally:
        sys.path.remove(str(FOLDER))
    for module in modules:  # not a module of the same name from elsewhere
        assert Path(module.__file__).parent == FOLDER, module.__file__
    return modules


agent, arith, lmeval, pyout, report, stats, tasks = _load_modules(
    "agent", "arith", "lmeval", "pyout", "report", "stats", "tasks"
)
Estimate = stats.Estimate
STEP = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
SIZES = {"train": 60, "gate": 10, "eval": 30}


# -- arith data -------------------------------------------------------------------------------


def test_arith_answers_equal_a_recomputation_of_the_generated_operations() -> None:
    rng = random.Random(7)
    for _ in range(500):
        problem = arith.arith_problem(rng)
        assert 2 <= len(problem.steps) <= 4
        total = problem.start
        for op, number in problem.steps:
            total = STEP[op](total, number)
            assert total == int(total) and total >= 2  # exact divisions, no quantity below 2
        assert problem.answer == total
        assert problem.question.endswith("?")


def test_arith_rows_show_every_step_and_end_with_the_answer() -> None:
    row = arith.arith_row(random.Random(3))
    completion = row["completion"]
    assert "\n" not in completion  # eval stops at the newline: the solution is one line
    assert completion.endswith(f" The answer is {row['answer']}.")
    assert completion.count("=") == len(row["steps"])
    assert row["prompt"] == f"Question: {row['question']}\nAnswer:"


def test_the_metric_reads_the_answer_of_a_worked_solution() -> None:
    from fusion_llm.eval.metrics import number_match

    row = arith.arith_row(random.Random(5))
    assert number_match(row["completion"], row["completion"]) == 1.0
    assert number_match(f" {row['answer']}", row["completion"]) == 1.0


@pytest.mark.parametrize("task", ["pyout", "arith"])
def test_splits_are_disjoint_sized_and_deterministic_in_the_seed(task: str) -> None:
    row = tasks.TASKS[task].row
    splits = tasks.make_splits(row, 11, SIZES)
    assert {name: len(rows) for name, rows in splits.items()} == SIZES
    prompts = [{r["prompt"] for r in rows} for rows in splits.values()]
    assert sum(len(p) for p in prompts) == sum(SIZES.values())  # no prompt in two splits
    assert tasks.make_splits(row, 11, SIZES) == splits
    assert tasks.make_splits(row, 12, SIZES) != splits


def test_multiple_choice_rows_hold_the_output_and_three_other_prints() -> None:
    rows = tasks.make_splits(pyout.pyout_row, 0, {"eval": 40})["eval"]
    questions = lmeval.mc_rows(rows, 20, seed=0)
    assert len(questions) == 20
    outputs = {r["prompt"]: r["output"] for r in rows}
    for question in questions:
        assert len(set(question["choices"])) == 4
        assert question["choices"][question["answer"]] == outputs[question["prompt"]]


# -- bootstrap and paired differences ---------------------------------------------------------


def test_an_lm_eval_result_keeps_each_questions_likelihoods_and_choice_in_doc_order() -> None:
    task = lmeval.LMEVAL_TASK
    likely_second = [(-1.0, False), (-0.5, True), (-3.0, False), (-2.0, False)]
    likely_first = [(-0.1, True), (-0.9, False), (-4.0, False), (-0.2, False)]
    output = {
        "results": {task: {"acc,none": 0.5, "acc_stderr,none": 0.5, "acc_norm,none": 0.5}},
        "samples": {
            task: [  # lm-eval's samples, out of doc order
                {"doc_id": 1, "acc": 0.0, "filtered_resps": likely_second},
                {"doc_id": 0, "acc": 1.0, "filtered_resps": likely_first},
            ]
        },
    }
    result = lmeval.lmeval_result(output, 12.34)
    assert result["per_question"] == [1.0, 0.0] and result["chosen"] == [0, 1]
    assert result["log_likelihoods"][1] == [-1.0, -0.5, -3.0, -2.0]
    assert (result["acc"], result["seconds"]) == (0.5, 12.3)


def test_bootstrap_interval_contains_the_mean_and_matches_the_binomial_width() -> None:
    values = [100.0] * 50 + [0.0] * 50
    estimate = stats.bootstrap(values)
    assert estimate.mean == 50.0
    assert estimate.low < 50.0 < estimate.high
    # sd of the mean is 5 points: the 95 % interval is about 50 +- 9.8
    assert estimate.low == pytest.approx(40.2, abs=1.5)
    assert estimate.high == pytest.approx(59.8, abs=1.5)


def test_bootstrap_is_seeded_and_constant_rows_have_no_width() -> None:
    values = [float(v) for v in random.Random(0).choices([0, 100], k=80)]
    assert stats.bootstrap(values, seed=3) == stats.bootstrap(values, seed=3)
    assert stats.bootstrap([70.0] * 30) == Estimate(70.0, 70.0, 70.0)


def test_a_difference_of_identical_rows_is_exactly_zero() -> None:
    values = [float(v) for v in random.Random(1).choices([0, 100], k=200)]
    assert stats.paired_difference(values, values) == Estimate(0.0, 0.0, 0.0)


def test_paired_differences_cancel_what_both_rows_share() -> None:
    rng = random.Random(2)
    base = [float(rng.choice([0, 100])) for _ in range(200)]
    shifted = [v + 10.0 for v in base]
    assert stats.paired_difference(shifted, base) == Estimate(10.0, 10.0, 10.0)
    # one row right on 20 more questions than the other, otherwise the same answers
    better = [100.0 if i < 20 else v for i, v in enumerate([0.0] * 20 + base[20:])]
    worse = [0.0] * 20 + base[20:]
    difference = stats.paired_difference(better, worse)
    assert difference.mean == pytest.approx(10.0)
    assert difference.low > 0  # paired: separated, though the rows' own intervals overlap
    assert stats.bootstrap(worse).high > stats.bootstrap(better).low


def test_paired_rows_must_cover_the_same_questions() -> None:
    with pytest.raises(ValueError, match="same questions"):
        stats.paired_difference([1.0, 2.0], [1.0])


# -- costs and the decision -------------------------------------------------------------------


def test_costs_are_milliseconds_per_generated_token_relative_to_large_alone() -> None:
    results = {
        "large alone": {"seconds": 10.0, "new_tokens": 1000},
        "static": {"seconds": 15.0, "new_tokens": 1000},
        "paper": {"seconds": 40.0, "new_tokens": 2000},
        "dynamic": {"seconds": 36.0, "new_tokens": 1800},
    }
    assert report.token_costs(results)["static"] == 15.0
    costs = report.mode_costs({"pyout": results, "arith": results})
    assert costs == pytest.approx({"static": 1.5, "paper": 2.0, "dynamic": 2.0})


def test_question_scores_are_per_question_percentages() -> None:
    result = {"references": ["4", "5"], "predictions": {"large alone": ["4", "6"]}}
    scores = report.question_scores(result, lambda p, r: float(p == r))
    assert scores == {"large alone": [100.0, 0.0]}


COSTS = {"static": 1.4, "paper": 2.3, "dynamic": 1.9}
NOTHING = Estimate(0.5, -3.0, 4.0)


def _differences(**overrides: Estimate) -> dict:
    """Both tasks with nothing separated, but for the overrides `task__a__b` (a - b)."""
    tables = {
        task: {
            ("static", "paper"): NOTHING,
            ("static", "dynamic"): NOTHING,
            ("paper", "dynamic"): NOTHING,
        }
        for task in ("pyout", "arith")
    }
    for key, estimate in overrides.items():
        task, a, b = key.split("__")
        tables[task][(a, b)] = estimate
    return tables


def test_when_every_interval_contains_zero_nothing_separates_the_modes() -> None:
    mode, sentence = stats.decide(COSTS, _differences())
    assert mode == "static"
    assert "nothing separates the modes" in sentence


def test_costs_within_the_noise_tie_and_the_tie_goes_to_the_mode_with_less_work() -> None:
    measured = {"static": 1.82, "paper": 1.80, "dynamic": 1.75}  # 4 % apart: noise
    assert stats.cost_order(measured) == ["static", "paper", "dynamic"]
    assert stats.decide(measured, _differences())[0] == "static"
    cheaper = {"static": 1.82, "paper": 1.80, "dynamic": 1.60}  # 12 % cheaper: measured
    assert stats.cost_order(cheaper) == ["dynamic", "static", "paper"]
    assert stats.decide(cheaper, _differences())[0] == "dynamic"


def test_the_cheapest_mode_beaten_on_one_task_is_passed_over() -> None:
    beaten = Estimate(-8.0, -14.0, -2.0)  # static - dynamic, on arith only
    mode, sentence = stats.decide(COSTS, _differences(arith__static__dynamic=beaten))
    assert mode == "dynamic"
    assert "beats static" in sentence


def test_differences_are_read_in_either_order() -> None:
    dynamic_wins = Estimate(8.0, 2.0, 14.0)  # dynamic - static given as (dynamic, static)
    differences = _differences()
    for table in differences.values():
        del table[("static", "dynamic")]
    differences["pyout"][("dynamic", "static")] = dynamic_wins
    differences["arith"][("dynamic", "static")] = NOTHING
    assert stats.decide(COSTS, differences)[0] == "dynamic"


def test_a_mode_beaten_by_a_dearer_one_loses_even_if_it_beats_another() -> None:
    differences = _differences(
        pyout__static__paper=Estimate(6.0, 1.0, 11.0),  # static beats paper
        arith__static__dynamic=Estimate(-6.0, -11.0, -1.0),  # but dynamic beats static
        arith__paper__dynamic=Estimate(-6.0, -11.0, -1.0),
    )
    assert stats.decide(COSTS, differences)[0] == "dynamic"


# -- agent outcomes ---------------------------------------------------------------------------


def test_agent_outcome_counts_calls_errors_and_checks_the_final_number() -> None:
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    call = {"name": "calculate", "args": {"expression": "3 * 4"}, "id": "c1"}
    messages = [
        HumanMessage("What is 3 times 4, plus 2?"),
        AIMessage("", tool_calls=[call]),
        ToolMessage("12", tool_call_id="c1"),
        AIMessage("", tool_calls=[{**call, "id": "c2", "args": {"expression": "12 +"}}]),
        ToolMessage("error: bad", tool_call_id="c2", status="error"),
        AIMessage("The answer is 14."),
    ]
    outcome = agent.agent_outcome(messages, 14)
    assert (outcome["parsed"], outcome["calls"], outcome["tool_errors"]) == (True, 2, 1)
    assert outcome["correct"] and outcome["final"] == "The answer is 14."
    unparsed = [AIMessage('<tool_call>{"name": "calculate"'), AIMessage("13")]
    outcome = agent.agent_outcome(unparsed, 14)
    assert (outcome["parsed"], outcome["calls"], outcome["correct"]) == (False, 0, False)
    assert agent.agent_outcome([], 14)["correct"] is False
    # A final reply that is a call the parser could not read is no answer, whatever it holds.
    for cut in ('<tool_call>{"name": "calculate", "arguments": {"expression": "3 * 4 + 2 = 14',
                '{"name": "calculate", "description": "3 * 4 = 12. 12 + 2 = 14."}'):  # fmt: skip
        assert agent.agent_outcome([AIMessage(cut)], 14)["correct"] is False
        assert agent.answered(cut, 14) is False
    assert agent.answered("3 * 4 = 12, 12 + 2 = 14. The answer is 14.", 14) is True
