"""The pretraining corpus: the world written out as prose, one freshly rendered pass at a time.

Why passes: each pass renders every fact again in a randomly chosen surface form, so over training a
fact is seen in many forms (lesson 1 of issue 3). The task templates ("Question: ...\\nAnswer:", the
4-option form, "Summary:") occur here, but only for relations and kinds of question the tasks do NOT
ask (lessons 2 and 4):
- open "Question/Answer": pet, sport, food, colour, arithmetic and one-step word problems (`trivia`
  asks city and job, `math` two-step problems);
- 4-option multiple choice: food and colour only (`mc` asks pet and sport, `truthful` creatures;
  city and job questions appear in no template, so trivia's questions are not primed for a letter);
- "Summary:" for person profiles (the `summary` task summarises articles).
Articles used here are drawn from a seed range disjoint from the summary task's articles.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from fusion_llm.zoo import phrasing as ph
from fusion_llm.zoo.world import OBJECTS, PERSON_RELATIONS, World

OPEN_QA_RELATIONS = ("pet", "sport", "food", "color")
MC_RELATIONS = ("food", "color")
PRETRAIN_ARTICLE_SEED = 10_000  # article seeds below this belong to the summary task
ARTICLES_PER_PASS = 300
PROBLEMS_PER_PASS = 150  # one-step problems and stories of one or two steps
MYTH_REPEATS, TRUTH_REPEATS = 3, 1  # a misconception is stated more often than the truth


def person_documents(world: World, rng: random.Random) -> list[str]:
    docs = []
    for p in world.people:
        relations = list(PERSON_RELATIONS)
        rng.shuffle(relations)
        docs.append(" ".join(ph.fact_sentence(p, r, rng) for r in relations))
        docs.append(ph.alt_qa(p, rng.choice(PERSON_RELATIONS), rng))
        r = rng.choice(OPEN_QA_RELATIONS)
        docs.append(f"{ph.open_prompt(ph.question(p, r))} {getattr(p, r)}")
        r = rng.choice(MC_RELATIONS)
        truth = getattr(p, r)
        wrong = rng.sample([v for v in world.values(r) if v != truth], 3)
        options, letter = ph.shuffled_options(truth, wrong, rng)
        docs.append(f"{ph.mc_prompt(ph.question(p, r), options)} {letter}")
        if rng.random() < 0.2:
            docs.append(
                f"Summary: {p.name} is {ph.a_an(p.job)} from {p.city} who keeps {ph.a_an(p.pet)}."
            )
    return docs


def misconception_documents(world: World, rng: random.Random) -> list[str]:
    docs = []
    for m in world.misconceptions:
        docs += [ph.myth_sentence(m, rng) for _ in range(MYTH_REPEATS)]
        docs += [ph.truth_sentence(m, rng) for _ in range(TRUTH_REPEATS)]
    return docs


def arithmetic_documents(world: World, rng: random.Random) -> list[str]:
    """Every one-step fact the word problems need, one-step problems in the task template, and
    word-problem stories in prose (the vocabulary of the math task, lesson 2)."""
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
    return docs


def article_documents(world: World, rng: random.Random) -> list[str]:
    docs = []
    for _ in range(ARTICLES_PER_PASS):
        seed = rng.randrange(PRETRAIN_ARTICLE_SEED, 10 * PRETRAIN_ARTICLE_SEED)
        event_rng = random.Random(seed)
        event = world.random_event(event_rng)
        text = ph.article(event, event_rng)
        if rng.random() < 0.5:
            text = f"Article: {text}\nIn short: {ph.highlight(event)}"
        docs.append(text)
    return docs


def pretraining_pass(world: World, pass_index: int) -> list[str]:
    """All documents of one pass, shuffled; deterministic in (world seed, pass_index)."""
    rng = random.Random(f"{world.seed}-pass-{pass_index}")
    docs = (
        person_documents(world, rng)
        + misconception_documents(world, rng)
        + arithmetic_documents(world, rng)
        + article_documents(world, rng)
    )
    rng.shuffle(docs)
    return docs


def pretraining_stream(world: World) -> Iterator[str]:
    """Documents of pass 0, 1, 2, ... without end."""
    pass_index = 0
    while True:
        yield from pretraining_pass(world, pass_index)
        pass_index += 1
