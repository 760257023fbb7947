"""The gate on the shipped family: a deliberately harmful expert (math questions trained on
answers shuffled in from another task) lowers the teacher-forced likelihood of math references,
so `gate: enforce` never activates it and the output is the large model's alone; the real math
expert raises it and stays. (Math, because the shipped large base already answers trivia alone, so
no trivia expert can raise those references' likelihood.)"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from fusion_llm import FusionEngine
from fusion_llm.cli.main import main
from fusion_llm.core.errors import RequestError
from fusion_llm.eval.tasks import load_task
from fusion_llm.experts import TrainSettings, gate_experts, train_expert
from fusion_llm.experts.data import read_jsonl
from fusion_llm.experts.gate import reference_log_likelihoods, rows_for
from fusion_llm.routing.client import FusionClient
from fusion_llm.zoo import zoo_path

pytestmark = pytest.mark.slow

PROMPTS = [e.prompt for e in load_task("math", "eval", 4)]


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """A harmful expert, a validation file of math references, and a card for the good expert."""
    folder = tmp_path_factory.mktemp("gate")
    questions = load_task("math", "train", 120)
    wrong = load_task("summary", "train", 120)  # answers of another task: the wrong thing to learn
    shuffled = folder / "shuffled.jsonl"
    shuffled.write_text(
        "".join(
            json.dumps({"prompt": q.prompt, "completion": w.target}) + "\n"
            for q, w in zip(questions, wrong, strict=True)
        )
    )
    train_expert(
        zoo_path("small"), shuffled, folder / "harmful", TrainSettings(epochs=2), log=False
    )
    # Math answers shuffled among math questions: the right format, the wrong numbers. Where the
    # large base is off format that raises the references' likelihood and only specificity tells.
    within = load_task("math", "train", 400)
    answers = [e.target for e in within[1:] + within[:1]]
    formatted = folder / "formatted.jsonl"
    formatted.write_text(
        "".join(
            json.dumps({"prompt": q.prompt, "completion": a}) + "\n"
            for q, a in zip(within, answers, strict=True)
        )
    )
    train_expert(
        zoo_path("small"), formatted, folder / "format_only", TrainSettings(epochs=2), log=False
    )
    validation = folder / "validation.jsonl"
    validation.write_text(
        "".join(
            json.dumps({"prompt": e.prompt, "completion": e.target}) + "\n"
            for e in load_task("math", "eval", 24)[8:]
        )
    )
    return {
        "harmful": folder / "harmful",
        "format_only": folder / "format_only",
        "validation": validation,
        "good_card": folder / "good.json",
    }


def config(family: dict[str, Path], gate: str) -> dict:
    return {
        "large": {"path": str(zoo_path("large"))},
        "small": {"path": str(zoo_path("small"))},
        "experts": [
            {
                "name": "math",
                "path": str(zoo_path("small-math-lora")),
                "card": str(family["good_card"]),
            },
            {"name": "harmful", "path": str(family["harmful"])},
            {"name": "format_only", "path": str(family["format_only"])},
        ],
        "generation": {"max_new_tokens": 12, "stop": ["\n"]},
        "gate": gate,
    }


@pytest.fixture(scope="module")
def verdicts(family) -> dict[str, dict]:
    return gate_experts(FusionEngine(config(family, "off")), validation=family["validation"])


def test_the_verdicts_tell_the_harmful_expert_from_the_good_one(verdicts, family) -> None:
    assert verdicts["harmful"]["helps"] is False and verdicts["harmful"]["gain"] < 0
    assert verdicts["math"]["helps"] is True and verdicts["math"]["gain"] > 0
    assert verdicts["math"]["large_nll"] == verdicts["harmful"]["large_nll"]  # same references
    assert verdicts["math"]["rows"] == 16 and verdicts["math"]["mode"] == "static"
    stored = json.loads((family["harmful"] / "fusion_expert.json").read_text())
    assert list(stored["verdicts"].values())[0]["gain"] == verdicts["harmful"]["gain"]
    assert stored["examples"]  # train-expert's examples are kept next to the verdict
    assert Path(verdicts["math"]["card"]) == family["good_card"]


def test_an_expert_with_the_right_format_and_wrong_answers_is_refused_by_specificity(
    verdicts, family
) -> None:
    formatted, good = verdicts["format_only"], verdicts["math"]
    assert formatted["specificity"] < 0 < good["specificity"]
    assert formatted["helps"] is False and good["helps"] is True
    # the router reports the gain when it is negative (as here: this large base is in format),
    # else the specificity that refused the expert
    reported = formatted["gain"] if formatted["gain"] < 0 else formatted["specificity"]
    client = FusionClient(FusionEngine(config(family, "enforce")))
    routed = client.generate(PROMPTS, [(["format_only", "math"], "call")] * len(PROMPTS))
    fused = client.engine.generate(PROMPTS, experts=["math"])
    for result, expected in zip(routed, fused, strict=True):
        assert result.decision.experts == ["math"]
        assert result.decision.refused == {"format_only": reported}
        assert "other rows' answers" in result.decision.reason
        assert result.generation.token_ids == expected.token_ids


def test_enforce_refuses_the_harmful_expert_and_the_output_is_the_large_model_alone(
    verdicts, family
) -> None:
    client = FusionClient(FusionEngine(config(family, "enforce")))
    routed = client.generate(PROMPTS, [(["harmful"], "call")] * len(PROMPTS))
    alone = client.engine.generate(PROMPTS, mode="none")
    for result, large in zip(routed, alone, strict=True):
        assert result.decision.experts == []
        assert result.decision.refused == {"harmful": verdicts["harmful"]["gain"]}
        assert "gate refused harmful" in result.decision.reason
        assert result.generation.token_ids == large.token_ids and result.generation.mode == "none"
    (everyone,) = client.generate(PROMPTS[:1], [("all", "default")])
    assert everyone.decision.experts == ["math"] and everyone.generation.experts == ["math"]


def test_warn_keeps_the_harmful_expert_with_a_warning_and_off_ignores_verdicts(verdicts, family):
    warned = FusionClient(FusionEngine(config(family, "warn")))
    with pytest.warns(UserWarning, match="gate warns about harmful"):
        (result,) = warned.generate(PROMPTS[:1], [(["harmful"], "call")])
    assert result.decision.experts == ["harmful"] and "harmful" in result.decision.warned
    off = FusionClient(FusionEngine(config(family, "off")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (result,) = off.generate(PROMPTS[:1], [(["harmful"], "call")])
    assert result.decision.experts == ["harmful"] and not result.decision.refused
    assert not [w for w in caught if "gate" in str(w.message)]


def test_an_expert_equal_to_the_small_base_changes_no_log_likelihood(family) -> None:
    twin = config(family, "off")
    twin["experts"] = [{"name": "twin", "path": str(zoo_path("small")), "kind": "full"}]
    engine = FusionEngine(twin)
    prompts, references = rows_for(engine, read_jsonl(family["validation"]))
    fused, large, tokens = reference_log_likelihoods(
        engine, "twin", prompts, references, "dynamic", batch_size=5
    )
    assert torch.allclose(fused, large, atol=1e-4)
    assert tokens.tolist() == [len(r) for r in references]
    assert bool((large < 0).all())


def test_large_alone_log_likelihood_is_the_sum_of_next_token_log_probabilities(family) -> None:
    engine = FusionEngine(config(family, "off"))
    prompts, references = rows_for(engine, read_jsonl(family["validation"])[:2])
    _, large, _ = reference_log_likelihoods(engine, "math", prompts, references, "static", 2)
    model, tokenizer = engine.models.large.model, engine.models.large.tokenizer
    for row, (prompt, reference) in enumerate(zip(prompts, references, strict=True)):
        ids = tokenizer(prompt.text)["input_ids"] + reference
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        start = len(ids) - len(reference)
        expected = sum(float(logp[start - 1 + i, t]) for i, t in enumerate(reference))
        assert float(large[row]) == pytest.approx(expected, abs=1e-3)


def test_the_gate_cli_and_a_missing_validation_set(family, tmp_path, capsys) -> None:
    path = tmp_path / "fusion.json"
    path.write_text(json.dumps(config(family, "enforce")))
    args = ["gate", "--config", str(path), "--experts", "harmful", "--limit", "8"]
    assert main([*args, "--validation", str(family["validation"])]) == 0
    assert "harmful: HURTS" in capsys.readouterr().out
    # The gate measures the mode it is told, else the config's; "none" fuses nothing to measure.
    paper = [*args, "--validation", str(family["validation"]), "--mode", "paper"]
    assert main(paper) == 0 and "harmful: HURTS" in capsys.readouterr().out
    stored = json.loads((family["harmful"] / "fusion_expert.json").read_text())
    assert [v["mode"] for v in stored["verdicts"].values()] == ["paper"]
    unfused = FusionEngine({**config(family, "off"), "fusion": {"mode": "none"}})
    with pytest.raises(RequestError, match="the gate measures a fusion mode, not 'none'"):
        gate_experts(unfused, ["harmful"], store=False)  # before it looks for validation rows
    verdict = gate_experts(
        unfused, ["harmful"], validation=family["validation"], limit=4, mode="dynamic", store=False
    )
    assert verdict["harmful"]["mode"] == "dynamic" and verdict["harmful"]["rows"] == 4
    assert main([*args, "--mode", "none"]) == 2
    assert "invalid choice: 'none'" in capsys.readouterr().err
    with pytest.raises(RequestError, match="no held-out validation rows"):
        gate_experts(FusionEngine(config(family, "off")), ["harmful"])
    for flag, value in (("--batch-size", "0"), ("--limit", "-1")):
        capsys.readouterr()
        assert main([*args, flag, value]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"error: argument {flag}: must be at least 1")
    for bad in ({"batch_size": 0}, {"limit": 0}):
        with pytest.raises(RequestError, match="batch_size and limit must be at least 1"):
            gate_experts(FusionEngine(config(family, "off")), ["harmful"], **bad)
