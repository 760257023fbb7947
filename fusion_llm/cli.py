"""`fusion-llm` command line: generate with a config, run the demo, manage the model zoo.

Every error a user can cause ends the command with exit code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import transformers

from .engine import FusionEngine, Generation
from .errors import DeviceError, FusionError, ModelNotFoundError, RequestError


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit code 2, like every other user error."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed
        return int(exit_.code or 0)
    # Results go to stdout, errors as one line to stderr: no progress bars, library notices.
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return args.run(args)
    except FusionError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fusion-llm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND", parser_class=_Parser)

    generate = commands.add_parser("generate", help="generate text for one or more prompts")
    generate.add_argument("prompts", nargs="+", metavar="PROMPT")
    generate.add_argument("--config", required=True, help="YAML, TOML or JSON engine config")
    _add_request_options(generate)
    generate.set_defaults(run=_generate)

    demo = commands.add_parser("demo", help="large / expert / fused answers side by side")
    _add_request_options(demo)
    demo.set_defaults(run=_demo)

    bench = commands.add_parser("bench", help="time the fused decoder against its forwards")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronise CUDA)")
    bench.add_argument("--shapes", default="toy,realistic", help="comma-separated: toy, realistic")
    bench.add_argument("--batch-sizes", default="1,8,32")
    bench.add_argument("--experts", default="1,2,4", help="expert counts to compare")
    bench.add_argument("--prompt-tokens", type=int, default=64)
    bench.add_argument("--new-tokens", type=int, default=64)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--solver-vocabs", default="32000,151936")
    bench.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    bench.add_argument("--out", default="bench-results", help="folder for bench.json and bench.md")
    bench.set_defaults(run=_bench)

    reproduce = commands.add_parser(
        "reproduce",
        help="the paper's Tables 1-3, its ICL table and the alpha figure on the shipped family",
    )
    reproduce.add_argument("--n", type=int, default=50, help="eval questions per task")
    reproduce.add_argument("--max-new-tokens", type=int, default=48)
    reproduce.add_argument("--out", type=Path, default=Path("results"), help="results folder")
    reproduce.add_argument(
        "--full",
        action="store_true",
        help="retrain the large baselines (about 20 min) instead of reading their committed results",
    )
    reproduce.add_argument(
        "--baselines",
        type=Path,
        help="where --full puts the large baselines (default: zoo-baselines/)",
    )
    reproduce.add_argument(
        "--models-dir", type=Path, help="a zoo built by `fusion-llm zoo build` (default: shipped)"
    )
    reproduce.set_defaults(run=_reproduce)

    try:
        from .zoo.cli import register
    except ImportError:  # the zoo is optional in source checkouts that lack it
        pass
    else:
        register(commands)
    return parser


def _add_request_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experts", help="comma-separated expert names (default: all)")
    parser.add_argument("--mode", choices=["none", "static", "paper", "dynamic"])
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--trace", action="store_true", help="print the per-token alpha trace")
    parser.add_argument("--json", action="store_true", help="print results as JSON lines")


def _request(args: argparse.Namespace) -> dict:
    experts = None if args.experts is None else [e for e in args.experts.split(",") if e]
    return {
        "experts": experts,
        "mode": args.mode,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
    }


def _generate(args: argparse.Namespace) -> int:
    engine = FusionEngine(args.config)
    for generation in engine.generate(args.prompts, **_request(args)):
        _print(generation, args)
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The shipped model family, two eval questions per task: the large base alone, the small
    expert alone and the fused model side by side, with the alpha trace summary."""
    from .eval.tasks import TASKS, load_task
    from .zoo import ZooNotBuiltError, zoo_config, zoo_path

    request = {k: v for k, v in _request(args).items() if k != "experts"}
    request = {
        "max_new_tokens": 40,
        "stop": ["\n"],
        **{k: v for k, v in request.items() if v is not None},
    }
    try:
        fused_engine = FusionEngine(zoo_config(list(TASKS), source="small", kind="full"))
        experts_alone = {
            task: FusionEngine(
                {
                    "large": {"path": str(zoo_path(f"small-{task}"))},
                    "small": {"path": str(zoo_path("small"))},
                }
            )
            for task in TASKS
        }
    except (ZooNotBuiltError, KeyError) as err:
        raise ModelNotFoundError(
            f"the shipped model family is missing ({err}); run `fusion-llm zoo build`"
        ) from None
    for task in TASKS:
        examples = load_task(task, "eval", 2)
        prompts = [e.prompt for e in examples]
        large = fused_engine.generate(prompts, **{**request, "mode": "none"})
        expert = experts_alone[task].generate(prompts, **{**request, "mode": "none"})
        fused = fused_engine.generate(prompts, experts=[task], **request)
        for example, a, b, c in zip(examples, large, expert, fused, strict=True):
            lines = example.prompt.splitlines()
            question = next(line for line in lines if line.startswith(("Question:", "Article:")))
            print(f"[{task}] {question[:100]}")
            print(f"  reference      : {example.answer!r}")
            print(f"  large alone    : {a.text.strip()!r}")
            print(f"  small expert   : {b.text.strip()!r}")
            print(
                f"  fused ({c.mode:>7}): {c.text.strip()!r}  alpha {json.dumps(c.alpha_summary()[task])}"
            )
            if args.trace:
                print("    alpha per token: " + " ".join(f"{a[0]:.2f}" for a in c.alpha))
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from .eval.run import reproduce
    from .zoo import MODELS_DIR

    if args.baselines and not args.full:
        raise RequestError("--baselines is where --full puts the retrained baselines; add --full")
    texts = reproduce(
        args.out,
        n=args.n,
        max_new_tokens=args.max_new_tokens,
        full=args.full,
        baselines_dir=args.baselines,
        models_dir=args.models_dir or MODELS_DIR,
        log=lambda line: print(line, file=sys.stderr),
    )
    for name, text in texts.items():
        print(f"## {name}\n\n{text}\n")
    print(f"written to {args.out}/ (with alpha_math.png)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import BenchSettings, markdown, run_bench, write_report
    from .bench.families import SHAPES

    def numbers(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split(",") if x)

    shapes = tuple(s for s in args.shapes.split(",") if s)
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or args.new_tokens < 2 or args.repeats < 1:
        msg = f"bench needs shapes from {', '.join(SHAPES)}, --new-tokens >= 2 and --repeats >= 1"
        raise RequestError(msg)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda requested but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = BenchSettings(
        device=args.device,
        shapes=shapes,
        batch_sizes=numbers(args.batch_sizes),
        experts=numbers(args.experts),
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        solver_vocabs=numbers(args.solver_vocabs),
    )
    results = run_bench(settings, log=lambda line: print(line, file=sys.stderr))
    json_path, md_path = write_report(results, args.out)
    print(markdown(results))
    print(f"written: {json_path}, {md_path}", file=sys.stderr)
    return 0


def _print(generation: Generation, args: argparse.Namespace) -> None:
    if args.json:
        record = {
            "text": generation.text,
            "finish_reason": generation.finish_reason,
            "prompt_tokens": generation.prompt_tokens,
            "completion_tokens": generation.completion_tokens,
            "experts": generation.experts,
            "mode": generation.mode,
            "alpha_summary": generation.alpha_summary(),
        }
        if args.trace:
            record["alpha"] = generation.alpha
        print(json.dumps(record))
        return
    print(generation.text)
    if args.trace:
        print(f"# experts: {', '.join(generation.experts) or '-'}  mode: {generation.mode}")
        for step, alpha in enumerate(generation.alpha):
            print(f"# step {step}: " + " ".join(f"{a:.3f}" for a in alpha))


if __name__ == "__main__":
    raise SystemExit(main())
