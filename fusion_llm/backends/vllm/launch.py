"""What vLLM is started with for a fusion config, and the checks that refuse a config it cannot
host before anything starts. Shared by the engine's vLLM backend and `fusion-llm serve`."""

from __future__ import annotations

from functools import cache
from typing import Any

from ...core.config import FusionConfig
from ...core.errors import ConfigError
from ...runtime.models import ModelSet, load_models

PROCESSOR = "fusion_llm.backends.vllm.processor:FusionLogitsProcessor"
CONFIG_ENV = "FUSION_LLM_CONFIG"  # the fusion config (a path or its JSON) for vLLM's processes


def vllm_environment(config: FusionConfig) -> dict[str, str]:
    """Environment for vLLM's processes: the fusion config for the logits processor, and the V1
    model runner, whose logits-processor interface the processor implements (CPU workers use it
    anyway; GPU workers otherwise default to the V2 runner)."""
    return {CONFIG_ENV: config.model_dump_json(), "VLLM_USE_V2_MODEL_RUNNER": "0"}


def engine_arguments(config: FusionConfig, device: str) -> dict[str, Any]:
    """`vllm.EngineArgs` fields for the config's large model with the fusion processor.

    Async scheduling is off: the processor feeds each step's sampled token to the small models,
    so it must see that token before the next step's logits."""
    large, spec = config.large, config.vllm
    arguments: dict[str, Any] = {
        "model": large.path,
        "tokenizer": large.tokenizer or large.path,
        "revision": large.revision,
        "trust_remote_code": large.trust_remote_code,
        "dtype": _vllm_dtype(large.dtype, device),
        "seed": 0,
        "tensor_parallel_size": spec.tensor_parallel_size,
        "pipeline_parallel_size": spec.pipeline_parallel_size,
        "logits_processors": [PROCESSOR],
        "async_scheduling": False,
        "enforce_eager": device == "cpu" if spec.enforce_eager is None else spec.enforce_eager,
    }
    if spec.distributed_executor_backend is not None:
        arguments["distributed_executor_backend"] = spec.distributed_executor_backend
    if spec.max_model_len is not None:
        arguments["max_model_len"] = spec.max_model_len
    if spec.kv_cache_gib is not None:
        arguments["kv_cache_memory_bytes"] = int(spec.kv_cache_gib * 2**30)
    if spec.gpu_memory_utilization is not None:
        arguments["gpu_memory_utilization"] = spec.gpu_memory_utilization
    arguments.update(spec.engine_args)
    return arguments


def _vllm_dtype(dtype: str, device: str) -> str:
    # The HF backend's `auto` is float32 on CPU; vLLM's would keep a float16 checkpoint's dtype.
    return "float32" if dtype == "auto" and device == "cpu" else dtype


@cache
def small_models(config_json: str) -> ModelSet:
    """The small base and experts of a config (the large model is only described: vLLM runs it),
    loaded once per process and shared by the processor and the engine facade."""
    return load_models(FusionConfig.model_validate_json(config_json), large_weights=False)


def check_hostable(config: FusionConfig) -> None:
    """Load the small models (vocabularies checked against the large tokenizer; kept for the
    processor in this process) and refuse a tensor-parallel size the large model's heads cannot
    be split by."""
    small_models(config.model_dump_json())
    size = config.vllm.tensor_parallel_size
    if size > 1:
        from transformers import AutoConfig

        large = AutoConfig.from_pretrained(
            config.large.path,
            revision=config.large.revision,
            trust_remote_code=config.large.trust_remote_code,
        ).get_text_config()
        heads = large.num_attention_heads
        kv_heads = getattr(large, "num_key_value_heads", None) or heads
        if heads % size or (kv_heads % size and size % kv_heads):
            msg = (
                f"vllm.tensor_parallel_size {size} cannot split the large model's attention: "
                f"{heads} query heads and {kv_heads} key/value heads (query heads must divide by "
                "it, and key/value heads divide by it or it by them); choose a size that does"
            )
            raise ConfigError(msg)
