"""Alpha per decoding step (the paper's Fig. 3): one plot line per trace."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)


def plot_alpha(
    traces: dict[str, list[float]],
    path: str | Path,
    title: str,
    tokens: list[str] | None = None,
) -> None:
    """Each trace's alpha against the index of the generated token, saved as an image at `path`;
    `tokens` (the generated tokens, when every trace generated the same) label the x axis."""
    figure, axes = plt.subplots(figsize=(max(8, 0.45 * len(tokens or ())), 3.4))
    for label, alpha in traces.items():
        axes.plot(range(len(alpha)), alpha, marker=".", label=label)
    axes.set(xlabel="generated token", ylabel="alpha", title=title)
    if tokens:
        axes.set_xticks(
            range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=60, fontsize=8
        )
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
