"""Step `report`: CACHE/report.md from the steps' results: scores, paired differences, costs, the
decision, the agent and lm-eval tables, timings and every prediction."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from agent import AGENT_MAX_TOKENS, AGENT_MODELS, AGENT_RECURSION_LIMIT, AGENT_SYSTEM
from bookkeeping import done_stamp, read_json, read_jsonl
from lmeval import LMEVAL_EXPERT, LMEVAL_ROWS, LMEVAL_TASK
from stats import COST_TIE, RESAMPLES, bootstrap, decide, paired_difference, pairwise
from tasks import TASKS

FUSED_MODES = ("static", "paper", "dynamic")


def question_scores(result: Mapping, metric: Callable[[str, str], float]) -> dict[str, list[float]]:
    """Per-question scores in % of each row of an eval.json, by `metric` (eval's own)."""
    references = result["references"]
    return {
        row: [100 * metric(p, r) for p, r in zip(predictions, references, strict=True)]
        for row, predictions in result["predictions"].items()
    }


def token_costs(results: Mapping) -> dict[str, float]:
    """Milliseconds per generated token of each row: its generate wall time over its new tokens."""
    return {row: 1000 * r["seconds"] / max(r["new_tokens"], 1) for row, r in results.items()}


def mode_costs(results_by_task: Mapping[str, Mapping]) -> dict[str, float]:
    """Each fused mode's cost per generated token relative to the large model alone, averaged over
    tasks (a ratio, so a task with longer answers does not weigh more)."""
    ratios: dict[str, list[float]] = {mode: [] for mode in FUSED_MODES}
    for results in results_by_task.values():
        costs = token_costs(results)
        for mode in FUSED_MODES:
            ratios[mode].append(costs[mode] / costs["large alone"])
    return {mode: sum(r) / len(r) for mode, r in ratios.items()}


def comparisons(task: str) -> list[tuple[str, str]]:
    """The paired differences the report shows: each fused mode against the expert alone and the
    large model alone, and the fused modes against each other."""
    pairs = [(mode, f"{task} alone") for mode in FUSED_MODES]
    pairs += [(mode, "large alone") for mode in FUSED_MODES]
    return [*pairs, ("dynamic", "static"), ("dynamic", "paper"), ("paper", "static")]


def step_report(args: argparse.Namespace) -> None:
    from fusion_llm.eval.user_eval import METRICS

    cache = args.cache
    evaluated = {
        task: read_json(cache / "eval" / task / "eval.json")
        for task in TASKS
        if (cache / "eval" / task / "eval.json").is_file()
    }
    scores = {}
    for task, result in evaluated.items():
        scores[task] = question_scores(result, METRICS[TASKS[task].metric])
        _check_scores(task, scores[task], result)
    lines = [
        "# fusion-llm on real models: the evaluation of the fusion modes\n",
        f"Made by `python scripts/real_models all --cache {cache}`; this file is "
        f"{cache / 'report.md'}. Intervals: 95 % percentile bootstrap over questions, "
        f"{RESAMPLES} resamples, seed 0; differences are paired (the same resampled questions).\n",
        f"- Machine: {os.cpu_count()} cores; wall times and load averages in the last sections.",
        *_split_lines(cache),
    ]
    lines += _decision_lines(scores, evaluated)
    for task, result in evaluated.items():
        lines += _task_lines(cache, task, scores[task], result)
    lines += _agent_lines(cache)
    lines += _lmeval_lines(cache)
    lines += _timing_lines(cache)
    for task, result in evaluated.items():
        lines += _prediction_lines(task, scores[task], result)
    (cache / "report.md").write_text("\n".join(lines) + "\n")
    print(f"written {cache / 'report.md'}", flush=True)


def _split_lines(cache: Path) -> list[str]:
    lines = []
    for task in TASKS:
        stamp = done_stamp(cache, f"data {task}")
        if stamp:
            sizes = ", ".join(f"{split} {size}" for split, size in stamp["sizes"].items())
            lines.append(f"- Data, {task}: {sizes} rows (seed {stamp['seed']}), no prompt in two.")
    return lines


def _check_scores(task: str, scores: Mapping[str, list[float]], result: Mapping) -> None:
    """The recomputed per-question scores must average to eval's own: same metric, same data."""
    for row, values in scores.items():
        stored = result["results"][row]["scores"][result["metric"]]
        if abs(sum(values) / len(values) - stored) > 1e-6:
            raise SystemExit(f"{task} {row}: recomputed {sum(values) / len(values)} != {stored}")


def _decision_lines(scores: Mapping, evaluated: Mapping) -> list[str]:
    lines = ["\n## Decision\n"]
    if set(evaluated) != set(TASKS):
        missing = ", ".join(sorted(set(TASKS) - set(evaluated)))
        return [*lines, f"Not decided: no eval results for {missing}."]
    costs = mode_costs({task: result["results"] for task, result in evaluated.items()})
    differences = {task: pairwise(scores[task], FUSED_MODES) for task in evaluated}
    _, sentence = decide(costs, differences)
    cheapest_first = sorted(costs.items(), key=lambda item: item[1])
    cost_text = ", ".join(f"{mode} {cost:.2f}x" for mode, cost in cheapest_first)
    return [
        *lines,
        "Rule: the default is the cheapest fused mode whose paired difference against every other "
        "fused mode has a 95 % interval that does not lie entirely below zero on either task. "
        "Cost: milliseconds per generated token relative to the large model alone, mean over "
        f"tasks ({cost_text}); costs within {100 * COST_TIE:.0f} % of each other tie, and a tie "
        "goes to the mode with less work per step (static, then paper, then dynamic: the same "
        "forwards, then no solve, a grid, or the grid's scan and Newton steps).\n",
        f"**Decision**: {sentence}.",
    ]


def _task_lines(cache: Path, task: str, scores: Mapping, result: Mapping) -> list[str]:
    lines = [
        f"\n## {task}: {TASKS[task].description}\n",
        f"{result['rows']} eval questions, metric `{result['metric']}`, greedy.\n",
        f"| row | {result['metric']} (%) [95 % interval] |",
        "|---|---|",
    ]
    lines += [f"| {row} | {bootstrap(values)} |" for row, values in scores.items()]
    lines += [
        "\nPaired differences (percentage points) [95 % interval]:\n",
        "| difference | estimate |",
        "|---|---|",
    ]
    for a, b in comparisons(task):
        lines.append(f"| {a} - {b} | {paired_difference(scores[a], scores[b])} |")
    lines += [
        "\nCost, from the same run: each row's generate wall time over its generated tokens "
        "(model loading excluded):\n",
        "| row | seconds | new tokens | ms per token | x large alone |",
        "|---|---|---|---|---|",
    ]
    costs = token_costs(result["results"])
    for row, entry in result["results"].items():
        ratio = costs[row] / costs["large alone"]
        lines.append(
            f"| {row} | {entry['seconds']:.1f} | {entry['new_tokens']} | {costs[row]:.1f} | "
            f"{ratio:.2f} |"
        )
    card = cache / "experts" / task / "fusion_expert.json"
    verdicts = read_json(card).get("verdicts", {}) if card.is_file() else {}
    lines += ["\nGate verdict:\n", "```json", json.dumps(verdicts, indent=2), "```"]
    return lines


def _agent_lines(cache: Path) -> list[str]:
    lines = ["\n## Agent: calculator tool under create_agent, arith problems\n"]
    results = cache / "agent/results.json"
    if not results.is_file():
        return [*lines, "Not run."]
    runs = read_json(results)["runs"]
    lines += [
        "Tool choice of the first turn `auto` or `forced` (naming the calculator), `auto` after "
        "it. Parsed: no tool-call block left unparsed in any reply. Correct: the final reply's "
        "last number equals the reference, and the final reply is not a tool call the parser "
        f"could not read. System prompt: `{AGENT_SYSTEM}`; greedy, at most "
        f"{AGENT_MAX_TOKENS} new tokens a turn and {AGENT_RECURSION_LIMIT} graph steps a run. "
        "A row's runs are decoded concurrently, batched by the engine, so a run's seconds include "
        "its neighbours' steps.\n",
        "| row | first call | runs | runs parsed | mean calls | tool errors | run errors | "
        "correct (%) [95 % interval] | mean seconds a run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted(runs, key=_agent_order)
    groups: dict[tuple[str, str], list[dict]] = {}
    for key in keys:
        model, choice, _ = key.split("|")
        groups.setdefault((model, choice), []).append(runs[key])
    for (model, choice), group in groups.items():
        correct = bootstrap([100.0 * r["correct"] for r in group])
        lines.append(
            f"| {model} | {choice} | {len(group)} | {sum(r['parsed'] for r in group)} | "
            f"{sum(r['calls'] for r in group) / len(group):.1f} | "
            f"{sum(r['tool_errors'] for r in group)} | {sum(bool(r['error']) for r in group)} | "
            f"{correct} | {sum(r['seconds'] for r in group) / len(group):.0f} |"
        )
    lines += [
        "\nEvery run: its first tool call and what the tool returned, and the final reply (✓ "
        "correct; calls in parentheses, run errors after it):\n",
        "| run | first call | tool returned | final reply |",
        "|---|---|---|---|",
    ]
    for key in keys:
        run = runs[key]
        call, returned = _first_call(run["transcript"])
        mark = " ✓" if run["correct"] else ""
        error = f" **{run['error']}**" if run["error"] else ""
        call, returned = (f"`{_cell(text)}`" if text else "-" for text in (call, returned))
        lines.append(
            f"| {_cell(key)} | {call} | {returned} | "
            f"`{_cell(run['final'])}`{mark} ({run['calls']}){_cell(error)} |"
        )
    return lines


def _agent_order(key: str) -> tuple[int, str, int]:
    """Runs by row (in AGENT_MODELS order), first-call choice, then problem."""
    model, choice, problem = key.split("|")
    rank = AGENT_MODELS.index(model) if model in AGENT_MODELS else len(AGENT_MODELS)
    return rank, choice, int(problem)


def _first_call(transcript: list[dict]) -> tuple[str, str]:
    """(the first tool call's arguments as JSON, the tool's reply to it); empty without a call."""
    calls = [m for m in transcript if m.get("tool_calls")]
    if not calls:
        return "", ""
    replies = [m["text"] for m in transcript if m["type"] == "tool"]
    arguments = json.dumps(calls[0]["tool_calls"][0]["args"])
    return arguments, replies[0] if replies else ""


def _lmeval_lines(cache: Path) -> list[str]:
    lines = [f"\n## lm-eval: `{LMEVAL_TASK}` (4 options, log-likelihood)\n"]
    results = cache / "lmeval/results.json"
    if not results.is_file():
        return [*lines, "Not run."]
    rows = read_json(results)["rows"]
    lines += [
        "Each question: a pyout eval snippet; the wrong options are what the same snippet prints "
        "with one number changed. Run by `lm_eval.simple_evaluate` over `FusionLM`; fused rows: "
        f"the {LMEVAL_EXPERT} expert in the row's mode.\n",
        "| row | questions | acc (%) [95 % interval] | lm-eval stderr | acc_norm | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        accuracy = bootstrap([100 * a for a in row["per_question"]])
        lines.append(
            f"| {name} | {len(row['per_question'])} | {accuracy} | {100 * row['acc_stderr']:.1f} | "
            f"{100 * row['acc_norm']:.1f} | {row['seconds']:.0f} |"
        )
    scores = {name: [100 * a for a in row["per_question"]] for name, row in rows.items()}
    pairs = [(fused, "large alone") for fused, _, mode in LMEVAL_ROWS if mode != "none"]
    differences = [
        f"- {a} - {b}: {paired_difference(scores[a], scores[b])}"
        for a, b in [*pairs, ("dynamic", "static")]
        if a in scores and b in scores
    ]
    if differences:
        lines += ["\nPaired differences (percentage points) [95 % interval]:\n", *differences]
    return lines + _lmeval_prediction_lines(cache, rows)


def _lmeval_prediction_lines(cache: Path, rows: Mapping) -> list[str]:
    """Every question: the right option and the one each row chose (its likeliest)."""
    chosen = {name: row["chosen"] for name, row in rows.items() if "chosen" in row}
    if not chosen:
        return []
    questions = read_jsonl(cache / "lmeval" / f"{LMEVAL_TASK}.jsonl")
    lines = [
        "\nEvery question: the right option and the option each row chose (✓ right):\n",
        "| # | right option | " + " | ".join(chosen) + " |",
        "|---" * (len(chosen) + 2) + "|",
    ]
    for i, question in enumerate(questions):
        cells = [
            f"`{_cell(question['choices'][picks[i]])}`"
            + (" ✓" if picks[i] == question["answer"] else "")
            for picks in chosen.values()
        ]
        right = _cell(question["choices"][question["answer"]])
        lines.append(f"| {i} | `{right}` | " + " | ".join(cells) + " |")
    return lines


def _timing_lines(cache: Path) -> list[str]:
    lines = ["\n## Commands, wall times and load\n"]
    timings_file = cache / "logs/timings.json"
    if not timings_file.is_file():
        return [*lines, "No step has run."]
    lines += [
        "The 1-minute load average at the start, mean of the samples (one a minute), max, and at "
        "the end.\n",
        "| step | wall time | load start / mean / max / end | finished |",
        "|---|---|---|---|",
    ]
    timings = read_json(timings_file)
    for key, entry in timings.items():
        load = entry["load"]
        lines.append(
            f"| {key} | {entry['seconds'] / 60:.1f} min | {load['start']:.1f} / {load['mean']:.1f}"
            f" / {load['max']:.1f} / {load['end']:.1f} | {entry['finished']} |"
        )
    lines.append("")
    lines += [f"- {key}: `{entry['command']}`" for key, entry in timings.items()]
    return lines


def _prediction_lines(task: str, scores: Mapping, result: Mapping) -> list[str]:
    rows = list(result["predictions"])
    lines = [
        f"\n## Predictions, {task} (every eval row; ✓ scored right)\n",
        "| # | reference | " + " | ".join(rows) + " |",
        "|---" * (len(rows) + 2) + "|",
    ]
    for i, reference in enumerate(result["references"]):
        cells = [
            f"`{_cell(result['predictions'][row][i])}`" + (" ✓" if scores[row][i] else "")
            for row in rows
        ]
        lines.append(f"| {i} | {_cell(reference)} | " + " | ".join(cells) + " |")
    return lines


def _cell(text: str) -> str:
    return text.strip().replace("|", "\\|").replace("\n", " ").replace("`", "'")
