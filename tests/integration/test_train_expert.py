"""`train_expert` / `fusion-llm train-expert` on the tiny real family: what it writes, that it is
seeded, that the loss is on completions only, and that the engine and router use what it wrote."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion_llm import FusionEngine
from fusion_llm.cli.main import main
from fusion_llm.core.errors import DataError
from fusion_llm.eval.tasks import load_task
from fusion_llm.experts import TrainSettings, train_expert
from fusion_llm.experts.data import Record
from fusion_llm.experts.trainer import IGNORE, _features
from fusion_llm.routing.card import CARD_FILE
from fusion_llm.routing.router import TaskRouter
from fusion_llm.tiny import family_config
from fusion_llm.zoo.scales import get_scale
from fusion_llm.zoo.train import finetune

FAST = TrainSettings(epochs=2, batch_size=4, examples=3)
CITIES = ["Paris", "Rome", "the Nile", "the Tiber"]


def rows(n: int = 12) -> list[dict]:
    return [
        {"prompt": f"question: where is {CITIES[i % 4]}?\nanswer:", "completion": f" in {i}"}
        for i in range(n)
    ]


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


@pytest.fixture(scope="module")
def lora_expert(tiny_family, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trained")
    data = write_jsonl(folder / "train.jsonl", rows())
    train_expert(tiny_family["small"], data, folder / "expert", FAST, log=False)
    return folder / "expert"


def test_a_lora_expert_is_written_as_safetensors_with_tokenizer_and_card(lora_expert: Path):
    names = {p.name for p in lora_expert.iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        CARD_FILE,
    } <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    card = json.loads((lora_expert / CARD_FILE).read_text())
    assert card["kind"] == "lora" and card["training"]["rows"] == 12
    assert card["training"]["trainer"] == "transformers.Trainer"
    assert len(card["examples"]) == 3
    assert set(card["examples"]) <= {r["prompt"] for r in rows()}
    assert card["training"]["steps"] == 6  # ceil(12 / 4) batches x 2 epochs


@pytest.mark.slow
def test_the_same_seed_trains_the_same_adapter(tiny_family, lora_expert: Path, tmp_path: Path):
    data = write_jsonl(tmp_path / "train.jsonl", rows())
    train_expert(tiny_family["small"], data, tmp_path / "again", FAST, log=False)
    first = load_file(lora_expert / "adapter_model.safetensors")
    second = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = TrainSettings(epochs=2, batch_size=4, examples=3, seed=1)
    train_expert(tiny_family["small"], data, tmp_path / "other", other, log=False)
    third = load_file(tmp_path / "other" / "adapter_model.safetensors")
    assert not all(torch.equal(first[k], third[k]) for k in first)


def test_bf16_mixed_precision_trains_float32_weights_under_bfloat16_matmuls(
    tiny_family, lora_expert: Path, tmp_path: Path
):
    data = write_jsonl(tmp_path / "train.jsonl", rows())
    mixed = replace(FAST, bf16=True)
    result = train_expert(tiny_family["small"], data, tmp_path / "bf16", mixed, log=False)
    full = load_file(lora_expert / "adapter_model.safetensors")
    bf16 = load_file(tmp_path / "bf16" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 and t.isfinite().all() for t in bf16.values())
    # The float32 run is seeded and reproducible (above): a difference is autocast's rounding.
    assert not all(torch.equal(full[k], bf16[k]) for k in full)
    assert result.card["training"]["settings"]["bf16"] is True


def test_the_engine_fuses_the_trained_expert_and_the_router_reads_its_examples(
    tiny_family, lora_expert: Path
):
    config = family_config(tiny_family, experts=("lora_a",))
    config["experts"].append({"name": "trained", "path": str(lora_expert)})
    engine = FusionEngine(config)
    (generation,) = engine.generate("question: where is Paris?\nanswer:", experts=["trained"])
    assert (
        generation.experts == ["trained"] and len(generation.alpha) == generation.completion_tokens
    )
    router = TaskRouter(engine)
    # Only `trained` has examples (from its card): `auto` falls back to the likelihood ratio.
    (auto,) = router.decide([engine_prompt()], "auto", "call")
    assert auto.scored_by == "likelihood"
    (nearest,) = router.decide([engine_prompt()], "examples", "call")
    assert nearest.experts == ["trained"] and set(nearest.scores) == {"trained"}


def engine_prompt():
    from fusion_llm import FusionPrompt

    return FusionPrompt("question: where is Rome?\nanswer:")


def test_auto_routes_by_examples_when_every_expert_has_them(tiny_family, lora_expert: Path):
    config = family_config(tiny_family, experts=())
    config["experts"] = [
        {"name": "trained", "path": str(lora_expert)},
        {"name": "lora_a", "path": str(tiny_family["lora_a"]), "examples": ["1 plus 2 equals 3"]},
    ]
    (decision,) = TaskRouter(FusionEngine(config)).decide([engine_prompt()], "auto", "metadata")
    assert decision.scored_by == "examples" and decision.route == "auto"
    assert decision.experts == ["trained"]  # its card's examples are the same question shape
    assert decision.reason.startswith("auto [examples] via metadata: trained (similarities")


def test_loss_is_on_the_completion_and_eos_only(tiny_family) -> None:
    tokenizer = FusionEngine(family_config(tiny_family)).models.small.tokenizer
    record = Record(1, prompt="question: where is Rome?\nanswer:", completion=" in 3")
    features = _features(record, tokenizer, 256, "train.jsonl")
    prompt = tokenizer(record.prompt)["input_ids"]
    completion = tokenizer(record.completion, add_special_tokens=False)["input_ids"]
    assert features["input_ids"] == prompt + completion + [tokenizer.eos_token_id]
    assert features["labels"] == [IGNORE] * len(prompt) + completion + [tokenizer.eos_token_id]


def test_messages_rows_and_a_full_fine_tune(tiny_family, tmp_path: Path) -> None:
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"where is {c}?"},
                {"role": "assistant", "content": f"{c} {i}"},
            ]
        }
        for i, c in enumerate(CITIES * 2)
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", chats)
    settings = TrainSettings(full=True, epochs=1, batch_size=4, examples=2, holdout=2)
    result = train_expert(tiny_family["small"], data, tmp_path / "full", settings, log=False)
    assert (result.rows, result.validation_rows) == (6, 2)
    assert (tmp_path / "full" / "model.safetensors").is_file()
    held_out = [json.loads(line) for line in (tmp_path / "full" / "validation.jsonl").open()]
    assert len(held_out) == 2 and all(row in chats for row in held_out)
    assert result.card["validation"] == "validation.jsonl"
    # Examples are prompts as the small base's chat template renders them.
    assert all(e.startswith("<s>user: where is") for e in result.card["examples"])
    assert all(e.endswith("<s>assistant:") for e in result.card["examples"])
    config = family_config(tiny_family, experts=())
    config["experts"] = [{"name": "chat", "path": str(tmp_path / "full")}]
    (generation,) = FusionEngine(config).generate("<s>user: where is Rome?\n<s>assistant:")
    assert generation.experts == ["chat"]


def test_a_row_over_the_context_window_is_a_data_error_naming_its_line(tiny_family, tmp_path):
    data = write_jsonl(
        tmp_path / "long.jsonl", [*rows(2), {"prompt": "the " * 300, "completion": " x"}]
    )
    with pytest.raises(DataError, match="long.jsonl, line 3: prompt \\+ completion are .* tokens"):
        train_expert(tiny_family["small"], data, tmp_path / "never", FAST, log=False)
    assert not (tmp_path / "never").exists()


def test_the_cli_trains_an_expert_and_reports_bad_rows_on_one_line(tiny_family, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", rows(8))
    args = ["train-expert", "--small", str(tiny_family["small"]), "--data", str(data)]
    out = ["--out", str(tmp_path / "cli"), "--epochs", "1", "--batch-size", "4", "--rank", "2"]
    assert main([*args, *out, "--target-modules", "q_proj,v_proj", "--bf16"]) == 0
    adapter = json.loads((tmp_path / "cli" / "adapter_config.json").read_text())
    card = json.loads((tmp_path / "cli" / CARD_FILE).read_text())
    assert card["training"]["settings"]["bf16"] is True
    assert (adapter["r"], adapter["lora_alpha"], sorted(adapter["target_modules"])) == (
        2,
        4,
        ["q_proj", "v_proj"],
    )
    assert "trained" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "a"}\n')
    bad = [
        "train-expert",
        "--small",
        str(tiny_family["small"]),
        "--data",
        str(tmp_path / "bad.jsonl"),
    ]
    assert main([*bad, "--out", str(tmp_path / "bad")]) == 2
    assert "bad.jsonl, line 2: `completion` must be a non-empty string" in capsys.readouterr().err
    numbers = [("--threads", "0"), ("--batch-size", "0"), ("--rank", "-2"), ("--holdout", "-1")]
    for flag, value in numbers:
        assert main([*args, "--out", str(tmp_path / "never"), flag, value]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"error: argument {flag}: must be at least")
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("expert", "full"), [("small-trivia-lora", False), ("small-math", True)])
def test_a_zoo_experts_export_and_seed_rebuild_it_with_the_zoos_own_recipe(
    toy_zoo, tmp_path, expert: str, full: bool
):
    """`zoo export` + the seed in zoo.json + `train-expert` = the zoo's `finetune` of that expert."""
    root, manifest = toy_zoo
    models, entry = root / "models", manifest["models"][expert]
    data = tmp_path / "train.jsonl"
    assert main(["zoo", "export", entry["task"], "--dir", str(models), "--out", str(data)]) == 0
    spec = get_scale("toy")
    settings = TrainSettings(
        full=full, epochs=spec.finetune_epochs, batch_size=spec.batch_size, seed=entry["seed"]
    )
    rebuilt = train_expert(models / "small", data, tmp_path / "rebuilt", settings, log=False)
    other = replace(settings, seed=entry["seed"] + 1)
    reseeded = train_expert(models / "small", data, tmp_path / "reseeded", other, log=False)

    base = AutoModelForCausalLM.from_pretrained(models / "small", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(models / "tokenizer")
    examples = load_task(entry["task"], "train", scale="toy", seed=manifest["seed"])
    reference, _ = finetune(base, examples, tokenizer, spec, not full, entry["seed"], "zoo")
    expected = {k: v for k, v in reference.state_dict().items() if "lora_" in k or full}
    weights = "model.safetensors" if full else "adapter_model.safetensors"
    got, moved = (load_file(r.directory / weights) for r in (rebuilt, reseeded))
    names = [k for k in got if k in expected or k.replace(".weight", ".default.weight") in expected]
    assert len(names) == len(got) > 0

    def gap(trained: dict) -> float:
        return max(
            (trained[k] - expected.get(k, expected.get(k.replace(".weight", ".default.weight"))))
            .abs().max().item()
            for k in names
        )  # fmt: skip

    assert gap(got) < 1e-5  # the same steps: float rounding only
    assert gap(moved) > 100 * gap(got)  # another seed is another expert
