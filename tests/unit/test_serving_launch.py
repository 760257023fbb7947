"""What vLLM is started with: engine arguments and the server's command line (no vLLM needed)."""

from __future__ import annotations

import json
import sys

from fusion_llm.backends.vllm.launch import (
    CONFIG_ENV,
    PROCESSOR,
    engine_arguments,
    vllm_environment,
)
from fusion_llm.backends.vllm.server import server_command
from fusion_llm.core.config import FusionConfig


def _config(**vllm) -> FusionConfig:
    return FusionConfig.model_validate(
        {
            "large": {"path": "/models/large"},
            "small": {"path": "/models/small"},
            "experts": [{"name": "math", "path": "/models/math"}],
            "vllm": vllm,
        }
    )


def test_engine_arguments_carry_the_processor_and_the_large_model():
    arguments = engine_arguments(_config(), "cpu")
    assert arguments["model"] == arguments["tokenizer"] == "/models/large"
    assert arguments["logits_processors"] == [PROCESSOR]
    assert arguments["async_scheduling"] is False  # the processor needs each sampled token
    assert arguments["dtype"] == "float32" and arguments["enforce_eager"] is True
    assert "kv_cache_memory_bytes" not in arguments
    gpu = engine_arguments(
        _config(tensor_parallel_size=4, kv_cache_gib=2, engine_args={"max_num_seqs": 64}), "cuda"
    )
    assert gpu["dtype"] == "auto" and gpu["enforce_eager"] is False
    assert gpu["tensor_parallel_size"] == 4 and gpu["kv_cache_memory_bytes"] == 2 * 2**30
    assert gpu["max_num_seqs"] == 64


def test_vllm_processes_get_the_config_and_the_v1_runner():
    config = _config()
    environment = vllm_environment(config)
    assert FusionConfig.model_validate_json(environment[CONFIG_ENV]) == config
    assert environment["VLLM_USE_V2_MODEL_RUNNER"] == "0"


def test_server_command_spells_every_argument_as_a_vllm_flag():
    argv = server_command(_config(max_model_len=256), "127.0.0.1", 8123, "fusion", ["--x", "1"])
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    flags = argv[3:]
    assert flags[flags.index("--port") + 1] == "8123"
    assert flags[flags.index("--served-model-name") + 1] == "fusion"
    assert flags[flags.index("--logits-processors") + 1] == PROCESSOR
    assert flags[flags.index("--max-model-len") + 1] == "256"
    assert "--no-async-scheduling" in flags and "--enforce-eager" in flags
    assert "--revision" not in flags  # unset fields are left to vLLM
    assert flags[-2:] == ["--x", "1"]
    dict_flag = server_command(_config(engine_args={"hf_overrides": {"a": 1}}), "h", 1, "m")
    assert json.loads(dict_flag[dict_flag.index("--hf-overrides") + 1]) == {"a": 1}
