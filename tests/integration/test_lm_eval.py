"""The fused model under lm-evaluation-harness: a multiple-choice task over a local JSONL file."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from fusion_llm import FusionPrompt  # noqa: E402
from fusion_llm.eval.harness import FusionLM  # noqa: E402

pytest_plugins = ["tiny_family"]

ROWS = [
    ("the king of", ["Rome", "Nile", "river"], 0),
    ("question: what city is on the river", ["Nile", "Rome", "the"], 1),
    ("a river in", ["Egypt", "Rome", "who"], 0),
    ("who is the king", ["of Rome", "a city", "the"], 2),
    ("the Nile is a", ["river", "king", "city"], 0),
    ("what is on the", ["river", "Nile", "king"], 1),
    ("Rome is a", ["city", "river", "king"], 0),
]


@pytest.fixture(scope="module")
def fused(tiny_config) -> FusionLM:
    return FusionLM(tiny_config, experts="full+lora_a", mode="dynamic", batch_size=4)


def test_simple_evaluate_accuracy_equals_the_engines_argmax(fused, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "mc.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in ROWS)
    )
    (tmp_path / "fusion_mc.yaml").write_text(
        f"""task: fusion_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
    )
    results = lm_eval.simple_evaluate(
        model=fused, tasks=["fusion_mc"], task_manager=TaskManager(include_path=str(tmp_path))
    )
    accuracy = results["results"]["fusion_mc"]["acc,none"]
    right = 0
    for question, choices, answer in ROWS:
        scores = fused.engine.score(
            [question] * len(choices),
            [" " + c for c in choices],  # lm-eval's target delimiter
            experts=["full", "lora_a"],
            mode="dynamic",
        )
        totals = [s.total for s in scores]
        right += totals.index(max(totals)) == answer
    assert accuracy == pytest.approx(right / len(ROWS))


def test_rolling_and_generation_requests_answer_with_the_engine(fused):
    engine, text = fused.engine, "the king of Rome and the river Nile"
    rolling = fused.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    prefix = FusionPrompt(engine.tokenizer.bos_token, add_special_tokens=False)
    expected = engine.score(prefix, text, experts=["full", "lora_a"], mode="dynamic")[0].total
    assert rolling == [pytest.approx(expected)]
    settings = {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}
    requests = [Instance("generate_until", {}, (p, settings), i) for i, p in enumerate(["a", "b"])]
    generated = fused.generate_until(requests)
    direct = engine.generate(
        ["a", "b"], experts=["full", "lora_a"], mode="dynamic", stop=["\n"], max_new_tokens=5,
        temperature=0.0,
    )  # fmt: skip
    assert generated == [g.text for g in direct]
