"""`fusion-llm demo` on the shipped family: scored rows per task, readable questions, JSON, tasks."""

from __future__ import annotations

import json

import pytest

from fusion_llm import FusionEngine
from fusion_llm.cli.main import main
from fusion_llm.eval.demo import run_demo
from fusion_llm.eval.metrics import score
from fusion_llm.eval.tasks import TASKS, load_task
from fusion_llm.zoo import zoo_path

SETTINGS = ["--n", "2", "--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def demo_json():
    """Full fine-tuned experts: the expert row can be checked against the expert loaded alone."""
    return run_demo(kind="full", n=2, examples=2, max_new_tokens=6).to_json()


def test_every_task_has_three_scored_rows_and_the_scores_are_the_answers_means(demo_json):
    assert [t["task"] for t in demo_json["tasks"]] == list(TASKS)
    for task in demo_json["tasks"]:
        assert set(task["scores"]) == {"large", "expert", "fused"}
        for row, value in task["scores"].items():  # examples = the whole slice here
            mean = sum(e["answers"][row]["score"] for e in task["examples"]) / 2
            assert value == pytest.approx(100 * mean)
        best = max(task["scores"].values())
        assert task["winners"] == [r for r, v in task["scores"].items() if v == best]
        fused, others = task["scores"]["fused"], (task["scores"]["large"], task["scores"]["expert"])
        assert task["transfer"] == (fused > max(others))


def test_the_rows_are_the_large_base_alone_and_the_expert_alone(demo_json):
    """The large row is the large base's own greedy answer, the expert row (the expert fused into
    its own base at alpha 1) the answer of the expert checkpoint loaded alone."""
    examples = load_task("trivia", "eval", 2)
    prompts = [e.prompt for e in examples]
    trivia = next(t for t in demo_json["tasks"] if t["task"] == "trivia")
    for row, model in (("large", "large"), ("expert", "small-trivia")):
        engine = FusionEngine(
            {"large": {"path": str(zoo_path(model))}, "small": {"path": str(zoo_path("small"))}}
        )
        generations = engine.generate(prompts, mode="none", max_new_tokens=6, stop=["\n"])
        for generation, example, shown in zip(
            generations, examples, trivia["examples"], strict=True
        ):
            assert shown["answers"][row]["text"] == generation.text.strip()
            assert shown["answers"][row]["score"] == score(
                "trivia", generation.text, example.answer
            )


def test_the_fused_row_carries_its_alpha_per_token(demo_json):
    for task in demo_json["tasks"]:
        assert set(task["alpha"]) == {"mean", "min", "max"}
        assert task["alpha"]["min"] <= task["alpha"]["mean"] <= task["alpha"]["max"]
        for example in task["examples"]:
            assert len(example["alpha"]) == len(example["tokens"]) > 0
    assert demo_json["mode"] == "dynamic" and demo_json["n"] == 2


def test_json_holds_only_the_chosen_tasks(capsys):
    assert main(["demo", *SETTINGS, "--examples", "1", "--experts", "math", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [t["task"] for t in data["tasks"]] == ["math"] and len(data["tasks"][0]["examples"]) == 1
    assert data["seconds"] > 0 and (data["source"], data["kind"]) == ("small", "lora")


def test_the_text_report_has_a_legend_a_score_table_and_whole_questions(capsys):
    assert main(["demo", *SETTINGS, "--examples", "1", "--experts", "summary,mc"]) == 0
    out = capsys.readouterr().out
    assert "large   the large base alone" in out and "fused   the large base decoded" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["task", "metric"])
    table = [line.split() for line in lines[header + 1 : header + 3]]
    assert [row[0] for row in table] == ["summary", "mc"] and lines[header + 3].split()[
        0
    ] == "average"
    assert all(len(row) >= 6 for row in table)  # task, metric, three scores, best
    assert "weak-to-strong transfer" in out and "[truthful]" not in out
    flat = " ".join(out.split())
    for task in ("summary", "mc"):  # the whole question, options included, never cut mid-word
        question = load_task(task, "eval", 1)[0].prompt.rsplit("\n", 1)[0]
        assert " ".join(question.split()) in flat
    assert "A. " in out and "D. " in out
    assert "== truthful" not in out and out.count("reference: ") == 2


def test_trace_shows_the_fused_tokens_with_their_alpha(capsys):
    assert main(["demo", *SETTINGS, "--examples", "1", "--experts", "trivia", "--trace"]) == 0
    out = capsys.readouterr().out
    assert "fused token by token (token alpha):" in out


def test_an_unknown_task_exits_2_with_one_line(capsys):
    assert main(["demo", "--experts", "math,poetry"]) == 2
    err = capsys.readouterr().err
    assert "unknown task(s) poetry" in err and err.count("\n") == 1
