"""Smoke test: every cookbook runs end to end on the tiny test family (random weights)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

pytest_plugins = ["tiny_family"]  # the session fixtures `tiny_config` and `tool_config`

COOKBOOKS = Path(__file__).parents[2] / "cookbooks"


@pytest.fixture
def cookbook(monkeypatch: pytest.MonkeyPatch):
    """Import a cookbook script as a module (its folder on sys.path, as when run as a script)."""
    monkeypatch.syspath_prepend(str(COOKBOOKS))
    return importlib.import_module


def test_two_step_chain_routes_each_step(cookbook, tiny_config, capsys) -> None:
    result = cookbook("langchain_two_step_chain").main(
        [
            "--config",
            tiny_config,
            "--solve-task",
            "full",
            "--summary-task",
            "lora_a",
            "--max-new-tokens",
            "8",
        ]
    )
    assert set(result) == {"question", "answer", "summary"}
    out = capsys.readouterr().out
    assert "tasks full via call: full" in out and "tasks lora_a via metadata: lora_a" in out


def test_rag_retrieves_the_right_document_and_streams(cookbook, tiny_config, capsys) -> None:
    from llama_index.core import Settings

    previous = Settings._llm, Settings._embed_model, Settings._tokenizer  # the cookbook sets them
    try:
        answer = cookbook("llama_index_rag").main(
            ["--config", tiny_config, "--answer-task", "full", "--max-new-tokens", "8"]
        )
    finally:
        Settings._llm, Settings._embed_model, Settings._tokenizer = previous
    assert isinstance(answer, str)
    assert "source: semstain.txt" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["tiny_config", "tool_config"])
def test_agent_runs_with_and_without_tool_templates(cookbook, family, request, capsys) -> None:
    config = request.getfixturevalue(family)
    module = cookbook("langchain_agent")
    module.main(["--config", config, "--solve-task", "full", "--max-new-tokens", "8"])
    expected = "create_agent" if family == "tool_config" else "ReAct"
    assert expected in capsys.readouterr().out
    assert module.calculate.invoke({"expression": "19 - 19 + 14"}) == "14"


def test_alpha_trace_plot_writes_a_png(cookbook, tiny_config, tmp_path) -> None:
    out = tmp_path / "alpha.png"
    generation = cookbook("alpha_trace_plot").main(
        [
            "--config",
            tiny_config,
            "--first-task",
            "full",
            "--second-task",
            "lora_a",
            "--out",
            str(out),
            "--max-new-tokens",
            "8",
        ]
    )
    assert out.read_bytes().startswith(b"\x89PNG")
    assert len(generation.alpha) == generation.completion_tokens


def test_router_accuracy_on_the_shipped_family(cookbook) -> None:
    from fusion_llm.zoo import ZooNotBuiltError, zoo_config

    try:
        zoo_config(["math"])
    except (ZooNotBuiltError, KeyError):
        pytest.skip("the shipped model family is not built")
    auto = cookbook("router_accuracy").main(["--n", "4", "--tasks", "math", "summary"])
    assert set(auto) == {"math", "summary", "all"} and 0.0 <= auto["all"]["top1"] <= 1.0
    args = ["--n", "4", "--tasks", "truthful", "mc", "--route", "examples", "--examples", "8"]
    nearest = cookbook("router_accuracy").main(args)
    assert nearest["all"] == {"top1": 1.0, "selected": 1.0, "exact": 1.0}  # one format, two tasks
