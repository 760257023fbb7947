"""`build_zoo`: re-create the whole model family from a seed, in an order that fails safe.

Order: tokenizer, the small and mid bases and their probes, the shipped experts, the large base and
its probe, then the large baselines (not shipped; only their eval results are). With
`processes=2` the large base pretrains in a second process while the first builds the rest (the
large base is most of a build's time); each model's seed and data are the same either way, so both
orders build the same family. `zoo.json` is rewritten after every model, so an interrupted build
still describes what it made.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from fusion_llm.zoo.manifest import read_manifest, write_manifest
from fusion_llm.zoo.probe import probe
from fusion_llm.zoo.scales import Scale, get_scale
from fusion_llm.zoo.task_families import SEEN_TASKS, TASKS, task_examples
from fusion_llm.zoo.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from fusion_llm.zoo.train import finetune, new_base, param_count, pretrain, save
from fusion_llm.zoo.world import World, make_world

BASES = ("small", "mid", "large")
DEFAULT_BASELINES_DIR = Path("zoo-baselines")  # the large baselines: not shipped
log = logging.getLogger(__name__)


def finetune_name(base: str, task: str, lora: bool) -> str:
    return f"{base}-{task}" + ("-lora" if lora else "")


def finetune_runs(bases: tuple[str, ...] = BASES) -> list[tuple[int, str, str, bool]]:
    """(seed offset, base, task, lora) of the fine-tunes of `bases`, in build order. The offsets
    number every fine-tune of a full build, so a subset (the large baselines retrained alone) gets
    the seeds a full build gives it."""
    runs = [
        (base, task, lora)
        for task in (*TASKS, "multi")
        for base, lora in (("small", False), ("small", True), ("mid", False))
        if not (lora and task == "multi")
    ]
    runs += [
        ("large", task, lora)
        for task in (*TASKS, "multi")
        for lora in (False, True)
        if not (lora and task == "multi")
    ]
    return [
        (100 + k, base, task, lora) for k, (base, task, lora) in enumerate(runs) if base in bases
    ]


def _train_sets(world, spec) -> dict[str, list]:
    """Each task's train split, and "multi": the four seen tasks' splits together."""
    sets = {t: task_examples(world, t, "train", spec.n_train, spec.n_eval) for t in TASKS}
    sets["multi"] = [e for t in SEEN_TASKS for e in sets[t]]
    return sets


def train_baselines(baselines_dir: str | Path, models_dir: str | Path) -> dict[str, dict]:
    """Re-train only the large baselines (full fine-tune and LoRA per task, multi-task fine-tune) on
    the large base saved in `models_dir`, at the scale and seed its manifest records. Returns
    {name: {"kind", "task", "train_seconds", "path"}}, also written to `baselines_dir/zoo.json`."""
    models_dir, baselines_dir = Path(models_dir), Path(baselines_dir)
    manifest = read_manifest(models_dir)
    spec, seed = get_scale(manifest["scale"]), manifest["seed"]
    world = make_world(seed, spec.n_people, n_misconceptions=spec.n_misconceptions)
    tokenizer = load_tokenizer(models_dir / "tokenizer")
    # Trained in fp32 like a full build, from the shipped fp16 weights (a full build starts from the
    # unrounded base, so its baselines can differ from these in the last digits).
    large = AutoModelForCausalLM.from_pretrained(models_dir / "large", dtype=torch.float32)
    train_sets = _train_sets(world, spec)
    trained: dict[str, dict] = {}
    for offset, base, task, lora in finetune_runs(("large",)):
        name = finetune_name(base, task, lora)
        model, seconds = finetune(
            large, train_sets[task], tokenizer, spec, lora, seed + offset, f"finetune {name}"
        )
        save(model, tokenizer, baselines_dir / name, base_name="large")
        trained[name] = {
            "kind": "lora" if lora else "full",
            "task": task,
            "seed": seed + offset,
            "train_seconds": round(seconds, 1),
            "path": str((baselines_dir / name).resolve()),
        }
        write_manifest(baselines_dir, {"scale": manifest["scale"], "seed": seed, "models": trained})
    return trained


def _pretrained_base(
    name: str, spec: Scale, world: World, tokenizer, seed: int
) -> tuple[torch.nn.Module, float, float]:
    """(base model, mean loss of the last steps, seconds) of the base `name`."""
    model = new_base(spec.sizes[name], tokenizer, spec.window, seed + BASES.index(name))
    start = time.perf_counter()
    loss = pretrain(
        model,
        world,
        tokenizer,
        spec,
        spec.pretrain_steps[name],
        spec.pretrain_lr[name],
        f"pretrain {name}",
    )
    return model, loss, time.perf_counter() - start


def _pretrained_base_apart(
    name: str, scale: str, seed: int, tokenizer_dir: str, threads: int | None
) -> tuple[dict, float, float]:
    """`_pretrained_base` in a worker process: (state dict, loss, seconds)."""
    if threads is not None:
        torch.set_num_threads(threads)
    spec = get_scale(scale)
    world = make_world(seed, spec.n_people, n_misconceptions=spec.n_misconceptions)
    model, loss, seconds = _pretrained_base(
        name, spec, world, load_tokenizer(Path(tokenizer_dir)), seed
    )
    return model.state_dict(), loss, seconds


def build_zoo(
    out_dir: str | Path,
    scale: str = "full",
    seed: int = 0,
    baselines_dir: str | Path | None = None,
    threads: int | None = None,
    processes: int = 1,
) -> dict:
    """Train and save every zoo model under `out_dir`; large baselines go to `baselines_dir`
    (skipped when None). `processes=2` pretrains the large base in a second process, each process
    with `threads` torch threads. Returns the manifest also written to `out_dir/zoo.json`."""
    if processes not in (1, 2):
        msg = f"processes must be 1 or 2, got {processes}"
        raise ValueError(msg)
    if threads is not None:
        torch.set_num_threads(threads)
    spec = get_scale(scale)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world = make_world(seed, spec.n_people, n_misconceptions=spec.n_misconceptions)
    tokenizer = train_tokenizer(world, spec.vocab_size, spec.n_eval)
    save_tokenizer(tokenizer, out_dir / "tokenizer")
    manifest: dict = {"scale": scale, "seed": seed, "models": {}, "probe": {}}

    def record(
        name: str,
        model,
        kind: str,
        base: str | None,
        task: str | None,
        model_seed: int,
        seconds: float,
        directory: Path,
        shipped: bool = True,
    ) -> None:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        save(model, tokenizer, directory, base_name=base)
        manifest["models"][name] = {
            "kind": kind,
            "base": base,
            "task": task,
            "seed": model_seed,  # with the task's train split, what rebuilds it (train-expert --seed)
            "params": param_count(model),
            "trainable_params": trainable,
            "train_seconds": round(seconds, 1),
            "shipped": shipped,
            "path": str(directory.resolve()) if not shipped else name,
        }
        write_manifest(out_dir, manifest)
        log.info("saved %s (%s params, %.0f s)", name, f"{trainable:,}", seconds)

    def record_base(name: str, model, loss: float, seconds: float) -> None:
        record(name, model, "base", None, None, seed + BASES.index(name), seconds, out_dir / name)
        manifest["models"][name]["final_loss"] = round(loss, 4)
        manifest["probe"][name] = probe(model, tokenizer, world, spec.n_eval)
        write_manifest(out_dir, manifest)
        log.info("probe %s: %s", name, json.dumps(manifest["probe"][name]))

    def finetune_all(of_bases: tuple[str, ...]) -> None:
        for offset, base, task, lora in finetune_runs(of_bases):
            name = finetune_name(base, task, lora)
            shipped = base != "large"
            model, seconds = finetune(
                bases[base],
                train_sets[task],
                tokenizer,
                spec,
                lora,
                seed + offset,
                f"finetune {name}",
            )
            directory = out_dir / name if shipped else Path(baselines_dir) / name
            kind = "lora" if lora else "full"
            record(name, model, kind, base, task, seed + offset, seconds, directory, shipped)

    large_apart: Future | None = None
    if processes == 2:
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        large_apart = pool.submit(
            _pretrained_base_apart, "large", scale, seed, str(out_dir / "tokenizer"), threads
        )
        pool.shutdown(wait=False)
    bases = {}
    for name in ("small", "mid"):
        model, loss, seconds = _pretrained_base(name, spec, world, tokenizer, seed)
        record_base(name, model, loss, seconds)
        bases[name] = model
    train_sets = _train_sets(world, spec)
    finetune_all(("small", "mid"))
    if large_apart is None:
        model, loss, seconds = _pretrained_base("large", spec, world, tokenizer, seed)
    else:
        state, loss, seconds = large_apart.result()
        model = new_base(spec.sizes["large"], tokenizer, spec.window, seed)
        model.load_state_dict(state)
        model.eval()
    record_base("large", model, loss, seconds)
    bases["large"] = model
    if baselines_dir:
        finetune_all(("large",))
    return manifest
