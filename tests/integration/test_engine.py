"""The engine on a tiny real model family: cache correctness, batching, stops, LoRA, streaming."""

from __future__ import annotations

import threading

import pytest
import torch
from peft import PeftModel
from reference_decoder import fused_step_without_cache
from transformers import AutoModelForCausalLM

from fusion_llm import FusionEngine, FusionPrompt
from fusion_llm.core.fusion import make_solver
from fusion_llm.tiny import family_config

PROMPTS = ["the king of Rome", "question: what city is on the river Nile and who", "a"]


@torch.no_grad()
def recompute_without_cache(engine, prompt: FusionPrompt, experts, mode, steps):
    """Reference decoder: every step re-reads the whole sequence in every model, no KV cache."""
    models = engine.models
    large_ids = models.large.tokenizer(prompt.large or prompt.text)["input_ids"]
    small_ids = models.small.tokenizer(prompt.small or prompt.text)["input_ids"]
    solver = make_solver(mode, torch.ones(len(experts)))
    tokens, alphas = [], []
    for _ in range(steps):
        step = fused_step_without_cache(engine, large_ids, small_ids, experts, solver, tokens)
        tokens.append(int(step.logits.argmax(-1)))
        alphas.append(step.alpha[0].tolist())
    return tokens, alphas


@pytest.mark.parametrize("mode", ["static", "paper", "dynamic"])
def test_kv_cached_decoding_equals_a_full_recompute(engine, mode):
    prompt = FusionPrompt("question: what city", large="the king of Rome. question: what city")
    generation = engine.generate(prompt, mode=mode, max_new_tokens=6)[0]
    tokens, alphas = recompute_without_cache(
        engine, prompt, engine.expert_names, mode, len(generation.token_ids)
    )
    assert generation.token_ids == tokens
    torch.testing.assert_close(
        torch.tensor(generation.alpha), torch.tensor(alphas), atol=2e-3, rtol=0
    )


def test_alpha_zero_is_the_large_model_alone_and_matches_model_generate(tiny_family):
    config = family_config(tiny_family, fusion={"mode": "static"})
    config["experts"] = [dict(e, alpha=0.0) for e in config["experts"]]
    engine = FusionEngine(config)
    fused = engine.generate(PROMPTS, max_new_tokens=8)
    alone = engine.generate(PROMPTS, max_new_tokens=8, mode="none")
    large = engine.models.large
    for prompt, a, b in zip(PROMPTS, fused, alone, strict=True):
        assert a.token_ids == b.token_ids
        ids = torch.tensor([large.tokenizer(prompt)["input_ids"]])
        reference = large.model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
        assert a.token_ids == reference.tolist()[: len(a.token_ids)]


@pytest.mark.parametrize("mode", ["none", "paper", "dynamic"])
def test_a_batch_gives_what_each_prompt_gives_alone(engine, mode):
    batched = engine.generate(PROMPTS, mode=mode, max_new_tokens=7)
    for prompt, together in zip(PROMPTS, batched, strict=True):
        alone = engine.generate(prompt, mode=mode, max_new_tokens=7)[0]
        assert together.token_ids == alone.token_ids
        assert together.text == alone.text
        torch.testing.assert_close(
            torch.tensor(together.alpha), torch.tensor(alone.alpha), atol=2e-3, rtol=0
        )


def test_a_stop_string_across_a_token_boundary_cuts_the_text_and_ends_the_row(engine):
    tokenizer = engine.tokenizer
    full = engine.generate(PROMPTS[0], max_new_tokens=16)[0]
    # A boundary between two tokens that decode to plain ASCII (random weights emit stray bytes too).
    boundary = next(
        len(prefix)
        for i in range(1, len(full.token_ids) - 1)
        if (prefix := tokenizer.decode(full.token_ids[:i]))
        and full.text.startswith(prefix)
        and full.text[len(prefix) - 1 : len(prefix) + 1].isascii()
        and full.text[len(prefix) - 1 : len(prefix) + 1].isprintable()
    )
    stop = full.text[boundary - 1 : boundary + 1]  # last char of one token + first of the next
    stopped, other = engine.generate([PROMPTS[0], PROMPTS[1]], max_new_tokens=16, stop=[stop])
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.find(stop)]
    assert len(stopped.token_ids) < len(full.token_ids)
    alone = engine.generate(PROMPTS[1], max_new_tokens=16, stop=[stop])[0]
    assert other.token_ids == alone.token_ids  # the row that went on is unaffected


def test_a_lora_expert_equals_the_same_adapter_merged_into_a_checkpoint(tiny_family, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_family["small"])
    merged = PeftModel.from_pretrained(base, tiny_family["lora_a"]).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    paths = dict(tiny_family, merged=tmp_path / "merged")
    as_lora = FusionEngine(family_config(paths, experts=("lora_a",)))
    as_full = FusionEngine(family_config(paths, experts=("merged",)))
    for mode in ("static", "dynamic"):
        a = as_lora.generate(PROMPTS, mode=mode)
        b = as_full.generate(PROMPTS, mode=mode)
        for x, y in zip(a, b, strict=True):
            assert x.token_ids == y.token_ids
            torch.testing.assert_close(
                torch.tensor(x.alpha), torch.tensor(y.alpha), atol=2e-3, rtol=0
            )


def test_streamed_deltas_add_up_to_the_generated_text(engine):
    chunks = list(engine.stream(PROMPTS[:2], max_new_tokens=8))
    finals = {c.row: c.generation for c in chunks if c.generation is not None}
    assert sorted(finals) == [0, 1]
    for row in (0, 1):
        assert "".join(c.text for c in chunks if c.row == row) == finals[row].text
    assert [g.token_ids for g in engine.generate(PROMPTS[:2], max_new_tokens=8)] == [
        finals[0].token_ids,
        finals[1].token_ids,
    ]


def test_closing_a_stream_early_frees_the_engine(engine):
    stream = engine.stream(PROMPTS[0], max_new_tokens=50)
    next(stream)
    stream.close()
    assert engine.generate(PROMPTS[2], max_new_tokens=2)[0].completion_tokens == 2


def test_sampling_is_reproducible_with_a_seed(engine):
    runs = [
        engine.generate(
            PROMPTS[0], temperature=1.5, top_p=0.9, top_k=50, seed=s, max_new_tokens=10
        )[0]
        for s in (1, 1, 2)
    ]
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].token_ids != runs[2].token_ids


def test_generation_reports_usage_finish_reason_and_alpha_trace(engine):
    result = engine.generate(PROMPTS[0], experts=["lora_b", "full"], max_new_tokens=5)[0]
    assert result.finish_reason == "length"
    assert result.completion_tokens == 5 == len(result.alpha)
    assert result.prompt_tokens == len(engine.tokenizer(PROMPTS[0])["input_ids"])
    assert result.experts == ["lora_b", "full"] and all(len(a) == 2 for a in result.alpha)
    assert set(result.alpha_summary()) == {"lora_b", "full"}


def test_the_large_model_alone_runs_no_small_model(engine):
    calls = []
    hook = engine.models.small.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        engine.generate(PROMPTS[0], experts=[], max_new_tokens=3)
        engine.generate(PROMPTS[0], mode="none", max_new_tokens=3)
    finally:
        hook.remove()
    assert calls == []


def test_concurrent_callers_get_the_results_of_sequential_calls(engine):
    expected = [engine.generate(p, max_new_tokens=6)[0].token_ids for p in PROMPTS]
    results = {}

    def call(i):
        results[i] = engine.generate(PROMPTS[i], max_new_tokens=6)[0].token_ids

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(PROMPTS))] == expected


def test_models_load_lazily_and_once(tiny_family):
    engine = FusionEngine(family_config(tiny_family))
    assert not engine.loaded
    engine.generate("a", max_new_tokens=1)
    models = engine.models
    engine.generate("a", max_new_tokens=1)
    assert engine.loaded and engine.models is models


def test_chat_messages_are_rendered_with_each_models_template(engine):
    prompt = engine.render_chat([{"role": "user", "content": "hi"}])
    assert prompt.large.endswith("assistant:") and "user: hi" in prompt.small
    assert engine.generate(prompt, max_new_tokens=3)[0].completion_tokens == 3


def test_each_prompt_can_fuse_its_own_experts_in_one_batch(engine):
    routes = [["lora_a"], ["lora_b", "full"], []]
    together = engine.generate(PROMPTS, experts=routes, max_new_tokens=6)
    for prompt, route, got in zip(PROMPTS, routes, together, strict=True):
        alone = engine.generate(prompt, experts=route, max_new_tokens=6)[0]
        assert (got.token_ids, got.experts, got.mode) == (
            alone.token_ids,
            alone.experts,
            alone.mode,
        )
        torch.testing.assert_close(
            torch.tensor(got.alpha), torch.tensor(alone.alpha), atol=2e-3, rtol=0
        )
    assert together[2].mode == "none" and together[2].alpha == [[]] * 6


def test_an_unseeded_sampled_call_leaves_torchs_global_random_state_alone(engine):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    engine.generate("the king", temperature=0.9, max_new_tokens=3)
    assert torch.equal(torch.rand(3), expected)


def test_loading_an_engine_prints_no_progress_bars_and_warns_nothing(tiny_family, tmp_path, capfd):
    import shutil
    import warnings

    from transformers.utils import logging as hf_logging

    shutil.copytree(tiny_family["large"], tmp_path / "large")  # not loaded yet in this process
    hf_logging.enable_progress_bar()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            FusionEngine(family_config(dict(tiny_family, large=tmp_path / "large"))).load()
        assert hf_logging.is_progress_bar_enabled()  # the caller's setting is restored
    finally:
        hf_logging.disable_progress_bar()
    assert "Loading weights" not in capfd.readouterr().err
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_process_that_generated_exits_cleanly(tiny_family):
    import subprocess
    import sys

    script = (
        "from fusion_llm import FusionEngine\n"
        "from fusion_llm.tiny import family_config\n"
        f"paths = { ({k: str(v) for k, v in tiny_family.items()})!r}\n"
        "print(FusionEngine(family_config(paths)).generate('the king', max_new_tokens=2)[0].completion_tokens)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.strip() == "2"


def test_bfloat16_heads_read_contiguous_rows_so_a_prefill_copies_no_weights(tiny_family):
    """A head fed a strided [B, 1, H] view makes torch's bfloat16 CPU matmul copy its weight once
    per row (a 40-row prefill of a real 0.5B model ran out of 24 GiB): every head must see a
    contiguous input, in prefill as in steps, for the large model, the small base and the experts."""
    config = family_config(tiny_family)
    for spec in (config["large"], config["small"], *config["experts"]):
        spec["dtype"] = "bfloat16"
    engine = FusionEngine(config)
    models = engine.models
    heads = [m.model.get_output_embeddings() for m in (models.large, models.small)]
    heads += [m.model.get_output_embeddings() for m in models.full_experts.values()]
    seen: list[bool] = []
    for head in heads:
        head.register_forward_pre_hook(lambda _, args: seen.append(args[0].is_contiguous()))
    generations = engine.generate(PROMPTS, experts=["lora_a", "full"], max_new_tokens=3)
    assert all(len(g.token_ids) == 3 for g in generations)
    assert len(seen) >= 2 * len(heads) and all(seen)
