"""`fusion-llm train-expert`, `fusion-llm gate` and `fusion-llm eval`; `register` plugs them into the
main CLI. Handlers import torch and transformers only when they run, so `fusion-llm --help` stays fast."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.config import FUSED_MODES
from .args import THREADS_HELP, non_negative_int, positive_int

METRICS = ("exact", "number", "rouge2", "choice")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the commands; each sets `run(args) -> int`, the main CLI's dispatch key."""
    train = subparsers.add_parser(
        "train-expert", help="fine-tune the small base on JSONL rows into a fusion expert"
    )
    train.add_argument("--small", required=True, help="the small base (folder or hub id)")
    train.add_argument(
        "--data", required=True, type=Path, help="JSONL: prompt/completion or messages"
    )
    train.add_argument("--out", required=True, type=Path, help="folder for the expert")
    train.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA")
    train.add_argument("--rank", type=positive_int, default=16, help="LoRA rank")
    train.add_argument("--lora-alpha", type=positive_int, help="LoRA alpha (default: 2 x rank)")
    train.add_argument("--lora-dropout", type=float, default=0.0)
    train.add_argument(
        "--target-modules",
        default="all-linear",
        help="comma-separated module names, or all-linear (every linear layer but the head)",
    )
    train.add_argument("--epochs", type=float, default=3.0)
    train.add_argument("--lr", type=float, help="learning rate (default: 2e-3 LoRA, 5e-4 full)")
    train.add_argument("--batch-size", type=positive_int, default=16)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto", help="auto, cpu or cuda")
    train.add_argument(
        "--examples", type=non_negative_int, default=20, help="prompts kept as router examples"
    )
    train.add_argument(
        "--holdout",
        type=non_negative_int,
        default=0,
        help="rows kept out as the gate's validation set",
    )
    train.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        help="bfloat16 mixed precision (default: on GPUs that support it; on CPUs with native "
        "bfloat16, such as AVX512-BF16 or AMX, --bf16 trains about twice as fast)",
    )
    train.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    train.set_defaults(run=_train)

    gate = subparsers.add_parser(
        "gate", help="measure whether fusing each expert raises the likelihood of references"
    )
    gate.add_argument("--config", required=True, help="YAML, TOML or JSON engine config")
    gate.add_argument("--experts", help="comma-separated expert names (default: all)")
    gate.add_argument(
        "--validation",
        type=Path,
        help="JSONL references (default: each expert's held-out validation.jsonl)",
    )
    gate.add_argument("--limit", type=positive_int, help="use at most this many validation rows")
    gate.add_argument("--batch-size", type=positive_int, default=8)
    gate.add_argument(
        "--mode", choices=FUSED_MODES, help="fusion mode measured (default: the config's)"
    )
    gate.set_defaults(run=_gate)

    evaluate = subparsers.add_parser(
        "eval", help="large alone, each expert alone and fused, scored on your JSONL data"
    )
    evaluate.add_argument("--config", required=True, help="YAML, TOML or JSON engine config")
    evaluate.add_argument("--data", required=True, type=Path, help="JSONL rows with references")
    evaluate.add_argument("--metric", required=True, choices=METRICS)
    evaluate.add_argument("--experts", help="comma-separated expert names (default: all)")
    evaluate.add_argument(
        "--shots", type=non_negative_int, default=0, help="k-shot rows for the large model"
    )
    evaluate.add_argument(
        "--shots-from", type=Path, help="JSONL the k-shot demonstrations come from"
    )
    evaluate.add_argument("--n", type=positive_int, help="score only the first n rows")
    evaluate.add_argument("--max-new-tokens", type=positive_int, default=48)
    evaluate.add_argument("--stop", action="append", help="stop string (default: a newline)")
    evaluate.add_argument("--batch-size", type=positive_int, default=32)
    evaluate.add_argument("--out", type=Path, default=Path("eval-results"))
    evaluate.set_defaults(run=_eval)


def _train(args: argparse.Namespace) -> int:
    import torch

    from ..experts.trainer import TrainSettings, train_expert

    if args.threads:
        torch.set_num_threads(args.threads)
    targets = args.target_modules
    settings = TrainSettings(
        full=args.full,
        rank=args.rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t for t in targets.split(",") if t],
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        bf16=args.bf16,
        examples=args.examples,
        holdout=args.holdout,
    )
    result = train_expert(args.small, args.data, args.out, settings)
    print(
        f"trained {result.directory} on {result.rows} rows ({result.steps} steps, "
        f"loss {result.train_loss:.4f}, {result.seconds:.1f} s)"
        + (f"; {result.validation_rows} rows held out" if result.validation_rows else "")
    )
    return 0


def _gate(args: argparse.Namespace) -> int:
    from ..core.config import FusionConfig
    from ..engine import FusionEngine
    from ..experts.gate import gate_experts

    # Teacher-forced likelihoods read the large model's full-sequence logits: the HF models'.
    config = FusionConfig.load(args.config)
    engine = FusionEngine(config.model_copy(update={"backend": "hf"}))
    verdicts = gate_experts(
        engine,
        _names(args.experts),
        args.validation,
        limit=args.limit,
        batch_size=args.batch_size,
        mode=args.mode,
    )
    for name, v in verdicts.items():
        word = "helps" if v["helps"] else "HURTS"
        specificity = "n/a" if v["specificity"] is None else f"{v['specificity']:+.4f}"
        print(
            f"{name}: {word}: fused {-v['fused_nll']:.4f} vs large alone {-v['large_nll']:.4f} "
            f"nats/token ({v['gain']:+.4f}), specificity {specificity}, on {v['rows']} rows; "
            f"stored in {v['card']}"
        )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ..eval.user_eval import evaluate

    report = evaluate(
        args.config,
        args.data,
        args.metric,
        experts=_names(args.experts),
        shots=args.shots,
        shots_from=args.shots_from,
        n=args.n,
        max_new_tokens=args.max_new_tokens,
        stop=args.stop or ["\n"],
        batch_size=args.batch_size,
        out_dir=args.out,
    )
    print(report.markdown)
    print(f"written to {args.out}/ (eval.md, eval.json, alpha.png)", file=sys.stderr)
    return 0


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [e for e in text.split(",") if e]
