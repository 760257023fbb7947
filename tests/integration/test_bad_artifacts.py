"""Damaged or unusual model files: each gets a typed error naming the file and the fix, or works.

Each broken case is followed by a normal load of the intact family, which must still work.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaForCausalLM

from fusion_llm import FusionEngine, ModelLoadError, ModelNotFoundError
from fusion_llm.cli.main import main
from fusion_llm.tiny import family_config

PROMPT = "the king of Rome"


def copy_of(tiny_family, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(tiny_family[name], target)
    return target


def truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def garble(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"not a safetensors file" * 8)


def drop_a_tensor(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    tensors.pop(next(k for k in tensors if "mlp.up_proj" in k))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def widen_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))


def foreign_tokenizer_json(folder: Path) -> None:
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {}}))


def unreadable_tokenizer_json(folder: Path) -> None:
    (folder / "tokenizer.json").write_text("{not json")


def no_config(folder: Path) -> None:
    (folder / "config.json").unlink()


def pickle_only(folder: Path) -> None:
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


LARGE_DAMAGE: list[tuple[Callable[[Path], None], str]] = [
    (truncate, "corrupt or truncated"),
    (garble, "corrupt or truncated"),
    (drop_a_tensor, "lack 1 tensor"),
    (widen_config, "do not match the shapes in its config.json"),
    (foreign_tokenizer_json, "tokenizer.json"),
    (unreadable_tokenizer_json, "tokenizer.json"),
    (no_config, "no config.json"),
    (pickle_only, "allow_pickle"),
]


@pytest.mark.parametrize(
    ("damage", "message"), LARGE_DAMAGE, ids=[d.__name__ for d, _ in LARGE_DAMAGE]
)
def test_a_damaged_large_model_folder_is_a_typed_error_naming_it(
    tiny_family, tmp_path, damage, message
):
    folder = copy_of(tiny_family, tmp_path, "large")
    damage(folder)
    config = family_config(dict(tiny_family, large=folder))
    with pytest.raises(ModelLoadError, match=message) as caught:
        FusionEngine(config).load()
    assert str(folder) in str(caught.value)
    assert FusionEngine(family_config(tiny_family)).generate(PROMPT, max_new_tokens=2)


def test_the_cli_reports_a_damaged_model_in_one_line_without_a_traceback(
    tiny_family, tmp_path, capsys
):
    folder = copy_of(tiny_family, tmp_path, "large")
    truncate(folder)
    config = tmp_path / "fusion.json"
    config.write_text(json.dumps(family_config(dict(tiny_family, large=folder))))
    assert main(["generate", "--config", str(config), PROMPT]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err and err.count("\n") == 1


def adapter_without_weights(folder: Path) -> None:
    (folder / "adapter_model.safetensors").unlink()


def adapter_config_not_json(folder: Path) -> None:
    (folder / "adapter_config.json").write_text("{'r': 4")


def adapter_pickle_only(folder: Path) -> None:
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()


ADAPTER_DAMAGE: list[tuple[Callable[[Path], None], str, str]] = [
    (adapter_without_weights, "auto", "no adapter weights"),
    (adapter_config_not_json, "auto", "not valid JSON"),
    (adapter_pickle_only, "auto", "only pickle weights.*allow_pickle"),
    (lambda folder: None, "full", "LoRA adapter folder.*kind: lora"),
    (lambda folder: (folder / "adapter_config.json").unlink(), "lora", "no adapter_config.json"),
]


@pytest.mark.parametrize(
    ("damage", "kind", "message"),
    ADAPTER_DAMAGE,
    ids=["no weights", "config not JSON", "pickle only", "as kind full", "no adapter config"],
)
def test_a_damaged_or_misconfigured_lora_expert_is_a_typed_error_naming_it(
    tiny_family, tmp_path, damage, kind, message
):
    folder = copy_of(tiny_family, tmp_path, "lora_a")
    damage(folder)
    config = family_config(dict(tiny_family, lora_a=folder), experts=("lora_a",))
    config["experts"][0]["kind"] = kind
    with pytest.raises(ModelLoadError, match=message) as caught:
        FusionEngine(config).load()
    assert "lora_a" in str(caught.value)


def test_pickle_adapter_weights_load_when_allowed(tiny_family, tmp_path):
    folder = copy_of(tiny_family, tmp_path, "lora_a")
    adapter_pickle_only(folder)
    config = family_config(dict(tiny_family, lora_a=folder), experts=("lora_a",))
    config["experts"][0]["allow_pickle"] = True
    reference = FusionEngine(family_config(tiny_family, experts=("lora_a",)))
    assert (
        FusionEngine(config).generate(PROMPT)[0].token_ids
        == reference.generate(PROMPT)[0].token_ids
    )


def test_an_expert_whose_embedding_is_smaller_than_its_tokenizer_is_refused_at_load(
    tiny_family, tmp_path
):
    model = LlamaForCausalLM.from_pretrained(tiny_family["full"])
    model.resize_token_embeddings(300)  # the shared tokenizer has 320 ids
    model.save_pretrained(tmp_path / "short")
    AutoTokenizer.from_pretrained(tiny_family["full"]).save_pretrained(tmp_path / "short")
    config = family_config(dict(tiny_family, short=tmp_path / "short"), experts=("short",))
    with pytest.raises(ModelLoadError, match="300 input embeddings.*320 ids"):
        FusionEngine(config).load()


def test_a_missing_path_shaped_like_a_hub_id_fails_fast_offline(tiny_family, monkeypatch):
    from huggingface_hub import constants

    from fusion_llm.runtime import models

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    models.hub_reachable.cache_clear()
    try:
        config = family_config(tiny_family)
        config["experts"][0]["path"] = "experts/math-lora"
        with pytest.raises(ModelNotFoundError, match="'experts/math-lora'.*cannot be reached"):
            FusionEngine(config).load()
    finally:
        models.hub_reachable.cache_clear()


def test_a_home_relative_model_path_is_expanded(tiny_family, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_family["large"], tmp_path / "large-copy")
    config = family_config(tiny_family)
    config["large"]["path"] = "~/large-copy"
    reference = FusionEngine(family_config(tiny_family)).generate(PROMPT)[0]
    assert FusionEngine(config).generate(PROMPT)[0].token_ids == reference.token_ids


@pytest.mark.parametrize("name", ["__base__", "math.v2", "eval", "default"])
def test_expert_names_peft_reserves_or_rejects_still_name_their_adapter(tiny_family, name):
    config = family_config(tiny_family, experts=("lora_a", "lora_b"))
    config["experts"][0]["name"] = name
    renamed = FusionEngine(config).generate(PROMPT, experts=[name])[0]
    reference = FusionEngine(family_config(tiny_family, experts=("lora_a", "lora_b")))
    expected = reference.generate(PROMPT, experts=["lora_a"])[0]
    assert renamed.token_ids == expected.token_ids and renamed.experts == [name]


def unbatchable_adapter(tiny_family, folder: Path, **lora: object) -> Path:
    """A LoRA variant on the tiny small base (DoRA, modules_to_save) with random weights."""
    base = LlamaForCausalLM.from_pretrained(tiny_family["small"])
    torch.manual_seed(5)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **lora)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name or "magnitude" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "lora", [{"use_dora": True}, {"modules_to_save": ["lm_head"]}], ids=["DoRA", "modules_to_save"]
)
def test_lora_variants_the_batched_forward_cannot_run_are_fused_exactly(
    tiny_family, tmp_path, lora
):
    folder = unbatchable_adapter(tiny_family, tmp_path / "variant", **lora)
    merged = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(tiny_family["small"]), folder
    ).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(tiny_family["small"]).save_pretrained(tmp_path / "merged")
    paths = dict(tiny_family, variant=folder, merged=tmp_path / "merged")
    # Next to an ordinary LoRA expert, which still runs in the batched peft forward.
    fused = FusionEngine(family_config(paths, experts=("variant", "lora_b")))
    assert "variant" in fused.models.full_experts and "lora_b" in fused.models.lora_experts
    reference = FusionEngine(family_config(paths, experts=("merged", "lora_b")))
    for experts in (["variant"], ["variant", "lora_b"]):
        got = fused.generate([PROMPT, "the city"], experts=experts, mode="dynamic")
        want = reference.generate(
            [PROMPT, "the city"],
            experts=[e.replace("variant", "merged") for e in experts],
            mode="dynamic",
        )
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(
                torch.tensor(g.alpha), torch.tensor(w.alpha), atol=2e-3, rtol=0
            )


def test_experts_with_different_logit_widths_fuse_on_the_common_ids(tiny_family, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_family["small"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<extra_pad>"]})
    model = LlamaForCausalLM.from_pretrained(tiny_family["full"])
    model.resize_token_embeddings(len(tokenizer))  # 321 logits next to the others' 320
    model.save_pretrained(tmp_path / "padded")
    tokenizer.save_pretrained(tmp_path / "padded")
    paths = dict(tiny_family, padded=tmp_path / "padded")
    engine = FusionEngine(family_config(paths, experts=("padded", "full", "lora_a")))
    results = engine.generate([PROMPT, "the city"], experts=["padded", "full", "lora_a"])
    assert all(r.completion_tokens > 0 and len(r.alpha[0]) == 3 for r in results)
    assert all(t < 320 for r in results for t in r.token_ids)
