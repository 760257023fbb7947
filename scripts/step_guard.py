"""Would a per-step guard help? A teacher-forced study on the shipped family.

A per-step guard would fuse only at the steps where some signal the decoder has (without the
reference) says the expert is trustworthy, and let the large model alone decide elsewhere. For each
expert (the shipped LoRA experts, and experts trained by `train_expert` on answers shuffled within
their task: right format, wrong facts), on the first `--n` eval rows of its task, every reference
position gives the fused (`dynamic`) and the large-alone distribution, and the guard's signal:

    confidence = max_v Q_t(v)        the expert's own top probability at that step

A guard with threshold tau keeps the fused distribution where confidence >= tau and the large
model's elsewhere. Printed per expert and tau (Markdown): the share of steps fused, the gain in
nats per reference token over the large model alone (the gate's measure) and the teacher-forced
token accuracy (argmax = reference token), large alone / fused / guarded.

    python scripts/step_guard.py --work /tmp/step-guard --n 40 --threads 1
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from fusion_llm import FusionEngine
from fusion_llm.core.fusion import fusion_step, log_probs, make_solver
from fusion_llm.eval.tasks import load_task
from fusion_llm.experts import TrainSettings, train_expert
from fusion_llm.experts.data import Record
from fusion_llm.experts.gate import rows_for, teacher_forced_logits
from fusion_llm.zoo import zoo_config, zoo_path

TASKS = ("math", "truthful", "trivia", "summary", "mc")
SHUFFLED_TASKS = ("trivia", "math", "summary")
TAUS = (0.0, 0.3, 0.5, 0.7, 0.9)  # 0.0: no guard


def shuffled_expert(task: str, work: Path) -> Path:
    """An expert trained on 400 train rows of `task` whose answers are shuffled among its rows."""
    out = work / f"small-{task}-shuffled"
    if not (out / "adapter_model.safetensors").exists():
        rows = load_task(task, "train")[:400]
        answers = [r.target for r in rows]
        random.Random(0).shuffle(answers)
        data = work / f"{task}-shuffled.jsonl"
        records = [
            Record(i, r.prompt, a) for i, (r, a) in enumerate(zip(rows, answers, strict=True))
        ]
        data.write_text("".join(json.dumps(r.as_json()) + "\n" for r in records))
        train_expert(zoo_path("small"), data, out, TrainSettings(), log=False)
    return out


@torch.no_grad()
def study(engine: FusionEngine, expert: str, task: str, n: int) -> list[dict]:
    records = [Record(i, e.prompt, e.target) for i, e in enumerate(load_task(task, "eval", n))]
    prompts, references = rows_for(engine, records)
    fusion = engine.config.fusion
    solver = make_solver("dynamic", torch.ones(1), fusion)
    fused, large, confidence, best_fused, best_large, targets = [], [], [], [], [], []
    for start in range(0, len(prompts), 8):
        batch = slice(start, start + 8)
        z_large, z_small, z_expert, target = teacher_forced_logits(
            engine, expert, prompts[batch], references[batch]
        )
        active = torch.ones(len(target), 1, dtype=torch.bool)
        step = fusion_step(z_large, z_small, z_expert[:, None], active, solver)
        p_fused, p_large = log_probs(step.logits), log_probs(z_large)
        fused.append(p_fused.gather(-1, target[:, None])[:, 0])
        large.append(p_large.gather(-1, target[:, None])[:, 0])
        confidence.append(log_probs(z_expert).exp().amax(-1))
        best_fused.append(p_fused.argmax(-1))
        best_large.append(p_large.argmax(-1))
        targets.append(target)
    fused, large, confidence = torch.cat(fused), torch.cat(large), torch.cat(confidence)
    right_fused = torch.cat(best_fused) == torch.cat(targets)
    right_large = torch.cat(best_large) == torch.cat(targets)
    rows = []
    for tau in TAUS:
        keep = confidence >= tau
        guarded = torch.where(keep, fused, large)
        rows.append(
            {
                "expert": expert,
                "tau": tau,
                "fused_share": keep.float().mean().item(),
                "gain": (guarded - large).mean().item(),
                "acc_large": right_large.float().mean().item(),
                "acc_guarded": torch.where(keep, right_fused, right_large).float().mean().item(),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("step-guard"))
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    config = zoo_config(list(TASKS), "small", "lora")
    config["experts"] += [
        {"name": f"{t}-shuffled", "path": str(shuffled_expert(t, args.work))}
        for t in SHUFFLED_TASKS
    ]
    engine = FusionEngine(config).load()
    print("| expert | tau | steps fused | gain (nats/token) | token acc: large | guarded |")
    print("|---|---|---|---|---|---|")
    for spec in engine.config.experts:
        for r in study(engine, spec.name, spec.name.removesuffix("-shuffled"), args.n):
            print(
                f"| {r['expert']} | {r['tau']:.1f} | {r['fused_share']:.0%} | {r['gain']:+.3f} "
                f"| {r['acc_large']:.1%} | {r['acc_guarded']:.1%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
