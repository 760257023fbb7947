"""`fusion-llm demo`: what fusion does on the shipped model family, scored, at a glance.

For every task, one slice of held-out eval questions is answered three ways, each slice in ONE
batched `generate` call per row: the large base alone, the small expert alone, and the large base
fused with that expert. Every answer is scored with the task's metric (`fusion_llm.eval.metrics`,
as `fusion-llm reproduce` scores it); the report gives the scores, which row wins each task, a few
questions in full with every row's answer, and the alpha the solver chose.
"""

from __future__ import annotations

import textwrap
import time
from dataclasses import asdict, dataclass, field

from ..core.errors import ModelNotFoundError, RequestError
from ..core.text import token_texts
from ..engine import FusionEngine, Generation
from ..zoo import DEFAULT_EXPERT_KIND, ZooNotBuiltError, zoo_config, zoo_info
from .metrics import METRIC_NAMES, first_line, score
from .tasks import TASKS, TaskExample, load_task

ROWS = ("large", "expert", "fused")
WIDTH = 100  # wrap long questions and answers at word boundaries, never inside a word


@dataclass
class Answer:
    text: str  # the first line: what the metric reads
    score: float  # the task's metric in [0, 1]


@dataclass
class Example:
    question: str  # the prompt without its final "Answer:" / "Summary:" line
    reference: str
    answers: dict[str, Answer]  # row -> answer
    alpha: list[float] = field(default_factory=list)  # the fused row's alpha per generated token
    tokens: list[str] = field(default_factory=list)  # the fused row's generated tokens


@dataclass
class TaskReport:
    task: str
    metric: str
    scores: dict[str, float]  # row -> mean metric over the slice, in %
    alpha: dict[str, float]  # mean / min / max of the fused row's alpha over all its tokens
    examples: list[Example]

    @property
    def winners(self) -> list[str]:
        """The rows with the best score (several on a tie)."""
        best = max(self.scores.values())
        return [row for row in ROWS if self.scores[row] == best]

    @property
    def transfer(self) -> bool:
        """Weak-to-strong transfer: fused scores above both the large base and the expert."""
        return self.scores["fused"] > max(self.scores["large"], self.scores["expert"])


@dataclass
class DemoReport:
    source: str  # the small base the experts were fine-tuned from ("small" or "mid")
    kind: str  # the experts: "lora" adapters or "full" fine-tunes
    mode: str
    n: int  # eval questions per task
    eval_size: int  # eval questions the split has per task
    max_new_tokens: int
    params: dict[str, int]  # model name -> parameter count
    tasks: list[TaskReport]
    seconds: float = 0.0  # wall time of loading and generating

    def to_json(self) -> dict:
        data = asdict(self)
        for task, entry in zip(self.tasks, data["tasks"], strict=True):
            entry.update(winners=task.winners, transfer=task.transfer)
        return data


def run_demo(
    tasks: list[str] | None = None,
    source: str = "small",
    kind: str | None = None,
    mode: str = "dynamic",
    n: int = 50,
    examples: int = 2,
    max_new_tokens: int = 48,
) -> DemoReport:
    """Score the large base, each task's expert (`kind`: "lora" or "full"; default: the zoo's, LoRA
    on small) and their fusion on the first `n` eval questions of every task, and keep the first
    `examples` questions of each with all three answers."""
    tasks = _checked(tasks, source, n, examples)
    kind = kind or DEFAULT_EXPERT_KIND[source]
    start = time.perf_counter()
    try:
        params = {r["name"]: r["params"] for r in zoo_info()}
        config = zoo_config(tasks, source, kind, mode)
        fused = FusionEngine(config).load()
        # The expert alone, LoRA adapters included: with the source base in the large model's
        # place, static alpha = 1 samples from log Q + (log Q_t - log Q) = log Q_t, the expert.
        alone = FusionEngine({**config, "large": config["small"]}).load()
    except (ZooNotBuiltError, KeyError) as err:
        msg = f"the shipped model family is missing ({err}); run `fusion-llm zoo build`"
        raise ModelNotFoundError(msg) from None
    settings = {"max_new_tokens": max_new_tokens, "stop": ["\n"]}
    reports = []
    for task in tasks:
        questions = load_task(task, "eval", n)
        prompts = [q.prompt for q in questions]
        generations = {
            "large": fused.generate(prompts, experts=[], mode="none", **settings),
            "expert": alone.generate(prompts, experts=[task], mode="static", **settings),
            "fused": fused.generate(prompts, experts=[task], mode=mode, **settings),
        }
        reports.append(_task_report(task, questions, generations, fused, examples))
    return DemoReport(
        source=source,
        kind=kind,
        mode=mode,
        n=n,
        eval_size=len(load_task(TASKS[0], "eval")),
        max_new_tokens=max_new_tokens,
        params={name: params[name] for name in ("large", source)},
        tasks=reports,
        seconds=time.perf_counter() - start,
    )


def _checked(tasks: list[str] | None, source: str, n: int, examples: int) -> list[str]:
    tasks = list(TASKS) if not tasks else list(dict.fromkeys(tasks))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        msg = f"unknown task(s) {', '.join(unknown)}; the demo's tasks are {', '.join(TASKS)}"
        raise RequestError(msg)
    if source not in DEFAULT_EXPERT_KIND:
        msg = f"source must be one of {', '.join(DEFAULT_EXPERT_KIND)}, got {source!r}"
        raise RequestError(msg)
    available = len(load_task(TASKS[0], "eval"))
    if not 1 <= n <= available or not 0 <= examples <= n:
        msg = f"n must be in 1..{available} (eval questions per task) and examples in 0..n"
        raise RequestError(msg)
    return tasks


def _task_report(
    task: str,
    questions: list[TaskExample],
    generations: dict[str, list[Generation]],
    engine: FusionEngine,
    examples: int,
) -> TaskReport:
    answers = {
        row: [Answer(first_line(g.text), score(task, g.text, q.answer))
              for g, q in zip(gens, questions, strict=True)]
        for row, gens in generations.items()
    }  # fmt: skip
    alpha = [step[0] for g in generations["fused"] for step in g.alpha]
    shown = []
    for i, question in enumerate(questions[:examples]):
        fused = generations["fused"][i]
        shown.append(
            Example(
                question=question.prompt.rsplit("\n", 1)[0],
                reference=question.answer,
                answers={row: answers[row][i] for row in ROWS},
                alpha=[step[0] for step in fused.alpha],
                tokens=token_texts(engine.tokenizer, fused.token_ids),
            )
        )
    return TaskReport(
        task=task,
        metric=METRIC_NAMES[task],
        scores={row: 100 * sum(a.score for a in answers[row]) / len(questions) for row in ROWS},
        alpha={"mean": sum(alpha) / len(alpha), "min": min(alpha), "max": max(alpha)}
        if alpha
        else {},
        examples=shown,
    )


# -- the text report -----------------------------------------------------------------------------
def render(report: DemoReport, trace: bool = False) -> str:
    """Header and legend, the score table with the winner of each task, the verdict, the examples
    (with the fused row's token-by-token alpha when `trace`) and the alpha summary."""
    lines = _header(report) + [""] + _score_table(report) + [""] + _verdict(report)
    for task in report.tasks:
        if task.examples:
            lines += ["", f"== {task.task} ({task.metric}) " + "=" * 40]
        for example in task.examples:
            lines += _example(task.task, example, trace)
    lines += ["", "alpha chosen per generated token (fused rows, whole slice):"]
    lines += [
        f"  {t.task:<9} mean {t.alpha['mean']:.2f}, min {t.alpha['min']:.2f}, max {t.alpha['max']:.2f}"
        for t in report.tasks
        if t.alpha
    ]
    answers = len(ROWS) * report.n * len(report.tasks)
    lines += ["", f"{answers} answers in {report.seconds:.1f} s (models loaded and generated)."]
    return "\n".join(lines)


def _header(report: DemoReport) -> list[str]:
    large, small = (report.params[name] / 1e6 for name in ("large", report.source))
    solver = {
        "dynamic": "alpha solved per token (dynamic)",
        "paper": "alpha solved per token (the paper's grid)",
        "static": "alpha fixed at 1 (proxy-tuning)",
        "none": "no fusion (large alone)",
    }[report.mode]
    return [
        "fusion-llm demo: dynamic logit fusion on the shipped toy model family",
        f"greedy decoding, the first {report.n} held-out eval questions of each task, "
        f"at most {report.max_new_tokens} new tokens",
        "",
        f"  large   the large base alone ({large:.1f} M params), never fine-tuned",
        f"  expert  the {report.source} base ({small:.1f} M params) with the task's "
        + ("LoRA adapter, alone" if report.kind == "lora" else "full fine-tune, alone"),
        f"  fused   the large base decoded with that expert's logit shift, {solver}",
    ]


def _score_table(report: DemoReport) -> list[str]:
    lines = [
        "score in % of the slice (ROUGE-2 F1 for summary); best: the winning row(s)",
        f"  {'task':<9} {'metric':<9} {'large':>6} {'expert':>7} {'fused':>6}   best",
    ]
    for t in report.tasks:
        s = t.scores
        best = " = ".join(t.winners) if len(t.winners) < len(ROWS) else "all tied"
        lines.append(
            f"  {t.task:<9} {t.metric:<9} {s['large']:>6.1f} {s['expert']:>7.1f} {s['fused']:>6.1f}   {best}"
        )
    mean = {row: sum(t.scores[row] for t in report.tasks) / len(report.tasks) for row in ROWS}
    lines.append(
        f"  {'average':<19} {mean['large']:>6.1f} {mean['expert']:>7.1f} {mean['fused']:>6.1f}"
    )
    return lines


def _verdict(report: DemoReport) -> list[str]:
    """What the numbers say, computed from them: where fusion beats both rows, where it lifts the
    large base, and where the expert alone is at least as good."""
    transfer = [t.task for t in report.tasks if t.transfer]
    lifted = [t.task for t in report.tasks if t.scores["fused"] > t.scores["large"]]
    expert_wins = [t.task for t in report.tasks if t.scores["expert"] >= t.scores["fused"]]
    lines = [
        "weak-to-strong transfer (fused above both the large base and the expert): "
        + (", ".join(transfer) if transfer else "on no task of this slice"),
        "fused above the large base alone: " + (", ".join(lifted) or "on no task"),
    ]
    if expert_wins:
        lines.append("the expert alone does at least as well as fused: " + ", ".join(expert_wins))
    lines.append(
        f"(one question moves a score by {100 / report.n:.1f} points: --n {report.eval_size} "
        "scores the whole eval split; the paper's tables on this family: docs/reproduction.md)"
    )
    return lines


def _example(task: str, example: Example, trace: bool) -> list[str]:
    lines = [_wrapped(line, "  ", "      ") for line in example.question.splitlines()]
    lines.append(f"  reference: {example.reference}")
    for row in ROWS:
        answer = example.answers[row]
        mark = f"ROUGE-2 {answer.score:.2f}" if task == "summary" else _right(answer.score)
        lines.append(_wrapped(f"{row:<7} {mark:<12} {answer.text or '(empty)'}", "  ", " " * 23))
    if trace and example.tokens:
        steps = [f"{tok!r} {a:.2f}" for tok, a in zip(example.tokens, example.alpha, strict=True)]
        lines += _packed(["fused token by token (token alpha):", *steps], "  ", "    ")
    return lines


def _packed(items: list[str], first: str, rest: str) -> list[str]:
    """`items` on lines of at most WIDTH characters, never splitting one (tokens hold spaces)."""
    lines = [first + items[0]]
    for item in items[1:]:
        if len(lines[-1]) + 2 + len(item) > WIDTH:
            lines.append(rest + item)
        else:
            lines[-1] += "  " + item
    return lines


def _right(value: float) -> str:
    return "right" if value == 1.0 else "wrong"


def _wrapped(text: str, first: str, rest: str) -> str:
    return textwrap.fill(
        text, WIDTH, initial_indent=first, subsequent_indent=rest, break_long_words=False
    )
