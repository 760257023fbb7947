"""`fusion-llm bench --backend vllm`: the vLLM backend against the HF backend, in one process.

For 1, 8 and 32 concurrent single-prompt requests (asyncio streams, one LoRA expert, `dynamic`):
throughput in generated tokens per second and the median time to each request's first token, for
the HF backend fused, the vLLM backend fused, and vLLM serving the large model alone (the same
engine, requests without experts: the ceiling fusion can approach). Variants take turns.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

from ..engine import FusionEngine
from .families import family_config, random_prompts, write_family

CONCURRENCY = (1, 8, 32)


def backend_comparison(shape, sizes: dict, device: str, repeats: int, root: str, log) -> dict:
    """Rows per (variant, concurrency) and the ratios the issue asks for."""
    paths = write_family(root, shape, 1)
    config = family_config(paths, 1, device)
    hf = FusionEngine(config).load()
    vllm = FusionEngine({**config, "backend": "vllm", "vllm": {"kv_cache_gib": 1.0}})
    prompts = random_prompts(shape.vocab, [sizes["prompt_tokens"]] * max(CONCURRENCY), seed=0)
    new_tokens = sizes["new_tokens"]
    variants: dict[str, Callable[[int], dict]] = {
        "hf fused": lambda c: _burst(hf, prompts[:c], ["lora0"], new_tokens),
        "vllm fused": lambda c: _burst(vllm, prompts[:c], ["lora0"], new_tokens),
        "vllm large alone": lambda c: _burst(vllm, prompts[:c], [], new_tokens),
    }
    for engine in (hf, vllm):  # first calls load weights and start vLLM
        engine.generate(prompts[0], experts=["lora0"], max_new_tokens=2)
    log(f"{shape.name}: backends started")
    samples: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for _ in range(repeats):
        for concurrency in CONCURRENCY:
            for name, run in variants.items():
                samples[name, concurrency].append(run(concurrency))
    rows = [
        {
            "variant": name,
            "concurrent": concurrency,
            "tokens/s": statistics.median(m["tokens/s"] for m in measured),
            "first token s": statistics.median(m["first token s"] for m in measured),
        }
        for (name, concurrency), measured in samples.items()
    ]
    log(f"{shape.name}: backend comparison done")
    return {"vocab": shape.vocab, **sizes, "rows": rows, "ratios": _ratios(rows)}


def _ratios(rows: list[dict]) -> dict[str, float]:
    by = {(r["variant"], r["concurrent"]): r for r in rows}
    ratios = {}
    for c in CONCURRENCY:
        fused, hf, alone = by["vllm fused", c], by["hf fused", c], by["vllm large alone", c]
        ratios[f"vllm / hf throughput, {c} concurrent"] = fused["tokens/s"] / hf["tokens/s"]
        ratios[f"vllm fused / large alone throughput, {c} concurrent"] = (
            fused["tokens/s"] / alone["tokens/s"]
        )
        ratios[f"vllm / hf first-token time, {c} concurrent"] = (
            fused["first token s"] / hf["first token s"]
        )
    return ratios


def _burst(engine: FusionEngine, prompts: list[str], experts: list[str], new_tokens: int) -> dict:
    """All prompts at once as asyncio streams: tokens/s over the burst, median first-token time."""

    async def one(prompt: str, start: float) -> tuple[float, int]:
        first = None
        tokens = 0
        stream = engine.astream(
            prompt, experts=experts, max_new_tokens=new_tokens, ignore_eos=True, stop=[]
        )
        async for chunk in stream:
            first = first if first is not None else time.perf_counter() - start
            if chunk.generation is not None:
                tokens = len(chunk.generation.token_ids)
        return first, tokens

    async def burst() -> tuple[list, float]:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(p, start) for p in prompts))
        return results, time.perf_counter() - start

    results, wall = asyncio.run(burst())
    return {
        "tokens/s": sum(tokens for _, tokens in results) / wall,
        "first token s": statistics.median(first for first, _ in results),
    }


def markdown(results: dict) -> str:
    lines = ["# fusion-llm bench --backend vllm", ""]
    for name, shape in results["backends"].items():
        lines += [
            f"## Shape `{name}` (vocab {shape['vocab']}, prompt {shape['prompt_tokens']}, "
            f"new {shape['new_tokens']})",
            "",
            "| variant | concurrent | tokens/s | first token s |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['variant']} | {r['concurrent']} | {r['tokens/s']:.2f} | {r['first token s']:.3f} |"
            for r in shape["rows"]
        ]
        lines += ["", "| ratio | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in shape["ratios"].items()]
        lines.append("")
    return "\n".join(lines)
