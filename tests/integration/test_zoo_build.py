"""Smoke test of the zoo recipe at toy scale: everything is built, saved, reloadable and shared."""

import argparse
import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion_llm.cli.zoo import register
from fusion_llm.zoo import ZooNotBuiltError, build, zoo_config, zoo_info, zoo_path
from fusion_llm.zoo.task_families import TASKS
from fusion_llm.zoo.tokenizer import CHAT_TEMPLATE

pytestmark = pytest.mark.slow


def _expected_shipped():
    names = {"small", "mid", "large", "small-multi", "mid-multi"}
    for task in TASKS:
        names |= {f"small-{task}", f"small-{task}-lora", f"mid-{task}"}
    return names


def test_build_ships_every_model_and_keeps_baselines_apart(toy_zoo):
    root, manifest = toy_zoo
    shipped = {n for n, m in manifest["models"].items() if m["shipped"]}
    assert shipped == _expected_shipped()
    baselines = {n for n, m in manifest["models"].items() if not m["shipped"]}
    assert baselines == {"large-multi"} | {f"large-{t}{s}" for t in TASKS for s in ("", "-lora")}
    assert all((root / "baselines" / n).is_dir() for n in baselines)
    assert json.loads((root / "models" / "zoo.json").read_text()) == manifest


def test_bases_are_ordered_by_size_and_probed(toy_zoo):
    _, manifest = toy_zoo
    params = [manifest["models"][n]["params"] for n in ("small", "mid", "large")]
    assert params == sorted(params)
    for base in ("small", "mid", "large"):
        probe = manifest["probe"][base]
        assert set(probe) == {"fact_recall", "task_ranking"}
        assert 0.0 <= probe["fact_recall"]["mean"] <= 1.0
        assert set(TASKS) <= set(probe["task_ranking"])


def test_models_reload_in_fp16_with_one_shared_tokenizer(toy_zoo):
    root, _ = toy_zoo
    models = root / "models"
    reference = (models / "small" / "tokenizer.json").read_text()
    for name in _expected_shipped():
        assert (models / name / "tokenizer.json").read_text() == reference
    small = AutoModelForCausalLM.from_pretrained(models / "small")
    assert small.dtype == torch.float16
    tokenizer = AutoTokenizer.from_pretrained(models / "small-math-lora")
    assert tokenizer.eos_token and tokenizer.pad_token and tokenizer.bos_token
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert len(tokenizer) == small.config.vocab_size
    expert = PeftModel.from_pretrained(small, models / "small-math-lora")
    ids = tokenizer("Question: What is 2 + 3?\nAnswer:", return_tensors="pt").input_ids
    assert ids[0, 0] == tokenizer.bos_token_id
    assert expert(input_ids=ids).logits.shape[-1] == small.config.vocab_size
    with safe_open(models / "mid-math" / "model.safetensors", "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())  # noqa: SIM118 (safe_open has no __iter__)


def test_zoo_config_points_at_the_shipped_folders(toy_zoo):
    root, _ = toy_zoo
    models = root / "models"
    config = zoo_config(["math", "trivia"], source="small", models_dir=models)
    assert config["large"] == {"path": str(models / "large")}
    assert config["small"] == {"path": str(models / "small")}
    assert config["experts"] == [
        {"name": "math", "path": str(models / "small-math-lora")},
        {"name": "trivia", "path": str(models / "small-trivia-lora")},
    ]
    assert config["fusion"] == {"mode": "dynamic"}
    assert zoo_config(["mc"], source="mid", models_dir=models)["experts"][0]["path"].endswith(
        "mid-mc"
    )
    assert {r["name"] for r in zoo_info(models)} >= _expected_shipped()


def test_missing_zoo_and_unknown_models_fail_with_the_fix(toy_zoo, tmp_path):
    root, _ = toy_zoo
    with pytest.raises(ZooNotBuiltError, match="fusion-llm zoo build"):
        zoo_path("large", tmp_path)
    with pytest.raises(KeyError, match="shipped models are"):
        zoo_path("large-math", root / "models")  # a baseline is never shipped
    with pytest.raises(ValueError, match="source must be"):
        zoo_config(["math"], source="large", models_dir=root / "models")


def test_cli_registers_zoo_build_and_info(toy_zoo, capsys):
    root, _ = toy_zoo
    parser = argparse.ArgumentParser(prog="fusion-llm")
    register(parser.add_subparsers(dest="command", required=True))
    build = parser.parse_args(["zoo", "build", "--scale", "toy", "--no-baselines"])
    assert (build.scale, build.no_baselines) == ("toy", True)
    args = parser.parse_args(["zoo", "info", "--dir", str(root / "models")])
    assert args.run(args) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in _expected_shipped())


def test_baselines_retrained_alone_get_the_seeds_of_a_full_build(toy_zoo, tmp_path, monkeypatch):
    root, _ = toy_zoo
    seeds: dict[str, dict[str, int]] = {"build": {}, "alone": {}}
    real_finetune = build.finetune

    def recording(base, examples, tokenizer, spec, lora, seed, desc):
        seeds[phase][desc.removeprefix("finetune ")] = seed
        return real_finetune(base, examples, tokenizer, spec, lora, seed, desc)

    monkeypatch.setattr(build, "finetune", recording)
    phase = "build"
    build.build_zoo(tmp_path / "models", scale="toy", seed=0, baselines_dir=tmp_path / "baselines")
    phase = "alone"
    build.train_baselines(tmp_path / "again", root / "models")
    large = {name: seed for name, seed in seeds["build"].items() if name.startswith("large-")}
    assert len(large) == 11 and seeds["alone"] == large
    assert len(set(seeds["build"].values())) == len(seeds["build"])  # one seed per model
    built = json.loads((tmp_path / "models" / "zoo.json").read_text())["models"]
    recorded = {n: m["seed"] for n, m in built.items() if m["kind"] != "base"}
    assert recorded == seeds["build"]  # zoo.json records what rebuilds each fine-tune


def test_a_build_in_two_processes_makes_the_same_family(toy_zoo, tmp_path):
    """`processes=2` pretrains the large base in a worker process: same seeds, same data, so the
    same weights as the one-process build, large base included."""
    root, manifest = toy_zoo
    again = build.build_zoo(
        tmp_path / "models", scale="toy", seed=0, threads=torch.get_num_threads(), processes=2
    )
    assert again["probe"] == manifest["probe"]
    shipped = {n for n, m in manifest["models"].items() if m["shipped"]}
    assert {n for n, m in again["models"].items() if m["shipped"]} == shipped
    for name in shipped:
        weights = next((root / "models" / name).glob("*.safetensors")).name
        with (
            safe_open(root / "models" / name / weights, "pt") as one,
            safe_open(tmp_path / "models" / name / weights, "pt") as two,
        ):
            assert set(one.keys()) == set(two.keys())
            for key in one.keys():  # noqa: SIM118 (safe_open has no __iter__)
                assert torch.equal(one.get_tensor(key), two.get_tensor(key)), (name, key)
    with pytest.raises(ValueError, match="processes must be 1 or 2"):
        build.build_zoo(tmp_path / "other", scale="toy", processes=3)
