"""Plot the alpha trace of one fused generation: each expert's weight at every generated token.

python cookbooks/alpha_trace_plot.py --out alpha.png
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt
from _setup import add_model_arguments, fusion_config

from fusion_llm import FusionEngine, Generation

PROMPT = (
    "Question: Drailgan Temrum has 19 coins. Drailgan sells 19 to Zassoun Trampo and then buys "
    "14 more. How many coins does Drailgan have now?\nAnswer:"
)


def plot_alpha(generation: Generation, path: str) -> None:
    """One line per expert: alpha against the index of the generated token."""
    figure, axes = plt.subplots(figsize=(8, 3))
    tokens = range(len(generation.alpha))
    for column, expert in enumerate(generation.experts):
        axes.plot(tokens, [row[column] for row in generation.alpha], marker=".", label=expert)
    axes.set(xlabel="generated token", ylabel="alpha", title=f"{generation.mode} fusion")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> Generation:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, first="math", second="summary")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--out", default="alpha_trace.png")
    args = parser.parse_args(argv)
    tasks = [args.first_task, args.second_task]
    engine = FusionEngine(fusion_config(args.config, tasks))
    (generation,) = engine.generate(args.prompt, experts=tasks, max_new_tokens=args.max_new_tokens)
    plot_alpha(generation, args.out)
    print(f"{generation.text!r}\nalpha summary: {generation.alpha_summary()}\nplot: {args.out}")
    return generation


if __name__ == "__main__":
    main()
