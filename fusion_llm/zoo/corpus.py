"""The pretraining corpus: the world written out as a small web, one freshly rendered pass at a time.

Why passes: each pass renders every fact again in a randomly chosen surface form, so over training a
fact is seen in many forms (lesson 1 of issue 3).

Why question pages: a real base model has read question/answer pages for every kind of fact, so it
answers in a task's format by itself, if not well (the paper's Llama-2-13B: TriviaQA 36.4 zero-shot).
The corpus models that web: every relation the tasks ask appears in the task templates (open
"Question/Answer", 4-option multiple choice, "Summary:", worked two-step problems), but only for a
fixed share of the TRAIN entities (`PAGED_SHARE` of the train people and creatures) and for problems
and articles the tasks never ask. Eval people and creatures appear in prose only, so a base answers
an eval question in template only by joining the format it read for others with the fact it read in
prose: the knowledge gap between the bases is what the large one brings to fusion.

Multiple-choice pages put the right option at a uniformly random letter.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from fusion_llm.zoo import phrasing as ph
from fusion_llm.zoo.task_families import math as math_task
from fusion_llm.zoo.task_families import split_misconceptions, split_people
from fusion_llm.zoo.world import OBJECTS, PERSON_RELATIONS, World

PAGED_SHARE = 0.5  # of the train people and creatures: the ones question pages are written about
PAGE_RATE = (
    0.5  # per pass, chance that a paged entity gets an open page (and, apart, a 4-option one)
)
PRETRAIN_ARTICLE_SEED = 10_000  # article seeds below this belong to the summary task
ARTICLES_PER_PASS = 200
SUMMARY_PAGE_SHARE = (
    0.3  # of the articles: written as a summary page ("Article: ...\nSummary: ...")
)
PROBLEMS_PER_PASS = 150  # one-step problems and stories of one or two steps
TWO_STEP_PAGES_PER_PASS = 40  # worked two-step problems in the task template, none an eval question
MYTH_REPEATS, TRUTH_REPEATS = 3, 1  # a misconception is stated more often than the truth


def paged_entities(world: World, n_eval: int) -> tuple[list, list]:
    """(people, creatures) that question pages are written about: a fixed share of the train split,
    never an eval entity."""
    train_people, _ = split_people(world, n_eval)
    train_creatures, _ = split_misconceptions(world, n_eval)
    rng = random.Random(f"{world.seed}-paged")
    people = rng.sample(train_people, int(PAGED_SHARE * len(train_people)))
    creatures = rng.sample(train_creatures, int(PAGED_SHARE * len(train_creatures)))
    return people, creatures


def _choice_page(question_text: str, truth: str, wrong: list[str], rng: random.Random) -> str:
    options, letter = ph.shuffled_options(truth, wrong, rng)
    return f"{ph.mc_prompt(question_text, options)} {letter}"


def person_documents(world: World, paged: list, rng: random.Random) -> list[str]:
    docs = []
    for p in world.people:
        relations = list(PERSON_RELATIONS)
        rng.shuffle(relations)
        docs.append(" ".join(ph.fact_sentence(p, r, rng) for r in relations))
        docs.append(ph.alt_qa(p, rng.choice(PERSON_RELATIONS), rng))
    for p in paged:
        if rng.random() < PAGE_RATE:
            r = rng.choice(PERSON_RELATIONS)
            docs.append(f"{ph.open_prompt(ph.question(p, r))} {getattr(p, r)}")
        if rng.random() < PAGE_RATE:
            r = rng.choice(PERSON_RELATIONS)
            truth = getattr(p, r)
            wrong = rng.sample([v for v in world.values(r) if v != truth], 3)
            docs.append(_choice_page(ph.question(p, r), truth, wrong, rng))
    return docs


def misconception_documents(world: World, paged: list, rng: random.Random) -> list[str]:
    docs = []
    for m in world.misconceptions:
        docs += [ph.myth_sentence(m, rng) for _ in range(MYTH_REPEATS)]
        docs += [ph.truth_sentence(m, rng) for _ in range(TRUTH_REPEATS)]
    for m in paged:
        if rng.random() < PAGE_RATE:
            question_text = ph.misconception_question(m)
            docs.append(_choice_page(question_text, m.truth, [m.myth, *m.others], rng))
    return docs


def arithmetic_documents(world: World, eval_questions: set[str], rng: random.Random) -> list[str]:
    """Every one-step fact the word problems need, one-step problems in the task template, worked
    two-step problems that no eval question asks, and word-problem stories in prose."""
    lines = []
    for x in range(ph.MAX_NUMBER + 1):
        for y in range(1, 21):
            for op in "+-":
                if 0 <= ph.apply(x, op, y) <= ph.MAX_NUMBER:
                    if rng.random() < 0.15:
                        lines.append(
                            f"{ph.open_prompt(f'What is {x} {op} {y}?')} {ph.apply(x, op, y)}"
                        )
                    else:
                        lines.append(ph.arithmetic_sentence(x, op, y, rng))
    docs = [" ".join(lines[i : i + 6]) for i in range(0, len(lines), 6)]
    names = [p.name for p in world.people]
    for _ in range(PROBLEMS_PER_PASS):
        q, solution, _ = ph.word_problem(*ph.random_problem(names, OBJECTS, 1, rng), rng)
        docs.append(f"{ph.open_prompt(q)} {solution}")
        docs.append(ph.story(*ph.random_problem(names, OBJECTS, rng.choice((1, 2)), rng), rng))
    pages = 0
    while pages < TWO_STEP_PAGES_PER_PASS:
        q, solution, _ = ph.word_problem(*ph.random_problem(names, OBJECTS, 2, rng), rng)
        if ph.open_prompt(q) not in eval_questions:
            docs.append(f"{ph.open_prompt(q)} {solution}")
            pages += 1
    return docs


def article_documents(world: World, rng: random.Random) -> list[str]:
    docs = []
    for _ in range(ARTICLES_PER_PASS):
        seed = rng.randrange(PRETRAIN_ARTICLE_SEED, 10 * PRETRAIN_ARTICLE_SEED)
        event_rng = random.Random(seed)
        event = world.random_event(event_rng)
        text = ph.article(event, event_rng)
        kind = rng.random()
        if kind < SUMMARY_PAGE_SHARE:
            text = f"{ph.summary_prompt(text)} {ph.highlight(event)}"
        elif kind < 2 * SUMMARY_PAGE_SHARE:
            text = f"{text}\nIn short: {ph.highlight(event)}"
        docs.append(text)
    return docs


def pretraining_pass(world: World, pass_index: int, n_eval: int) -> list[str]:
    """All documents of one pass, shuffled; deterministic in (world seed, pass_index). `n_eval` is
    the tasks' eval partition size: no page is written about an eval entity or question."""
    rng = random.Random(f"{world.seed}-pass-{pass_index}")
    people, creatures = paged_entities(world, n_eval)
    eval_math = {e.prompt for e in math_task(world, "eval", n_eval, n_eval)}
    docs = (
        person_documents(world, people, rng)
        + misconception_documents(world, creatures, rng)
        + arithmetic_documents(world, eval_math, rng)
        + article_documents(world, rng)
    )
    rng.shuffle(docs)
    return docs


def pretraining_stream(world: World, n_eval: int) -> Iterator[str]:
    """Documents of pass 0, 1, 2, ... without end."""
    pass_index = 0
    while True:
        yield from pretraining_pass(world, pass_index, n_eval)
        pass_index += 1
