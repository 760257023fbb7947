"""What vLLM is started with for a fusion config, and the checks that refuse a config it cannot
host before anything starts. Shared by the engine's vLLM backend and `fusion-llm serve`."""

from __future__ import annotations

import logging
import math
import os
from functools import cache
from typing import Any

import psutil
import torch

from ...core.config import FusionConfig
from ...core.errors import ConfigError
from ...runtime.models import ModelSet, load_models, resolve_device

# The fusion logits processor for each of vLLM's model runners (their interfaces differ).
PROCESSOR = "fusion_llm.backends.vllm.processor:FusionLogitsProcessor"  # the V1 runner
PROCESSOR_V2 = "fusion_llm.backends.vllm.processor_v2:FusionLogitsProcessorV2"  # Model Runner V2
CONFIG_ENV = "FUSION_LLM_CONFIG"  # the fusion config (a path or its JSON) for vLLM's processes
GIB = 2**30
# The CPU default's ceiling: one machine's RAM is shared with other processes.
CPU_KV_CACHE_CAP_GIB = 4
VLLM_MAX_NUM_SEQS = 128  # vLLM's max_num_seqs when none is given (engine, and server per worker)
VLLM_CPU_BLOCK_SIZE = 128  # vLLM's tokens per KV page on CPU when block_size is not given

SPECULATIVE_DECODING_REFUSED = (
    "speculative decoding (vLLM's speculative_config) cannot run with fusion-llm's logits "
    "processor: the small models would have to read every draft token and roll back the "
    "rejected ones; remove speculative_config (vllm.engine_args, or --speculative-config after "
    "`fusion-llm serve ... --`)"
)

logger = logging.getLogger(__name__)


def runs_model_runner_v2(device: str) -> bool:
    """Whether vLLM runs the large model on `device` with Model Runner V2: on GPUs, where it is
    vLLM's default; vLLM's CPU worker runs the V1 runner (V2 there needs Triton's CPU backend)."""
    return device.split(":", 1)[0] != "cpu"


def logits_processor(device: str) -> str:
    """The fusion processor class for the model runner vLLM runs on `device`."""
    return PROCESSOR_V2 if runs_model_runner_v2(device) else PROCESSOR


def vllm_environment(config: FusionConfig, device: str | None = None) -> dict[str, str]:
    """Environment for vLLM's processes: the fusion config for the logits processor, and the
    model runner whose interface `logits_processor(device)` implements, pinned so that the two
    always match (V2 on GPUs, vLLM's default there; V1 on a CPU). `device`: the large model's
    (default: resolved from the config).

    Several CPU workers (tensor x pipeline parallel) each get their share of this process's
    CPUs (`VLLM_CPU_OMP_THREADS_BIND`, unless set): vLLM's own binding wants one NUMA node per
    worker and refuses to start on a one-node machine."""
    device = device or resolve_device(config.large)
    v2 = runs_model_runner_v2(device)
    environment = {
        CONFIG_ENV: config.model_dump_json(),
        "VLLM_USE_V2_MODEL_RUNNER": "1" if v2 else "0",
    }
    workers = config.vllm.tensor_parallel_size * config.vllm.pipeline_parallel_size
    if not v2 and workers > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        environment["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(workers)
    return environment


def cpu_binding(workers: int) -> str:
    """vLLM's `VLLM_CPU_OMP_THREADS_BIND` value giving each CPU worker an equal, disjoint share
    of this process's CPUs ("0-3|4-7"); raises ConfigError when there are fewer CPUs than workers."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < workers:
        msg = (
            f"vllm: {workers} CPU workers (tensor x pipeline parallel) need at least one CPU each; "
            f"this process may use {len(cpus)}"
        )
        raise ConfigError(msg)
    share = len(cpus) // workers
    parts = [cpus[i * share : (i + 1) * share] for i in range(workers)]
    return "|".join(",".join(map(str, part)) for part in parts)


def engine_arguments(config: FusionConfig, device: str) -> dict[str, Any]:
    """`vllm.EngineArgs` fields for the config's large model with the fusion processor.

    The processor is `logits_processor(device)`. On a CPU async scheduling is off: the V1
    processor feeds each step's sampled token to the small models, so it must see that token
    before the next step's logits; on GPUs vLLM chooses (the V2 processor feeds the token the
    large model reads in the same step, which async scheduling does not delay).

    Returned log-probabilities are vLLM's `processed_logprobs`: log_softmax of the logits after
    vLLM's constraints and every logits processor (the fused row), taken where vLLM's sampler
    takes them: the V1 runner before temperature when every row of the step is greedy, else after
    temperature and top-k / top-p (greedy rows there at temperature 1, unlimited); Model Runner
    V2 after temperature, before top-k / top-p. So they are `runtime.sampler`'s fused
    log-probabilities exactly for greedy rows and for rows sampled at temperature 1 without
    top-k / top-p; other sampled rows report the fused distribution after their temperature
    (on V1 also truncated by their top-k / top-p). (The `raw_*` modes would report the large
    model's, before the processor.)

    On a CPU the KV cache is sized here (`cpu_kv_cache_bytes`, logged) unless one is given, and
    a given one larger than the free memory is refused (`ConfigError`); on GPUs vLLM sizes it
    from `gpu_memory_utilization`."""
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
        "logits_processors": [logits_processor(device)],
        "async_scheduling": None if runs_model_runner_v2(device) else False,
        "logprobs_mode": "processed_logprobs",
        "enforce_eager": device == "cpu" if spec.enforce_eager is None else spec.enforce_eager,
    }
    if spec.distributed_executor_backend is not None:
        arguments["distributed_executor_backend"] = spec.distributed_executor_backend
    if spec.max_model_len is not None:
        arguments["max_model_len"] = spec.max_model_len
    if spec.kv_cache_gib is not None:
        arguments["kv_cache_memory_bytes"] = int(spec.kv_cache_gib * GIB)
    if spec.gpu_memory_utilization is not None:
        arguments["gpu_memory_utilization"] = spec.gpu_memory_utilization
    arguments.update(spec.engine_args)
    if device == "cpu":
        arguments["kv_cache_memory_bytes"] = _checked_cpu_kv_cache(config, arguments)
    return arguments


def _checked_cpu_kv_cache(config: FusionConfig, arguments: dict[str, Any]) -> int:
    workers = arguments["tensor_parallel_size"] * arguments["pipeline_parallel_size"]
    available = psutil.virtual_memory().available
    requested = arguments.get("kv_cache_memory_bytes")
    if requested is None:
        requested, derivation = cpu_kv_cache_bytes(config, arguments, available)
        logger.info("vLLM KV cache on CPU: %.3g GiB per worker = %s", requested / GIB, derivation)
    if requested * workers > available:
        msg = (
            f"vLLM's KV cache ({requested * workers / GIB:.2f} GiB over {workers} worker(s)) "
            f"is more than the {available / GIB:.2f} GiB of memory free; set a "
            "smaller vllm.kv_cache_gib (unset, it is sized from max_model_len and holds at least "
            "one sequence: then lower vllm.max_model_len) or free memory"
        )
        raise ConfigError(msg)
    return requested


def cpu_kv_cache_bytes(
    config: FusionConfig, arguments: dict[str, Any], available: int
) -> tuple[int, str]:
    """KV cache bytes per vLLM CPU worker when none is configured, and how they were derived.

        per_token = ceil(layers / pp) * 2 * max(1, kv_heads // tp) * head_dim * dtype bytes
        wanted    = max_num_seqs * max_model_len * per_token
        floor     = (ceil(max_model_len / block_size) + 1) * block_size * per_token
        bytes     = max(floor, min(wanted, min(4 GiB, available / 2) / (tp * pp)))

    vLLM's own CPU default, 90 % of RAM less what its process holds, leaves no room for a second
    process. `floor` is one max_model_len sequence beside the null page vLLM keeps back: vLLM
    refuses a cache smaller than that. max_model_len and max_num_seqs are vLLM's: the config's,
    else the model's max_position_embeddings and vLLM's default of 128; the dtype is the one
    vLLM runs (`arguments["dtype"]`, `auto`: the checkpoint's)."""
    from transformers import AutoConfig

    large = AutoConfig.from_pretrained(
        config.large.path,
        revision=config.large.revision,
        trust_remote_code=config.large.trust_remote_code,
    ).get_text_config()
    max_model_len = arguments.get("max_model_len") or getattr(
        large, "max_position_embeddings", None
    )
    if max_model_len is None:
        msg = (
            f"the large model's config ({config.large.path}) gives no max_position_embeddings to "
            "size vLLM's KV cache on CPU by: set vllm.max_model_len or vllm.kv_cache_gib"
        )
        raise ConfigError(msg)
    tensor_parallel = arguments["tensor_parallel_size"]
    pipeline = arguments["pipeline_parallel_size"]
    heads = large.num_attention_heads
    kv_heads = max(1, (getattr(large, "num_key_value_heads", None) or heads) // tensor_parallel)
    head_dim = getattr(large, "head_dim", None) or large.hidden_size // heads
    dtype_bytes = _dtype_bytes(arguments["dtype"], large)
    layers = math.ceil(large.num_hidden_layers / pipeline)
    per_token = layers * 2 * kv_heads * head_dim * dtype_bytes
    max_num_seqs = arguments.get("max_num_seqs") or VLLM_MAX_NUM_SEQS
    block_size = arguments.get("block_size") or VLLM_CPU_BLOCK_SIZE
    wanted = max_num_seqs * max_model_len * per_token
    cap = min(CPU_KV_CACHE_CAP_GIB * GIB, available // 2) // (tensor_parallel * pipeline)
    floor = (math.ceil(max_model_len / block_size) + 1) * block_size * per_token
    derivation = (
        f"{max_num_seqs} sequences x {max_model_len} tokens (max_model_len) x {per_token} bytes "
        f"per token ({layers} layers x 2 x {kv_heads} KV heads x {head_dim} x {dtype_bytes} "
        f"bytes) = {wanted / GIB:.3g} GiB, capped at "
        f"{CPU_KV_CACHE_CAP_GIB} GiB and half the {available / GIB:.3g} GiB free, at least one "
        f"sequence ({floor / GIB:.3g} GiB); set vllm.kv_cache_gib to choose"
    )
    return max(floor, min(wanted, cap)), derivation


def _dtype_bytes(dtype: str, large: Any) -> int:
    name = str(getattr(large, "dtype", None) or "float32") if dtype == "auto" else dtype
    return getattr(torch, name.removeprefix("torch.")).itemsize


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
    if "speculative_config" in config.vllm.engine_args:
        raise ConfigError(SPECULATIVE_DECODING_REFUSED)
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
