"""`fusion-llm eval`: the paper's comparison on your own data.

Rows, each one batched engine run over the data: the large model alone, each expert alone (a LoRA
expert merged into the small base for the run), the experts fused with static alpha (each expert's
configured `alpha`, 1.0 by default: proxy-tuning), the paper's grid and the dynamic solver, and with
`shots` k solved rows of `shots_from` in the large model's prompt (the large model alone and fused).
Greedy decoding; each prediction is scored against the row's reference (the completion, or the last
assistant message) with one of the reproduction's metrics. Writes eval.md (the reproduction's table
code), eval.json (scores, predictions, the experts' gate verdicts) and alpha.png (alpha per step on
the first row, the reproduction's figure code).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..core.config import FUSED_MODES, FusionConfig, ModelSpec
from ..core.errors import RequestError, UnknownExpertError
from ..engine import FusionEngine, FusionPrompt, Generation
from ..experts.data import Record, read_jsonl
from ..routing.card import verdict
from ..runtime.models import is_lora_adapter
from .baselines import merge_lora
from .figure import plot_alpha
from .metrics import choice_accuracy, exact_match, number_match, rouge2
from .reproduce import Row, RowResult, Table, markdown, results_json, write

METRICS: dict[str, Callable[[str, str], float]] = {
    "exact": exact_match,
    "number": number_match,
    "rouge2": rouge2,
    "choice": choice_accuracy,
}


@dataclass
class EvalReport:
    markdown: str
    results: dict[str, RowResult]
    predictions: dict[str, list[str]]


def evaluate(
    config: FusionConfig | dict | str | Path,
    data: str | Path,
    metric: str,
    experts: Sequence[str] | None = None,
    shots: int = 0,
    shots_from: str | Path | None = None,
    n: int | None = None,
    max_new_tokens: int = 48,
    stop: Sequence[str] = ("\n",),
    batch_size: int = 32,
    out_dir: str | Path | None = None,
) -> EvalReport:
    """Score every row of the comparison on `data` (JSONL); write the report under `out_dir`."""
    if metric not in METRICS:
        raise RequestError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if shots < 0 or batch_size < 1 or (n is not None and n < 1):
        msg = f"shots must be >= 0, batch_size and n >= 1; got {shots}, {batch_size} and {n}"
        raise RequestError(msg)
    if shots and shots_from is None:
        raise RequestError("--shots needs --shots-from: a JSONL file the demonstrations come from")
    engine = FusionEngine(config)
    names = _experts(engine, experts)
    records = read_jsonl(data)[:n]
    demos = read_jsonl(shots_from)[:shots] if shots else []
    prompts = [_prompt(engine, r) for r in records]
    references = [r.reference.strip() for r in records]
    rows = _rows(names, shots)
    predictions: dict[str, list[str]] = {}
    results: dict[str, RowResult] = {}
    traces: dict[str, list[float]] = {}
    settings = {"max_new_tokens": max_new_tokens, "stop": list(stop)}
    with (
        tempfile.TemporaryDirectory() as merged,
        tqdm(total=len(rows) * -(-len(prompts) // batch_size), desc="eval", mininterval=1) as bar,
    ):
        alone = {name: _expert_engine(engine.config, name, Path(merged)) for name in names}
        for row in rows:
            runner = alone.get(row.model, engine)
            shown = (
                [_with_shots(engine, p, r, demos) for p, r in zip(prompts, records, strict=True)]
                if row.large_shots
                else prompts
            )
            runner.load()  # loading is not decoding: a row's seconds time its generation alone
            start = time.perf_counter()
            generations = _run(runner, shown, row, names, settings, batch_size, bar.update)
            seconds = time.perf_counter() - start
            texts = [g.text for g in generations]
            score = sum(METRICS[metric](t, ref) for t, ref in zip(texts, references, strict=True))
            results[row.name] = RowResult(
                scores={metric: 100 * score / len(records)},
                seconds=seconds,
                samples=len(records),
                new_tokens=sum(g.completion_tokens for g in generations),
            )
            predictions[row.name] = texts
            if row.mode in ("paper", "dynamic") and not row.large_shots:
                traces[row.mode] = [step[0] for step in generations[0].alpha]
    table = Table("eval", tuple(rows))
    text = markdown(table, results, columns=[metric])
    if out_dir is not None:
        out_dir = Path(out_dir)
        report = {
            "data": str(data),
            "metric": metric,
            "rows": len(records),
            "experts": names,
            "shots": shots,
            "results": results_json(results),
            "verdicts": {name: verdict(_spec(engine, name), engine.config.large) for name in names},
            "predictions": predictions,
            "references": references,
        }
        write(out_dir, "eval", report, text)
        if traces:
            plot_alpha(traces, out_dir / "alpha.png", f"alpha per step, first row, {names[0]}")
    return EvalReport(text, results, predictions)


def _run(
    engine: FusionEngine,
    prompts: list[FusionPrompt],
    row: Row,
    names: list[str],
    settings: dict[str, Any],
    batch_size: int,
    advance: Callable[[int], Any],
) -> list[Generation]:
    """One row's generations, `batch_size` prompts per engine call."""
    generations: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        generations += engine.generate(
            prompts[start : start + batch_size],
            experts=names if row.mode in FUSED_MODES else [],
            mode=row.mode,
            truncate_prompt=True,  # a k-shot prompt over the context keeps its last shots
            **settings,
        )
        advance(1)
    return generations


def _rows(names: list[str], shots: int) -> list[Row]:
    """The comparison's rows; with one expert, fusion rows are compared with it (the dagger)."""
    own = f"{names[0]} alone" if len(names) == 1 else None
    rows = [Row("large alone", "none", group="all")]
    rows += [Row(f"{name} alone", "none", model=name, group="all") for name in names]
    rows += [Row(mode, mode, group="all", own_expert=own) for mode in FUSED_MODES]
    if shots:
        rows += [
            Row(f"large alone {shots}-shot", "none", large_shots=shots, group="all"),
            Row(f"dynamic {shots}-shot", "dynamic", large_shots=shots, group="all", own_expert=own),
        ]
    return rows


def _experts(engine: FusionEngine, experts: Sequence[str] | None) -> list[str]:
    names = list(experts) if experts is not None else list(engine.expert_names)
    unknown = [n for n in names if n not in engine.expert_names]
    if unknown:
        known = ", ".join(engine.expert_names) or "none configured"
        raise UnknownExpertError(f"unknown expert(s) {', '.join(unknown)}; configured: {known}")
    if not names:
        raise RequestError(
            "eval compares fusion with the large model: configure at least one expert"
        )
    return names


def _spec(engine: FusionEngine, name: str):
    return next(e for e in engine.config.experts if e.name == name)


def _expert_engine(config: FusionConfig, name: str, merged: Path) -> FusionEngine:
    """An engine whose large model is the expert itself (a LoRA merged into the small base)."""
    spec = next(e for e in config.experts if e.name == name)
    fields = spec.model_dump(include=set(ModelSpec.model_fields))
    if is_lora_adapter(spec):
        folder = merge_lora(Path(spec.path), config.small.path, merged / name, half=False)
        fields.update(path=str(folder), tokenizer=None, revision=None)
    return FusionEngine({"large": fields, "small": config.small.model_dump()})


def _prompt(engine: FusionEngine, record: Record) -> FusionPrompt:
    if record.messages:
        return engine.render_chat(list(record.messages[:-1]))
    return FusionPrompt(record.prompt)  # type: ignore[arg-type]


def _with_shots(
    engine: FusionEngine, prompt: FusionPrompt, record: Record, demos: list[Record]
) -> FusionPrompt:
    """The prompt with the demonstrations in front, for the large model only."""
    if record.messages:
        turns: list[dict[str, Any]] = [m for d in demos for m in _as_messages(d)]
        large = engine.render_chat([*turns, *record.messages[:-1]]).large
    else:
        large = "".join(f"{_demo_prompt(d)}{_demo_answer(d)}\n\n" for d in demos) + prompt.text
    return replace(prompt, large=large)


def _as_messages(demo: Record) -> list[dict[str, str]]:
    if demo.messages:
        return list(demo.messages)
    return [
        {"role": "user", "content": demo.prompt},
        {"role": "assistant", "content": demo.completion},
    ]


def _demo_prompt(demo: Record) -> str:
    return demo.prompt if demo.messages is None else demo.messages[-2]["content"]


def _demo_answer(demo: Record) -> str:
    return demo.completion if demo.messages is None else " " + demo.messages[-1]["content"]
