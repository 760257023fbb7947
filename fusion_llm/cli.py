"""`fusion-llm` command line: generate with a config, run the demo, manage the model zoo.

Every error a user can cause ends the command with exit code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from collections.abc import Sequence

import transformers

from .engine import FusionEngine, Generation
from .errors import DeviceError, FusionError, RequestError


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
    """Until the shipped model family lands: a tiny random family built on the fly (gibberish text,
    real mechanics): the large model alone beside the fused model, with the alpha trace summary."""
    from .tiny import build_family, family_config

    with tempfile.TemporaryDirectory() as root:
        paths = build_family(root)
        generation = {"max_new_tokens": 16}
        engine = FusionEngine(family_config(paths, ("lora_a", "full"), generation=generation))
        request = _request(args)
        prompts = ["question: what city is on the river", "article: the king of Rome"]
        large_alone = engine.generate(prompts, **{**request, "mode": "none"})
        fused = engine.generate(prompts, **request)
        for prompt, alone, mixed in zip(prompts, large_alone, fused, strict=True):
            print(f"prompt: {prompt!r}")
            print(f"  large alone    : {alone.text!r}")
            print(f"  fused ({mixed.mode:>7}): {mixed.text!r}")
            print(f"  alpha          : {json.dumps(mixed.alpha_summary())}")
            if args.trace:
                for step, alpha in enumerate(mixed.alpha):
                    print(f"    step {step}: " + " ".join(f"{a:.3f}" for a in alpha))
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
