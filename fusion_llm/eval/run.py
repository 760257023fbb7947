"""`fusion-llm reproduce`: every table and the alpha figure, written to one results folder.

Quick mode (default) evaluates every row on the shipped family except the large fine-tuned
baselines, whose committed results it reads. `full=True` first retrains those baselines with the
zoo recipe and evaluates them in the same run, and writes `baselines.json` in the committed format.
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import RequestError
from ..zoo import MODELS_DIR, read_manifest
from ..zoo.build import DEFAULT_BASELINES_DIR, train_baselines
from .baselines import load_committed, loadable_baselines
from .cost import cost_markdown, cost_table, timed_rows
from .figure import plot_alpha
from .reproduce import (
    Reproduction,
    RowResult,
    bases_table,
    icl_table,
    markdown,
    results_json,
    table1,
    table2,
    write,
    write_json,
)


def reproduce(
    out_dir: str | Path,
    n: int = 50,
    max_new_tokens: int = 48,
    full: bool = False,
    baselines_dir: str | Path | None = None,
    models_dir: str | Path = MODELS_DIR,
    log=print,
) -> dict[str, str]:
    """Writes {bases, table1, table2, icl, table3}.{json,md}, alpha_math.{png,json} (and, with `full`,
    baselines.json) under `out_dir`; returns {name: Markdown} of the tables."""
    out_dir, models_dir = Path(out_dir), Path(models_dir)
    manifest = read_manifest(models_dir)
    train_seconds = {name: m["train_seconds"] for name, m in manifest["models"].items()}
    repro = Reproduction(n, max_new_tokens, models_dir, log=log)  # checks n before any training
    committed = None
    if full:
        baselines_dir = Path(baselines_dir or DEFAULT_BASELINES_DIR)
        trained = train_baselines(baselines_dir, models_dir)
        train_seconds.update({name: m["train_seconds"] for name, m in trained.items()})
        repro.baselines = loadable_baselines(trained, models_dir, baselines_dir / "merged")
    elif models_dir.resolve() != MODELS_DIR.resolve():
        msg = (
            "the committed baseline results are the shipped family's; use --full with --models-dir"
        )
        raise RequestError(msg)
    else:
        # Train times stay the build's: every model of it was timed under the same conditions.
        repro.committed = committed = load_committed()

    texts, measured = {}, {}
    for table in (bases_table(), table1(), table2(), icl_table()):
        measured[table.name] = results = repro.table(table)
        texts[table.name] = markdown(table, results) + _committed_note(results, committed)
        write(out_dir, table.name, results_json(results), texts[table.name])
    cost = cost_table(repro.timed(timed_rows()), train_seconds)
    texts["table3"] = cost_markdown(cost)
    write(out_dir, "table3", cost, texts["table3"])

    traces = repro.alpha_traces("math")
    write_json(out_dir / "alpha_math.json", traces)
    runs = traces["traces"].values()
    same_tokens = len({tuple(t["tokens"]) for t in runs}) == 1
    plot_alpha(
        {mode: t["alpha"] for mode, t in traces["traces"].items()},
        out_dir / "alpha_math.png",
        f"alpha per step, math eval question 0, expert from {traces['source']}",
        tokens=traces["traces"]["dynamic"]["tokens"] if same_tokens else None,
    )
    if full:
        rows = {
            row.name: measured[table.name][row.name].scores
            for table in (table1(), table2())
            for row in table.rows
            if row.is_baseline
        }
        baseline_results = {"n": n, "max_new_tokens": max_new_tokens, "rows": rows}
        write_json(out_dir / "baselines.json", baseline_results)
    return texts


def _committed_note(results: dict[str, RowResult], committed: dict | None) -> str:
    if not any(result.committed for result in results.values()):
        return ""
    settings = f"--n {committed['n']} --max-new-tokens {committed['max_new_tokens']}"
    note = (
        f"\n\n(committed): measured by `fusion-llm reproduce --full {settings}` "
        "(the large baselines are not shipped), not in this run."
    )
    if not all(result.comparable for result in results.values()):
        note += " This run used other settings, so gap closed is left out."
    return note
