"""`fusion-llm` command line: generate with a config, run the demo, manage the model zoo.

Every error a user can cause ends the command with exit code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence

import transformers

from .engine import FusionEngine, Generation
from .errors import FusionError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()  # keep stdout for results
    transformers.utils.logging.set_verbosity_error()
    try:
        return args.run(args)
    except FusionError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusion-llm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate text for one or more prompts")
    generate.add_argument("prompts", nargs="+", metavar="PROMPT")
    generate.add_argument("--config", required=True, help="YAML, TOML or JSON engine config")
    _add_request_options(generate)
    generate.set_defaults(run=_generate)

    demo = commands.add_parser("demo", help="large / expert / fused answers side by side")
    _add_request_options(demo)
    demo.set_defaults(run=_demo)

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
