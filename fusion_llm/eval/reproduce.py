"""The paper's tables on the shipped model family: Table 1 (single task), Table 2 (multi-task), the
ICL table (few-shot prompts with and without fusion) and Table 3 (cost), after the bases alone.

Every row reads the same eval prompts (the first `n` of each task) with greedy decoding, stops at the
end of the first line, and is scored on that line. A row's inference time is the wall time of its
`generate` calls only (models are loaded before the clock starts), measured in the same run as the
rows it is compared with.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..core.config import FUSED_MODES
from ..core.errors import RequestError
from ..engine import FusionEngine, FusionPrompt
from ..zoo import MODELS_DIR, read_manifest, zoo_config, zoo_path
from ..zoo.scales import get_scale
from .metrics import score
from .tasks import SEEN_TASKS, TASKS, TaskExample, few_shot_prompt, load_task

SOURCES = ("small", "mid")
ICL_SHOTS = 5


@dataclass(frozen=True)
class Row:
    name: str
    mode: str  # "none": `model` generates alone; otherwise the fusion mode
    model: str = "large"  # zoo model name, "{task}" is filled in (e.g. "small-{task}")
    source: str = "small"  # fusion: the base whose experts are fused
    experts: str = "task"  # fusion: "task" (the question's own expert) or "seen" (all four seen)
    # solved train examples put before the question in the large model's prompt (ICL rows)
    large_shots: int = 0
    group: str | None = None  # rows of one source size; the best of a group is marked
    own_expert: str | None = None  # the expert row a fusion row is compared with

    @property
    def is_baseline(self) -> bool:
        """A large fine-tuned baseline: not shipped, so quick mode reads its committed scores."""
        return self.model.startswith("large-")

    @property
    def setup(self) -> tuple:
        """What the row computes; rows with the same setup share one evaluation."""
        return (self.mode, self.model, self.source, self.experts, self.large_shots)


@dataclass(frozen=True)
class Table:
    name: str  # file stem of the results
    rows: tuple[Row, ...]
    full_ft: str | None = None  # the row that "gap closed" is measured against


@dataclass
class RowResult:
    scores: dict[str, float]  # task -> %, and "avg"
    seconds: float | None = None  # generate wall time over all tasks; None for committed rows
    samples: int = 0
    new_tokens: int = 0
    committed: bool = False  # read from the committed baseline results, not measured in this run
    comparable: bool = True  # False: committed at another n or max_new_tokens than this run's


def bases_table() -> Table:
    """Each base alone, zero-shot in the task templates: what the family's bases bring before any
    fine-tuning (the large one is the paper's "large base" row)."""
    rows = (Row("small base", "none", model="small"), Row("mid base", "none", model="mid"))
    return Table("bases", (*rows, Row("large base", "none")))


def table1() -> Table:
    """Single task: each question fuses its own task's expert (full fine-tunes of each source)."""
    rows = [
        Row("large base", "none"),
        Row("large full FT", "none", model="large-{task}"),
        Row("large LoRA", "none", model="large-{task}-lora"),
    ]
    for source in SOURCES:
        expert = f"{source} expert"
        rows.append(Row(expert, "none", model=f"{source}-{{task}}", group=source))
        rows += [
            Row(f"{mode} from {source}", mode, source=source, group=source, own_expert=expert)
            for mode in FUSED_MODES
        ]
    return Table("table1", tuple(rows), full_ft="large full FT")


def table2() -> Table:
    """Multi-task: the four seen experts are active for every question (`mc` is unseen)."""
    rows = [Row("large base", "none"), Row("large multi-task FT", "none", model="large-multi")]
    for source in SOURCES:
        multi = f"{source} multi-task FT"
        rows.append(Row(multi, "none", model=f"{source}-multi", group=source))
        rows += [
            Row(
                f"{mode}, 4 {source} experts",
                mode,
                source=source,
                experts="seen",
                group=source,
                own_expert=multi,
            )  # fmt: skip
            for mode in ("paper", "dynamic")
        ]
    return Table("table2", tuple(rows), full_ft="large multi-task FT")


def icl_table() -> Table:
    """In-context learning: few-shot demonstrations in the large model's prompt, alone and fused
    (the small base and its expert keep the zero-shot prompt)."""
    rows = [
        Row("large base", "none"),
        Row(f"large {ICL_SHOTS}-shot", "none", large_shots=ICL_SHOTS),
    ]
    for source in SOURCES:
        fused = Row(f"dynamic from {source}", "dynamic", source=source, group=source)
        rows += [
            fused,
            replace(fused, name=f"{fused.name} + {ICL_SHOTS}-shot", large_shots=ICL_SHOTS),
        ]
    return Table("icl", tuple(rows))


class Reproduction:
    """Evaluates rows on a built zoo, once per distinct setup, with one engine per distinct config.

    Set `baselines` ({"large-math": folder, "large-math-lora": ..., "large-multi": ...}, folders the
    engine loads as its large model) to evaluate the large baselines, or `committed` (the committed
    results file) to read their rows from it (quick mode).
    """

    def __init__(
        self, n: int = 50, max_new_tokens: int = 48, models_dir: Path = MODELS_DIR, log=print
    ):
        manifest = read_manifest(Path(models_dir))
        self.scale, self.seed = manifest["scale"], manifest["seed"]
        available = get_scale(self.scale).n_eval
        if not 1 <= n <= available or max_new_tokens < 1:
            msg = f"n must be in 1..{available} (eval questions per task) and max_new_tokens >= 1"
            raise RequestError(msg)
        self.n, self.max_new_tokens = n, max_new_tokens
        self.models_dir = Path(models_dir)
        self.baselines: dict[str, Path] | None = None
        self.committed: dict | None = None
        self.log = log
        self._examples = {t: load_task(t, "eval", n, self.scale, self.seed) for t in TASKS}
        self._engines: dict[str, FusionEngine] = {}
        self._results: dict[tuple, RowResult] = {}

    def table(self, table: Table) -> dict[str, RowResult]:
        return {row.name: self.row(row) for row in table.rows}

    def row(self, row: Row) -> RowResult:
        if row.setup not in self._results:
            if row.is_baseline and self.baselines is None:
                result = self._committed_row(row)
            else:
                result = self._evaluate(row)
            self._results[row.setup] = result
            self.log(f"{row.name}: " + " ".join(f"{t} {v:.1f}" for t, v in result.scores.items()))
        return self._results[row.setup]

    def engine(self, config: dict) -> FusionEngine:
        key = json.dumps(config, sort_keys=True)
        if key not in self._engines:
            self._engines[key] = FusionEngine(config).load()
        return self._engines[key]

    def config(self, row: Row, task: str) -> tuple[dict, list[str]]:
        """The engine config and the experts to fuse for one row and task."""
        if row.mode == "none":
            large = self._model_path(row.model.format(task=task))
            small = self._model_path("small")
            return {"large": {"path": str(large)}, "small": {"path": str(small)}}, []
        experts = [task] if row.experts == "task" else list(SEEN_TASKS)
        return self.fusion_config(experts, row.source), experts

    def fusion_config(self, experts: list[str], source: str) -> dict:
        """The large base fused with the full fine-tunes of `source` for `experts`. The mode is
        chosen per request, so the rows of every mode share one engine."""
        return zoo_config(experts, source, "full", models_dir=self.models_dir)

    def alpha_traces(self, task: str = "math", source: str = "small", index: int = 0) -> dict:
        """The per-step alpha of the `paper` grid and the `dynamic` solver on one eval question,
        fusing that task's expert from `source` (the data of the paper's Fig. 3)."""
        example = self._examples[task][index]
        traces = {}
        engine = self.engine(self.fusion_config([task], source))
        for mode in ("paper", "dynamic"):
            (generation,) = engine.generate(
                [example.prompt],
                experts=[task],
                mode=mode,
                max_new_tokens=self.max_new_tokens,
                stop=["\n"],
            )
            traces[mode] = {
                "alpha": [step[0] for step in generation.alpha],
                "tokens": [engine.tokenizer.decode([i]) for i in generation.token_ids],
                "text": generation.text,
            }
        question = {"task": task, "source": source, "prompt": example.prompt}
        return {**question, "answer": example.answer, "traces": traces}

    def _model_path(self, name: str) -> Path:
        if self.baselines is not None and name in self.baselines:
            return self.baselines[name]
        return zoo_path(name, self.models_dir)

    def _prompt(self, example: TaskExample, row: Row) -> FusionPrompt:
        large = None
        if row.large_shots:
            large = few_shot_prompt(example, row.large_shots, self.scale, self.seed)
        return FusionPrompt(example.prompt, large=large)

    def _evaluate(self, row: Row, per_task: int | None = None) -> RowResult:
        """Scores and wall time of `row` on the first `per_task` (default: all n) questions of
        every task."""
        result = RowResult(scores={}, seconds=0.0)
        for task in TASKS:
            examples = self._examples[task][:per_task]
            generations, seconds = self._generate(row, task, examples)
            result.seconds += seconds
            result.samples += len(examples)
            result.new_tokens += sum(g.completion_tokens for g in generations)
            total = sum(
                score(task, g.text, e.answer) for g, e in zip(generations, examples, strict=True)
            )
            result.scores[task] = 100 * total / len(examples)
        result.scores["avg"] = sum(result.scores[t] for t in TASKS) / len(TASKS)
        return result

    def timed(self, rows: list[Row], per_task: int = 20, rounds: int = 3) -> dict[str, RowResult]:
        """Inference time of each row on the first `per_task` questions of every task: the rows are
        interleaved within each round so that drifting machine load hits them alike, and each
        row's time is its median over the rounds (greedy: every round generates the same)."""
        runs = {row.name: [] for row in rows}
        for round_ in range(rounds):
            self.log(f"table 3 timing: round {round_ + 1} of {rounds}, {len(rows)} rows")
            for row in rows:
                runs[row.name].append(self._evaluate(row, per_task))
        timed = {}
        for name, results in runs.items():
            timed[name] = results[0]
            timed[name].seconds = statistics.median(r.seconds for r in results)
        return timed

    def _generate(self, row: Row, task: str, examples: list[TaskExample]) -> tuple[list, float]:
        """The row's generations for `examples` of `task` and their wall time (models loaded)."""
        config, experts = self.config(row, task)
        engine = self.engine(config)
        start = time.perf_counter()
        generations = engine.generate(
            [self._prompt(e, row) for e in examples],
            experts=experts,
            mode=row.mode,
            max_new_tokens=self.max_new_tokens,
            stop=["\n"],
            truncate_prompt=True,  # a few-shot prompt over the context keeps its last shots
        )
        return generations, time.perf_counter() - start

    def _committed_row(self, row: Row) -> RowResult:
        committed = self.committed or {}
        if row.name not in committed.get("rows", {}):
            msg = f"no committed result for {row.name!r}; run `fusion-llm reproduce --full`"
            raise RequestError(msg)
        same_settings = (committed["n"], committed["max_new_tokens"]) == (
            self.n,
            self.max_new_tokens,
        )
        return RowResult(
            scores=committed["rows"][row.name], committed=True, comparable=same_settings
        )


def gap_closed(method: float, base: float, full_ft: float) -> float | None:
    """(method - base) / (full FT - base), the share of fine-tuning's gain that a method recovers."""
    return None if abs(full_ft - base) < 1e-9 else (method - base) / (full_ft - base)


def markdown(table: Table, results: dict[str, RowResult], columns: list[str] | None = None) -> str:
    """The table with the best value of each column within a source size in bold, and a dagger
    where a fusion row beats its own expert; a "gap closed" column when the table has a full FT
    (left empty when that row was committed at other settings than this run's). `columns`: the
    score keys shown (default: the zoo's tasks and their average)."""
    columns = columns or [*TASKS, "avg"]
    header = ["row", *columns] + (["gap closed"] if table.full_ft else [])
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    best = {
        (row.group, c): max(results[r.name].scores[c] for r in table.rows if r.group == row.group)
        for row in table.rows
        if row.group
        for c in columns
    }
    for row in table.rows:
        scores = results[row.name].scores
        cells = [row.name + (" (committed)" if results[row.name].committed else "")]
        for c in columns:
            cell = f"{scores[c]:.1f}"
            if row.own_expert and scores[c] > results[row.own_expert].scores[c]:
                cell += "†"
            if row.group and scores[c] == best[(row.group, c)]:
                cell = f"**{cell}**"
            cells.append(cell)
        if table.full_ft:
            full_ft = results[table.full_ft]
            gap = gap_closed(
                scores["avg"], results["large base"].scores["avg"], full_ft.scores["avg"]
            )
            shown = full_ft.comparable and results[row.name].comparable
            shown = shown and gap is not None and row.name not in ("large base", table.full_ft)
            cells.append(f"{100 * gap:.1f} %" if shown else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(out_dir: Path, name: str, data: dict, text: str) -> None:
    """`name`.json and `name`.md under `out_dir`."""
    write_json(out_dir / f"{name}.json", data)
    (out_dir / f"{name}.md").write_text(text + "\n")


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def results_json(results: dict[str, RowResult]) -> dict:
    return {name: asdict(result) for name, result in results.items()}
