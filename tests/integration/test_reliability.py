"""Faults injected into real models, long runs, and junk input to the CLI and config loader."""

from __future__ import annotations

import gc

import psutil
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusion_llm import DeviceError, FusionEngine
from fusion_llm.cli.main import main
from fusion_llm.tiny import family_config

PROMPTS = ["the king of Rome", "question: what city"]


def corrupt_rows(model, rows, value):
    """Forward hook: the logits of `rows` become `value` (NaN, inf) in every call of `model`."""

    def hook(module, args, output):
        output.logits[rows] = value
        return output

    return model.register_forward_hook(hook)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_of_one_model_in_one_row_fall_back_for_that_row_only(engine, value):
    clean = engine.generate(PROMPTS, experts=["lora_a", "full"], max_new_tokens=5)
    large_alone = engine.generate(PROMPTS[0], mode="none", max_new_tokens=5)[0]
    handle = corrupt_rows(engine.models.full_experts["full"].model, [0], value)
    try:
        faulty = engine.generate(PROMPTS, experts=["lora_a", "full"], max_new_tokens=5)
    finally:
        handle.remove()
    assert (
        faulty[0].fallback_steps == list(range(5)) and faulty[0].token_ids == large_alone.token_ids
    )
    assert all(a == [0.0, 0.0] for a in faulty[0].alpha)
    assert faulty[1].fallback_steps == [] and faulty[1].token_ids == clean[1].token_ids


def test_an_extreme_expert_gives_finite_alpha_and_a_complete_generation(engine):
    def scale(module, args, output):
        output.logits.mul_(1e4)
        return output

    handle = engine.models.full_experts["full"].model.register_forward_hook(scale)
    try:
        results = engine.generate(PROMPTS, experts=["full"], mode="dynamic", max_new_tokens=6)
    finally:
        handle.remove()
    for result in results:
        assert result.completion_tokens == 6 and result.fallback_steps == []
        assert all(0.0 <= a[0] <= 2.0 for a in result.alpha)


def test_out_of_memory_in_a_forward_is_a_device_error_and_the_engine_recovers(engine):
    def explode(module, args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    handle = engine.models.large.model.register_forward_pre_hook(explode)
    try:
        with pytest.raises(DeviceError, match="ran out of memory"):
            engine.generate(PROMPTS, max_new_tokens=3)
    finally:
        handle.remove()
    assert [g.completion_tokens for g in engine.generate(PROMPTS, max_new_tokens=3)] == [3, 3]


def rss_after(engine, calls: int) -> int:
    for i in range(calls):
        engine.generate(PROMPTS[i % 2], max_new_tokens=8)
    gc.collect()
    return psutil.Process().memory_info().rss


@pytest.mark.slow
def test_repeated_generations_do_not_grow_memory(engine):
    before = rss_after(engine, 30)  # warm-up: allocator pools, caches of the tokenizer
    after = rss_after(engine, 100)
    assert after - before < 25 * 2**20, (
        f"RSS grew by {(after - before) / 2**20:.1f} MB over 100 calls"
    )


@pytest.mark.slow
@pytest.mark.soak
def test_a_thousand_generations_do_not_grow_memory(engine):
    before = rss_after(engine, 50)
    after = rss_after(engine, 1000)
    assert after - before < 40 * 2**20, (
        f"RSS grew by {(after - before) / 2**20:.1f} MB over 1000 calls"
    )


junk_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
config_keys = st.sampled_from(
    ["large", "small", "experts", "fusion", "generation", "batching", "path", "mode"]
)
junk_configs = st.dictionaries(config_keys, junk_values, max_size=5) | junk_values


@pytest.mark.slow
@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(junk_configs)
def test_junk_configs_exit_2_with_one_line(tmp_path, capsys, config):
    path = tmp_path / "junk.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["generate", "--config", str(path), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.binary(max_size=200), st.sampled_from([".yaml", ".toml", ".json", ".txt"]))
def test_junk_config_files_exit_2_with_one_line(tmp_path, capsys, content, suffix):
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(content)
    assert main(["generate", "--config", str(path), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.slow
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    prompt=st.text(max_size=30),
    tokens=st.integers(-5, 400),
    temperature=st.floats(-2, 3) | st.just(float("nan")),
)
def test_junk_requests_give_typed_errors_or_results(
    tiny_family, tmp_path_factory, capsys, prompt, tokens, temperature
):
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    if not path.exists():
        path.write_text(yaml.safe_dump(family_config(tiny_family, experts=("lora_a",))))
    code = main(
        [
            "generate",
            "--config",
            str(path),
            prompt,
            f"--max-new-tokens={tokens}",
            f"--temperature={temperature}",
        ]
    )
    err = capsys.readouterr().err
    assert code in (0, 2)
    if code == 2:
        assert err.startswith("error: ") and err.count("\n") == 1


def test_engine_rejects_inputs_without_loading_half_way(tiny_family, tmp_path):
    config = family_config(tiny_family)
    config["experts"][1]["path"] = str(tmp_path / "missing-adapter")
    engine = FusionEngine(config)
    with pytest.raises(Exception, match="missing-adapter"):
        engine.load()
    assert not engine.loaded
