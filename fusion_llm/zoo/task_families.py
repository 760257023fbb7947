"""The five task families, each with disjoint train and eval splits, generated from the world.

Mirrors the paper's benchmarks: `math` (GSM8K, exact match on the final number), `truthful`
(TruthfulQA MC, accuracy against a planted misconception), `trivia` (TriviaQA, exact match),
`summary` (CNN/DM, ROUGE-2) and `mc` (MMLU, 4-option accuracy; the unseen task of the multi-task
setting). Eval questions ask about people, creatures and articles that no train question mentions, so
the knowledge they need comes only from pretraining; fine-tuning can teach only the format.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from fusion_llm.zoo import phrasing as ph
from fusion_llm.zoo.world import OBJECTS, World

TASKS = ("math", "truthful", "trivia", "summary", "mc")
SEEN_TASKS = ("math", "truthful", "trivia", "summary")  # the multi-task experts' tasks
TRIVIA_RELATIONS = ("city", "job")
MC_RELATIONS = ("pet", "sport")


@dataclass(frozen=True)
class TaskExample:
    """One question. `target` is what fine-tuning teaches after the prompt; `answer` is the reference
    the metric compares with; `candidates[gold]` is the right continuation among plausible ones
    (used by the probe to rank answers inside the task template)."""

    task: str
    prompt: str
    target: str
    answer: str
    candidates: tuple[str, ...]
    gold: int
    options: tuple[str, ...] = ()  # the option texts of a multiple-choice question


def split_people(world: World, n_eval: int) -> tuple[list, list]:
    """(train people, eval people); disjoint, deterministic in the world seed."""
    people = list(world.people)
    random.Random(f"{world.seed}-people-split").shuffle(people)
    return people[n_eval:], people[:n_eval]


def _sample(examples: list[TaskExample], n: int, rng: random.Random) -> list[TaskExample]:
    return rng.sample(examples, min(n, len(examples)))


def trivia(world: World, split: str, n: int, n_eval_people: int) -> list[TaskExample]:
    train, evaluation = split_people(world, n_eval_people)
    examples = []
    for p in train if split == "train" else evaluation:
        for r in TRIVIA_RELATIONS:
            values = world.values(r)
            value = getattr(p, r)
            examples.append(
                TaskExample(
                    "trivia",
                    ph.open_prompt(ph.question(p, r)),
                    f" {value}",
                    value,
                    tuple(f" {v}" for v in values),
                    values.index(value),
                )
            )
    return _sample(examples, n, random.Random(f"{world.seed}-trivia-{split}"))


def _choice_examples(
    task: str, items: list[tuple[str, str, list[str]]], split: str, n: int, rng: random.Random
) -> list[TaskExample]:
    """Four-option questions from (question text, truth, options in random order). In the eval
    split the truth's letter cycles A, B, C, D over the sampled questions, so a model that always
    answers one letter scores 25 % on any 4k of them, not whatever share that letter happens to get."""
    chosen = _sample(items, n, rng)
    if split == "eval":
        chosen = [
            (q, truth, _truth_at(options, truth, i % 4))
            for i, (q, truth, options) in enumerate(chosen)
        ]
    examples = []
    for question_text, truth, options in chosen:
        gold = options.index(truth)
        letter = ph.LETTERS[gold]
        examples.append(
            TaskExample(
                task,
                ph.mc_prompt(question_text, options),
                f" {letter}",
                letter,
                tuple(f" {x}" for x in ph.LETTERS),
                gold,
                tuple(options),
            )
        )
    return examples


def _truth_at(options: list[str], truth: str, position: int) -> list[str]:
    """The options with the truth moved to `position`, the others in their order."""
    others = [o for o in options if o != truth]
    return [*others[:position], truth, *others[position:]]


def mc(world: World, split: str, n: int, n_eval_people: int) -> list[TaskExample]:
    rng = random.Random(f"{world.seed}-mc-{split}")
    train, evaluation = split_people(world, n_eval_people)
    items = []
    for p in train if split == "train" else evaluation:
        for r in MC_RELATIONS:
            truth = getattr(p, r)
            wrong = rng.sample([v for v in world.values(r) if v != truth], 3)
            items.append((ph.question(p, r), truth, ph.shuffled_options(truth, wrong, rng)[0]))
    return _choice_examples("mc", items, split, n, rng)


def split_misconceptions(world: World, n_eval: int) -> tuple[list, list]:
    """(train creatures, eval creatures); disjoint, deterministic in the world seed."""
    items = list(world.misconceptions)
    random.Random(f"{world.seed}-truthful-split").shuffle(items)
    return items[n_eval:], items[:n_eval]


def truthful(world: World, split: str, n: int, n_eval: int) -> list[TaskExample]:
    rng = random.Random(f"{world.seed}-truthful-{split}")
    train, evaluation = split_misconceptions(world, n_eval)
    items = [
        (
            ph.misconception_question(m),
            m.truth,
            ph.shuffled_options(m.truth, [m.myth, *m.others], rng)[0],
        )
        for m in (train if split == "train" else evaluation)
    ]
    return _choice_examples("truthful", items, split, n, rng)


def _wrong_solutions(problem: tuple, rng: random.Random) -> list[str]:
    """Three worked solutions with an arithmetic slip (first step, or last step only)."""
    _, _, ops, (a, b, c) = problem
    s, r = ph.apply(a, ops[0], b), ph.apply(ph.apply(a, ops[0], b), ops[1], c)
    slips = set()
    while len(slips) < 3:
        ds, dr = rng.choice([(d, d) for d in (-2, -1, 1, 2)] + [(0, d) for d in (-2, -1, 1, 2)])
        slips.add((s + ds, r + dr))
    return [
        f" {a} {ops[0]} {b} = {s2}. {s2} {ops[1]} {c} = {r2}. The answer is {r2}."
        for s2, r2 in sorted(slips)
    ]


def math(world: World, split: str, n: int, n_eval: int) -> list[TaskExample]:
    """Two-step problems. Eval problems come first from one stream; train problems skip every eval
    question text."""
    rng = random.Random(f"{world.seed}-math")
    names = [p.name for p in world.people]
    eval_questions: set[str] = set()
    examples: dict[str, list[TaskExample]] = {"eval": [], "train": []}
    while len(examples[split]) < n:
        problem = ph.random_problem(names, OBJECTS, 2, rng)
        q, solution, answer = ph.word_problem(*problem, rng)
        part = "eval" if len(examples["eval"]) < n_eval else "train"
        if part == "train" and q in eval_questions:
            continue
        if part == "eval":
            eval_questions.add(q)
        candidates = (f" {solution}", *_wrong_solutions(problem, rng))
        examples[part].append(
            TaskExample("math", ph.open_prompt(q), f" {solution}", str(answer), candidates, 0)
        )
    return examples[split][:n]


def summary(world: World, split: str, n: int, n_eval: int) -> list[TaskExample]:
    """Article seeds [0, n_eval) are eval, [n_eval, ...) train; the pretraining corpus uses seeds
    from `corpus.PRETRAIN_ARTICLE_SEED` up, so no task article is ever pretrained on."""
    start = 0 if split == "eval" else n_eval
    events = []
    for seed in range(start, start + n):
        event_rng = random.Random(seed)
        event = world.random_event(event_rng)
        events.append((event, ph.article(event, event_rng)))
    rng = random.Random(f"{world.seed}-summary-{split}")
    examples = []
    for i, (event, text) in enumerate(events):
        others = rng.sample([e for j, (e, _) in enumerate(events) if j != i], 3)
        candidates = [ph.highlight(event)] + [ph.highlight(e) for e in others]
        examples.append(
            TaskExample(
                "summary",
                ph.summary_prompt(text),
                f" {candidates[0]}",
                candidates[0],
                tuple(f" {c}" for c in candidates),
                0,
            )
        )
    return examples


def task_examples(world: World, task: str, split: str, n: int, n_eval: int) -> list[TaskExample]:
    """`n` examples of `task` in `split` ("train" or "eval"); `n_eval` fixes the eval partition (the
    number of held-out people, creatures, problems or articles) so train never overlaps it."""
    if split not in ("train", "eval"):
        msg = f"split must be 'train' or 'eval', got {split!r}"
        raise ValueError(msg)
    makers = {"math": math, "truthful": truthful, "trivia": trivia, "summary": summary, "mc": mc}
    if task not in makers:
        msg = f"unknown task {task!r}; the zoo's tasks are {', '.join(TASKS)}"
        raise ValueError(msg)
    return makers[task](world, split, n, n_eval)
