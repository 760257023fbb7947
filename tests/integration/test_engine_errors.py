"""Bad configurations and bad requests get typed errors that say what to change."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fusion_llm import (
    AdapterMismatchError,
    ContextWindowError,
    DeviceError,
    FusionEngine,
    FusionPrompt,
    ModelLoadError,
    ModelNotFoundError,
    RequestError,
    UnknownExpertError,
    VocabularyMismatchError,
)
from fusion_llm.tiny import family_config


def tiny_llama(vocab_size, hidden=32):
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def other_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"])
    tok.train_from_iterator(["zebra quartz jumps over lazy vixens"] * 50, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def test_a_missing_model_path_is_a_typed_error(tiny_family, tmp_path):
    config = family_config(tiny_family)
    config["large"] = {"path": str(tmp_path / "nowhere")}
    with pytest.raises(ModelNotFoundError, match="nowhere"):
        FusionEngine(config).load()


def test_an_expert_with_another_vocabulary_names_both_models_and_the_first_difference(
    tiny_family, tmp_path
):
    tokenizer = other_tokenizer()
    model = tiny_llama(len(tokenizer))
    model.save_pretrained(tmp_path / "alien")
    tokenizer.save_pretrained(tmp_path / "alien")
    paths = dict(tiny_family, alien=tmp_path / "alien")
    with pytest.raises(VocabularyMismatchError, match=r"large base .*expert 'alien'.*id \d+ is"):
        FusionEngine(family_config(paths, experts=("alien",))).load()


def test_extra_trailing_special_tokens_are_fused_on_the_common_prefix(tiny_family, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_family["small"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<extra_pad>"]})
    model = LlamaForCausalLM.from_pretrained(tiny_family["full"])
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(tmp_path / "padded")
    tokenizer.save_pretrained(tmp_path / "padded")
    engine = FusionEngine(
        family_config(dict(tiny_family, padded=tmp_path / "padded"), experts=("padded",))
    )
    assert engine.models.vocab_size == len(AutoTokenizer.from_pretrained(tiny_family["large"]))
    assert engine.generate("the king", max_new_tokens=3)[0].completion_tokens == 3


def test_a_lora_adapter_trained_on_another_base_is_rejected(tiny_family, tmp_path):
    vocab = LlamaConfig.from_pretrained(tiny_family["small"]).vocab_size
    adapter = get_peft_model(
        tiny_llama(vocab, hidden=48), LoraConfig(r=2, target_modules=["q_proj"])
    )
    adapter.save_pretrained(tmp_path / "wide_lora")
    paths = dict(tiny_family, wide=tmp_path / "wide_lora")
    with pytest.raises(AdapterMismatchError, match="does not fit the small base"):
        FusionEngine(family_config(paths, experts=("wide",))).load()


def test_pickle_weights_are_refused_unless_allowed(tiny_family, tmp_path):
    model = LlamaForCausalLM.from_pretrained(tiny_family["large"])
    model.config.save_pretrained(tmp_path / "pickled")
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    config = family_config(tiny_family, experts=())
    config["large"] = {"path": str(tmp_path / "pickled"), "tokenizer": str(tiny_family["large"])}
    with pytest.raises(ModelLoadError, match="allow_pickle"):
        FusionEngine(config).load()
    config["large"]["allow_pickle"] = True
    assert FusionEngine(config).generate("a", max_new_tokens=1)[0].completion_tokens == 1


def test_an_unavailable_accelerator_is_a_device_error(tiny_family):
    missing = [
        d
        for d, ok in (
            ("cuda", torch.cuda.is_available()),
            ("mps", torch.backends.mps.is_available()),
        )
        if not ok
    ]
    assert missing, "this machine has every accelerator: nothing to check"
    config = family_config(tiny_family)
    config["small"] = {"path": config["small"]["path"], "device": missing[0]}
    with pytest.raises(DeviceError, match="not available"):
        FusionEngine(config).load()


@pytest.mark.parametrize(
    ("prompts", "kwargs", "error", "match"),
    [
        ([], {}, RequestError, "no prompts"),
        ("   ", {}, RequestError, "empty or whitespace"),
        (["ok", ""], {}, RequestError, "prompt 1"),
        ([42], {}, RequestError, "must be a string"),
        (7, {}, RequestError, "must be a string"),
        ("ok", {"experts": ["lawyer"]}, UnknownExpertError, "lawyer.*configured experts: lora_a"),
        ("ok", {"mode": "magic"}, RequestError, "unknown fusion mode"),
        ("ok", {"max_new_tokens": 0}, RequestError, "max_new_tokens"),
        ("ok", {"temperature": -1.0}, RequestError, "temperature"),
        ("ok", {"top_p": 0.0}, RequestError, "top_p"),
        ("ok", {"top_p": 1.5}, RequestError, "top_p"),
        ("ok", {"top_p": float("nan")}, RequestError, "top_p"),
        ("ok", {"stop": ["", "x"]}, RequestError, "non-empty"),
        ("ok", {"max_new_tokens": 500}, ContextWindowError, "context window of 256"),
        ("the king " * 200, {}, ContextWindowError, "truncate_prompt"),
        ("bad \ud800 text", {}, RequestError, "prompt 0.*invalid character at position 4"),
        (FusionPrompt("ok", large=123), {}, RequestError, "FusionPrompt.large must be a string"),
        (FusionPrompt("ok", small=b"x"), {}, RequestError, "FusionPrompt.small must be a string"),
        (FusionPrompt("ok", experts={"lora_a": 1}), {}, RequestError, "experts\\['lora_a'\\]"),
        (FusionPrompt("ok", experts={"ghost": "x"}), {}, UnknownExpertError, "ghost"),
        (FusionPrompt("ok", experts=["lora_a"]), {}, RequestError, "must map expert names"),
        ("ok", {"seed": 2**64}, RequestError, "seed"),
        ("ok", {"stop": ["x"] * 10_000}, RequestError, "at most 32"),
        ("ok", {"stop": ["x" * 300]}, RequestError, "at most 256"),
    ],
)
def test_bad_requests_raise_typed_errors_and_leave_the_engine_usable(
    engine, prompts, kwargs, error, match
):
    with pytest.raises(error, match=match):
        engine.generate(prompts, **kwargs)
    assert engine.generate("the king", max_new_tokens=2)[0].completion_tokens == 2


def test_a_long_prompt_can_be_truncated_on_the_left_instead(engine):
    long_prompt = "the king " * 200
    result = engine.generate(long_prompt, max_new_tokens=4, truncate_prompt=True)[0]
    assert result.prompt_tokens == 256 - 4 and result.completion_tokens == 4


@pytest.mark.parametrize(
    ("experts", "error", "match"),
    [
        ([["lora_a"], ["full"]], RequestError, "2 lists for 1 prompts"),
        ([["lora_a"], ["nobody"]], UnknownExpertError, "nobody"),
        ([3], RequestError, "expert names"),
    ],
)
def test_bad_expert_routes_raise_typed_errors(engine, experts, error, match):
    prompts = ["a"] if error is RequestError and "lists" in match else ["a", "b"]
    with pytest.raises(error, match=match):
        engine.generate(prompts, experts=experts)


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{% for m in messages %}{{ m['content'] }", "TemplateSyntaxError"),
        (
            "{{ raise_exception('Conversation roles must alternate user/assistant') }}",
            "roles must alternate",
        ),
        ("{{ messages[5]['content'] }}", "cannot render"),
    ],
    ids=["syntax error", "raises", "undefined"],
)
def test_a_chat_template_that_fails_is_a_typed_error_naming_the_model(
    tiny_family, tmp_path, template, match
):
    import shutil

    folder = tmp_path / "large"
    shutil.copytree(tiny_family["large"], folder)
    (folder / "chat_template.jinja").write_text(template)
    engine = FusionEngine(family_config(dict(tiny_family, large=folder), experts=()))
    with pytest.raises(RequestError, match=f"chat template of the large base.*{match}"):
        engine.render_chat([{"role": "user", "content": "hi"}])
    assert engine.generate("the king", max_new_tokens=2)[0].completion_tokens == 2


def test_the_context_window_reported_is_the_smallest_of_the_models_that_read_the_prompt(
    tiny_family, tmp_path
):
    import json
    import shutil

    folder = tmp_path / "small"
    shutil.copytree(tiny_family["small"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 128  # the large base reads 256
    (folder / "config.json").write_text(json.dumps(config))
    engine = FusionEngine(family_config(dict(tiny_family, small=folder), experts=("lora_a",)))
    assert engine.context_window == 128
    prompt = "the king " * 25  # about 126 tokens: fits the large base, not the small one
    with pytest.raises(ContextWindowError, match="small base's context window of 128"):
        engine.generate(prompt, max_new_tokens=8)
    assert engine.generate(prompt, max_new_tokens=8, mode="none")[0].completion_tokens == 8
    truncated = engine.generate(prompt, max_new_tokens=8, truncate_prompt=True)[0]
    assert truncated.completion_tokens == 8


def test_a_full_expert_with_a_shorter_window_is_checked_against_every_prompt(tiny_family, tmp_path):
    import json
    import shutil

    folder = tmp_path / "full"
    shutil.copytree(tiny_family["full"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    engine = FusionEngine(family_config(dict(tiny_family, full=folder), experts=("full", "lora_a")))
    prompt = "the king " * 30
    with pytest.raises(ContextWindowError, match="expert 'full''s context window of 64"):
        engine.generate(prompt, experts=["full"], max_new_tokens=8)
    assert engine.generate(prompt, experts=["lora_a"], max_new_tokens=8)[0].completion_tokens == 8
