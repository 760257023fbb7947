"""`fusion-llm eval` on the shipped family: every row of the comparison, scored with the
reproduction's metrics, equals the engine run it stands for, and the report files are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusion_llm import FusionEngine
from fusion_llm.cli.main import main
from fusion_llm.core.errors import RequestError
from fusion_llm.eval.metrics import exact_match
from fusion_llm.eval.tasks import load_task
from fusion_llm.eval.user_eval import evaluate
from fusion_llm.zoo import zoo_config

N = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("user_eval")
    rows = {
        "eval": [
            {"prompt": e.prompt, "completion": e.answer} for e in load_task("trivia", "eval", N)
        ],
        "train": [
            {"prompt": e.prompt, "completion": e.target} for e in load_task("trivia", "train", 2)
        ],
    }
    paths = {name: folder / f"{name}.jsonl" for name in rows}
    for name, items in rows.items():
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in items))
    paths["config"] = folder / "fusion.json"
    paths["config"].write_text(json.dumps(zoo_config(["trivia"], kind="lora")))
    return paths


@pytest.fixture(scope="module")
def report(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    result = evaluate(
        data["config"], data["eval"], "exact", shots=2, shots_from=data["train"],
        max_new_tokens=12, batch_size=4, out_dir=out,
    )  # fmt: skip
    return result, out


def test_every_row_is_scored_and_written(report) -> None:
    result, out = report
    assert list(result.results) == [
        "large alone", "trivia alone", "static", "paper", "dynamic",
        "large alone 2-shot", "dynamic 2-shot",
    ]  # fmt: skip
    references = [e.answer for e in load_task("trivia", "eval", N)]
    for name, row in result.results.items():
        expected = 100 * sum(map(exact_match, result.predictions[name], references)) / N
        assert row.scores == {"exact": pytest.approx(expected)} and row.samples == N
    assert (out / "eval.md").read_text().startswith("| row | exact |")
    saved = json.loads((out / "eval.json").read_text())
    assert saved["predictions"] == result.predictions and saved["verdicts"] == {"trivia": None}
    assert (out / "alpha.png").stat().st_size > 0


def test_rows_equal_the_engine_runs_they_stand_for(report, data) -> None:
    result, _ = report
    engine = FusionEngine(data["config"])
    prompts = [e.prompt for e in load_task("trivia", "eval", N)]
    settings = {"max_new_tokens": 12, "stop": ["\n"]}
    assert result.predictions["large alone"] == [
        g.text for g in engine.generate(prompts, mode="none", **settings)
    ]
    fused = engine.generate(prompts, experts=["trivia"], mode="dynamic", **settings)
    assert result.predictions["dynamic"] == [g.text for g in fused]
    demos = "".join(f"{e.prompt}{e.target}\n\n" for e in load_task("trivia", "train", 2))
    shot = engine.generate([demos + p for p in prompts], mode="none", **settings)
    assert result.predictions["large alone 2-shot"] == [g.text for g in shot]


def test_bad_requests_are_request_errors(data) -> None:
    with pytest.raises(RequestError, match="unknown metric"):
        evaluate(data["config"], data["eval"], "bleu")
    with pytest.raises(RequestError, match="--shots needs --shots-from"):
        evaluate(data["config"], data["eval"], "exact", shots=2)
    for bad in ({"n": 0}, {"batch_size": 0}, {"shots": -1}):
        with pytest.raises(RequestError, match="shots must be >= 0, batch_size and n >= 1"):
            evaluate(data["config"], data["eval"], "exact", **bad)


def test_the_eval_cli_prints_the_table(data, tmp_path, capsys) -> None:
    args = [
        "eval",
        "--config",
        str(data["config"]),
        "--data",
        str(data["eval"]),
        "--metric",
        "exact",
    ]
    assert main([*args, "--n", "2", "--max-new-tokens", "6", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| large alone |" in out and "| dynamic |" in out
    assert main([*args[:-1], "bleu"]) == 2  # argparse: one line, exit code 2
    for flag, value in (("--n", "0"), ("--batch-size", "0"), ("--shots", "-1"), ("--n", "x")):
        capsys.readouterr()
        assert main([*args, flag, value]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"error: argument {flag}:")
