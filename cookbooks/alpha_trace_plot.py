"""Plot the alpha trace of one fused generation: each expert's weight at every generated token.

python cookbooks/alpha_trace_plot.py --out alpha.png
"""

from __future__ import annotations

import argparse

from _setup import add_model_arguments, fusion_config

from fusion_llm import FusionEngine, Generation
from fusion_llm.eval.figure import plot_alpha

PROMPT = (
    "Question: Drailgan Temrum has 19 coins. Drailgan sells 19 to Zassoun Trampo and then buys "
    "14 more. How many coins does Drailgan have now?\nAnswer:"
)


def main(argv: list[str] | None = None) -> Generation:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, first="math", second="summary")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--out", default="alpha_trace.png")
    args = parser.parse_args(argv)
    tasks = [args.first_task, args.second_task]
    engine = FusionEngine(fusion_config(args.config, tasks))
    (generation,) = engine.generate(args.prompt, experts=tasks, max_new_tokens=args.max_new_tokens)
    traces = {
        name: [step[i] for step in generation.alpha] for i, name in enumerate(generation.experts)
    }
    plot_alpha(traces, args.out, f"{generation.mode} fusion")
    print(f"{generation.text!r}\nalpha summary: {generation.alpha_summary()}\nplot: {args.out}")
    return generation


if __name__ == "__main__":
    main()
