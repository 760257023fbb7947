"""What vLLM is started with: engine arguments and the server's command line (no vLLM needed).

The large model is a saved `LlamaConfig` (no weights): on a CPU the KV cache is sized from it."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys

import psutil
import pytest
from transformers import LlamaConfig

from fusion_llm.backends.vllm.launch import (
    CONFIG_ENV,
    CPU_KV_CACHE_CAP_GIB,
    GIB,
    PROCESSOR,
    PROCESSOR_V2,
    check_hostable,
    cpu_binding,
    cpu_kv_cache_bytes,
    engine_arguments,
    vllm_environment,
)
from fusion_llm.backends.vllm.server import server_command
from fusion_llm.core.config import FusionConfig
from fusion_llm.core.errors import ConfigError

LAYERS, KV_HEADS, HEAD_DIM, POSITIONS = 2, 2, 16, 256


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A large model's folder holding only its config: 2 layers, 2 KV heads of 16, 256 positions."""
    folder = tmp_path_factory.mktemp("large")
    LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=POSITIONS,
        dtype="float16",
    ).save_pretrained(folder)
    return str(folder)


def _config(large: str = "/models/large", device: str = "auto", **vllm) -> FusionConfig:
    return FusionConfig.model_validate(
        {
            "large": {"path": large, "device": device},
            "small": {"path": "/models/small"},
            "experts": [{"name": "math", "path": "/models/math"}],
            "vllm": vllm,
        }
    )


def _per_token(dtype_bytes: int, kv_heads: int = KV_HEADS) -> int:
    return LAYERS * 2 * kv_heads * HEAD_DIM * dtype_bytes


def test_engine_arguments_carry_the_processor_and_the_large_model(large):
    arguments = engine_arguments(_config(large), "cpu")
    assert arguments["model"] == arguments["tokenizer"] == large
    assert arguments["logits_processors"] == [PROCESSOR]
    assert arguments["async_scheduling"] is False  # the processor needs each sampled token
    assert arguments["dtype"] == "float32" and arguments["enforce_eager"] is True
    assert "kv_cache_memory_bytes" not in engine_arguments(_config(), "cuda")
    gpu = engine_arguments(
        _config(tensor_parallel_size=4, kv_cache_gib=2, engine_args={"max_num_seqs": 64}), "cuda"
    )
    assert gpu["dtype"] == "auto" and gpu["enforce_eager"] is False
    assert gpu["tensor_parallel_size"] == 4 and gpu["kv_cache_memory_bytes"] == 2 * 2**30
    assert gpu["max_num_seqs"] == 64
    # Model Runner V2 on GPUs: its processor, and vLLM chooses async scheduling
    assert gpu["logits_processors"] == [PROCESSOR_V2] and gpu["async_scheduling"] is None


def test_vllm_processes_get_the_config_and_the_runner_of_their_processor():
    config = _config()
    environment = vllm_environment(config, "cpu")
    assert FusionConfig.model_validate_json(environment[CONFIG_ENV]) == config
    assert environment["VLLM_USE_V2_MODEL_RUNNER"] == "0"  # vLLM's CPU worker: the V1 runner
    assert vllm_environment(config, "cuda")["VLLM_USE_V2_MODEL_RUNNER"] == "1"


def test_several_cpu_workers_each_get_a_disjoint_share_of_the_cpus(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    cpus = sorted(os.sched_getaffinity(0))
    assert "VLLM_CPU_OMP_THREADS_BIND" not in vllm_environment(_config(), "cpu")
    if len(cpus) < 2:
        with pytest.raises(ConfigError, match="at least one CPU each"):
            vllm_environment(_config(tensor_parallel_size=2), "cpu")
        return
    binding = vllm_environment(_config(tensor_parallel_size=2), "cpu")["VLLM_CPU_OMP_THREADS_BIND"]
    shares = [[int(c) for c in part.split(",")] for part in binding.split("|")]
    assert len(shares) == 2 and not set(shares[0]) & set(shares[1])
    assert set(shares[0]) | set(shares[1]) <= set(cpus) and len(shares[0]) == len(shares[1])
    assert "VLLM_CPU_OMP_THREADS_BIND" not in vllm_environment(
        _config(tensor_parallel_size=2), "cuda"
    )  # GPU workers bind nothing
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|0")  # the user's own binding is kept
    assert "VLLM_CPU_OMP_THREADS_BIND" not in vllm_environment(
        _config(tensor_parallel_size=2), "cpu"
    )
    with pytest.raises(ConfigError, match="need at least one CPU each"):
        cpu_binding(len(cpus) + 1)


def test_speculative_decoding_is_refused_before_anything_loads():
    config = _config(engine_args={"speculative_config": {"method": "ngram"}})
    with pytest.raises(ConfigError, match="speculative_config"):
        check_hostable(config)


def test_server_command_spells_every_argument_as_a_vllm_flag(large):
    config = _config(large, "cpu", max_model_len=256)
    argv = server_command(config, "127.0.0.1", 8123, "fusion", ["--x", "1"])
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    flags = argv[3:]
    assert flags[flags.index("--port") + 1] == "8123"
    assert flags[flags.index("--served-model-name") + 1] == "fusion"
    assert flags[flags.index("--logits-processors") + 1] == PROCESSOR
    assert flags[flags.index("--max-model-len") + 1] == "256"
    assert "--no-async-scheduling" in flags and "--enforce-eager" in flags
    assert "--revision" not in flags  # unset fields are left to vLLM
    assert flags[-2:] == ["--x", "1"]
    dict_flag = server_command(
        _config(large, "cpu", engine_args={"hf_overrides": {"a": 1}}), "h", 1, "m"
    )
    assert json.loads(dict_flag[dict_flag.index("--hf-overrides") + 1]) == {"a": 1}


@pytest.mark.subprocess
def test_the_engine_imports_its_vllm_backend_without_importing_vllm():
    probe = (
        "import sys, fusion_llm.engine as engine; "
        "print(engine.VllmDecoder.__module__, 'vllm' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert done.stdout.split() == ["fusion_llm.backends.vllm.backend", "False"], done.stderr


def test_cpu_kv_cache_default_holds_max_num_seqs_sequences_of_max_model_len(large, caplog):
    with caplog.at_level(logging.INFO, logger="fusion_llm.backends.vllm.launch"):
        arguments = engine_arguments(_config(large), "cpu")
    # vLLM's 128 sequences of the model's 256 positions, float32 (the CPU's `auto`)
    assert arguments["kv_cache_memory_bytes"] == 128 * POSITIONS * _per_token(4)
    [line] = caplog.messages
    assert line.startswith(
        "vLLM KV cache on CPU: 0.0156 GiB per worker = 128 sequences x 256 tokens"
    )
    assert "set vllm.kv_cache_gib" in line
    chosen = engine_arguments(
        _config(large, max_model_len=64, engine_args={"max_num_seqs": 4, "dtype": "bfloat16"}),
        "cpu",
    )
    assert chosen["kv_cache_memory_bytes"] == 4 * 64 * _per_token(2)
    explicit = engine_arguments(_config(large, kv_cache_gib=0.5), "cpu")
    assert explicit["kv_cache_memory_bytes"] == GIB // 2


def test_cpu_kv_cache_default_is_capped_but_holds_one_sequence(large):
    def sized(available: int, tensor_parallel_size: int = 1) -> int:
        arguments = {
            "dtype": "auto",  # the checkpoint's float16
            "tensor_parallel_size": tensor_parallel_size,
            "pipeline_parallel_size": 1,
            "max_num_seqs": 10**6,  # wants far more than any cap
        }
        return cpu_kv_cache_bytes(_config(large), arguments, available)[0]

    assert sized(100 * GIB) == CPU_KV_CACHE_CAP_GIB * GIB
    assert sized(2 * GIB) == GIB  # half of what is free
    assert sized(2 * GIB, tensor_parallel_size=2) == GIB // 2  # per worker
    # too little free for any cap: one 256-token sequence in 128-token pages, plus the page vLLM
    # keeps back (each of 2 workers holds 1 of the 2 KV heads)
    pages = math.ceil(POSITIONS / 128) + 1
    assert sized(1024) == pages * 128 * _per_token(2)
    assert sized(1024, tensor_parallel_size=2) == pages * 128 * _per_token(2, kv_heads=1)


def test_a_kv_cache_larger_than_free_memory_is_refused_with_both_numbers(large):
    too_much = 2 * psutil.virtual_memory().total / GIB
    with pytest.raises(ConfigError) as refused:
        engine_arguments(_config(large, kv_cache_gib=too_much), "cpu")
    assert re.search(
        rf"\({too_much:.2f} GiB over 1 worker\(s\)\) is more than the [0-9.]+ GiB of memory "
        "free; set a smaller vllm.kv_cache_gib",
        str(refused.value),
    )
    # on a GPU the size is vLLM's to check against the accelerator's memory
    gpu = engine_arguments(_config(large, kv_cache_gib=too_much), "cuda")
    assert gpu["kv_cache_memory_bytes"] == int(too_much * GIB)
