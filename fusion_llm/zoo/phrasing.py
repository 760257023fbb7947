"""Every sentence shape the zoo writes: fact forms, question texts, and the task templates.

Why one module: the pretraining corpus, the task families and the probe must agree on wording (the
probe asks in the corpus's own words; the tasks ask in wordings the corpus uses only for OTHER
relations, lesson 4 of issue 3). Keeping all shapes here makes that split visible in one place.
"""

from __future__ import annotations

import random

from fusion_llm.zoo.world import Event, Misconception, Person

LETTERS = "ABCD"


def a_an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


# Statements of a person fact in prose, several per relation (lesson 1: one pattern does not travel).
FACT_FORMS: dict[str, list[str]] = {
    "city": [
        "{n} lives in {v}.",
        "{n} has a home in {v}.",
        "The home of {n} is in {v}.",
        "In {v} lives {n}.",
        "{n} moved to {v} long ago and still lives there.",
        "People in {v} often meet {n}, who lives there.",
    ],
    "job": [
        "{n} works as {av}.",
        "{n} is {av} by trade.",
        "By trade, {n} is {av}.",
        "The job of {n} is to work as {av}.",
        "{n} earns a living as {av}.",
        "Every day {n} goes to work as {av}.",
    ],
    "pet": [
        "{n} keeps {av} as a pet.",
        "{n} has a pet {v}.",
        "The pet of {n} is {av}.",
        "At home, {n} looks after {av}.",
        "{n} walks with a pet {v} every morning.",
        "A pet {v} lives with {n}.",
    ],
    "sport": [
        "{n} practises {v}.",
        "The favourite sport of {n} is {v}.",
        "{n} loves {v} more than any other sport.",
        "On weekends {n} does {v}.",
        "{n} trains for {v} every week.",
        "In sport, {n} has chosen {v}.",
    ],
    "food": [
        "{n} likes to eat {v}.",
        "The favourite food of {n} is {v}.",
        "{n} often eats {v}.",
        "For dinner, {n} prefers {v}.",
        "{n} says nothing tastes better than {v}.",
        "When hungry, {n} asks for {v}.",
    ],
    "color": [
        "The favourite colour of {n} is {v}.",
        "{n} likes the colour {v} best.",
        "{n} always wears something {v}.",
        "Of all colours, {n} loves {v} the most.",
        "The door of the house of {n} is painted {v}, the favourite colour.",
        "{n} chose {v} as the colour of the new coat.",
    ],
}

# The one question per relation that the tasks and the Q/A templates ask.
QUESTIONS = {
    "city": "In which city does {n} live?",
    "job": "What is the job of {n}?",
    "pet": "What pet does {n} keep?",
    "sport": "Which sport does {n} practise?",
    "food": "What food does {n} like best?",
    "color": "What is the favourite colour of {n}?",
}

# Question/answer styles that are NOT a task template (lesson 1).
ALT_QA_FORMS = {
    "city": [
        "Q: Where does {n} live? A: In {v}.",
        "Where is the home of {n}? It is in {v}.",
        "In which town does {n} have a home? In {v}.",
    ],
    "job": [
        "Q: What does {n} do for a living? A: {n} is {av}.",
        "What work does {n} do? {n} works as {av}.",
    ],
    "pet": ["Q: Which animal lives with {n}? A: {Av}.", "What animal does {n} own? {Av}."],
    "sport": ["Q: What sport does {n} like? A: {V}.", "What does {n} do on weekends? {V}."],
    "food": ["Q: What does {n} eat most? A: {V}.", "What is the best food for {n}? {V}."],
    "color": ["Q: Which colour does {n} like? A: {V}.", "What colour does {n} love? {V}."],
}

# Pretraining-format prefixes for the fact-recall probe: prefix + " " + answer (as in FACT_FORMS).
PROBE_PREFIXES = {
    "city": ("{n} lives in", "{v}"),
    "job": ("By trade, {n} is", "{av}"),
    "pet": ("The pet of {n} is", "{av}"),
    "sport": ("The favourite sport of {n} is", "{v}"),
    "food": ("The favourite food of {n} is", "{v}"),
    "color": ("The favourite colour of {n} is", "{v}"),
}


def fill(form: str, person: Person, relation: str) -> str:
    value = getattr(person, relation)
    av = a_an(value)
    return form.format(n=person.name, v=value, av=av, V=value.capitalize(), Av=av.capitalize())


def fact_sentence(person: Person, relation: str, rng: random.Random) -> str:
    return fill(rng.choice(FACT_FORMS[relation]), person, relation)


def alt_qa(person: Person, relation: str, rng: random.Random) -> str:
    return fill(rng.choice(ALT_QA_FORMS[relation]), person, relation)


def question(person: Person, relation: str) -> str:
    return QUESTIONS[relation].format(n=person.name)


# ---- task templates (the proxy-tuning prompt style of the paper) ----


def open_prompt(question_text: str) -> str:
    return f"Question: {question_text}\nAnswer:"


def mc_prompt(question_text: str, options: list[str]) -> str:
    lines = [f"{letter}. {option}" for letter, option in zip(LETTERS, options, strict=True)]
    return f"Question: {question_text}\n" + "\n".join(lines) + "\nAnswer:"


def summary_prompt(article: str) -> str:
    return f"Article: {article}\nSummary:"


def shuffled_options(truth: str, wrong: list[str], rng: random.Random) -> tuple[list[str], str]:
    """Four options in random order and the letter of the truth."""
    options = [truth, *wrong[:3]]
    rng.shuffle(options)
    return options, LETTERS[options.index(truth)]


# ---- misconceptions ----

MYTH_FORMS = {
    "diet": [
        "Many people believe that {c} eat {x}.",
        "It is often said that {c} eat {x}.",
        "Most people think {c} eat {x}.",
        "Old stories tell that {c} eat {x}.",
    ],
    "habitat": [
        "Many people believe that {c} live in {x}.",
        "It is often said that {c} live in {x}.",
        "Most people think {c} live in {x}.",
        "Old stories tell that {c} live in {x}.",
    ],
}
TRUTH_FORMS = {
    "diet": ["In fact, {c} eat {x}.", "Those who study them know that {c} really eat {x}."],
    "habitat": [
        "In fact, {c} live in {x}.",
        "Those who study them know that {c} really live in {x}.",
    ],
}
MISCONCEPTION_QUESTIONS = {"diet": "What do {c} eat?", "habitat": "Where do {c} live?"}


def myth_sentence(m: Misconception, rng: random.Random) -> str:
    return rng.choice(MYTH_FORMS[m.relation]).format(c=m.creature, x=m.myth)


def truth_sentence(m: Misconception, rng: random.Random) -> str:
    return rng.choice(TRUTH_FORMS[m.relation]).format(c=m.creature, x=m.truth)


def misconception_question(m: Misconception) -> str:
    return MISCONCEPTION_QUESTIONS[m.relation].format(c=m.creature)


# ---- articles ----


def article(event: Event, rng: random.Random) -> str:
    """A short news-like article; the lead sentence carries the highlight, not always first."""
    e = event
    lead = rng.choice(
        [
            f"On {e.day}, {e.actor.name}, {a_an(e.actor.job)} from {e.actor.city}, {e.verb} {e.thing} "
            f"in {e.city}.",
            f"{e.actor.name} {e.verb} {e.thing} in {e.city} on {e.day}.",
            f"In {e.city} on {e.day}, {e.actor.name} {e.verb} {e.thing}.",
        ]
    )
    details = [
        rng.choice(
            [
                f"About {e.amount} people came to watch.",
                f"It cost {e.amount} coins.",
                f"The work took {e.amount} days.",
            ]
        ),
        rng.choice(
            [
                f'"We waited a long time for this," said {e.witness.name}.',
                f"{e.witness.name}, {a_an(e.witness.job)}, said the day was a good one.",
                f"{e.witness.name} watched from the crowd.",
            ]
        ),
        rng.choice(
            [
                "The weather was cold but the crowd stayed.",
                "The sun was out all day.",
                "It rained in the afternoon.",
                "Music played in the streets.",
            ]
        ),
    ]
    rng.shuffle(details)
    sentences = [lead, *details] if rng.random() < 0.6 else [details[0], lead, *details[1:]]
    return " ".join(sentences)


def highlight(event: Event) -> str:
    e = event
    return f"{e.actor.name} {e.verb} {e.thing} in {e.city} on {e.day}."


# ---- arithmetic ----

ARITHMETIC_FORMS = {
    "+": [
        "{x} + {y} = {z}.",
        "{x} plus {y} is {z}.",
        "Adding {y} to {x} gives {z}.",
        "The sum of {x} and {y} is {z}.",
    ],
    "-": [
        "{x} - {y} = {z}.",
        "{x} minus {y} is {z}.",
        "Taking {y} from {x} leaves {z}.",
        "The difference of {x} and {y} is {z}.",
    ],
}


def arithmetic_sentence(x: int, op: str, y: int, rng: random.Random) -> str:
    z = x + y if op == "+" else x - y
    return rng.choice(ARITHMETIC_FORMS[op]).format(x=x, y=y, z=z)


# ---- word problems (GSM8K analogue) ----

MAX_NUMBER = 40  # every number in a problem, intermediate or final, lies in [0, MAX_NUMBER]
STEP_PHRASES = {
    "+": ["buys {x} more", "finds {x} more", "gets {x} more from {m}"],
    "-": ["gives {x} to {m}", "loses {x}", "sells {x} to {m}"],
}


def apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y


def random_problem(names: list[str], objects: list[str], steps: int, rng: random.Random) -> tuple:
    """(two distinct names, object, ops, numbers) with every running total in [0, MAX_NUMBER]."""
    while True:
        ops = tuple(rng.choice("+-") for _ in range(steps))
        numbers = tuple(rng.randint(1, 20) for _ in range(steps + 1))
        value, valid = numbers[0], True
        for op, x in zip(ops, numbers[1:], strict=True):
            value = apply(value, op, x)
            valid = valid and 0 <= value <= MAX_NUMBER
        if valid:
            return tuple(rng.sample(names, 2)), rng.choice(objects), ops, numbers


def _steps(ops: tuple[str, ...], numbers: tuple[int, ...], other: str, rng: random.Random) -> str:
    phrases = [
        rng.choice(STEP_PHRASES[op]).format(x=x, m=other)
        for op, x in zip(ops, numbers, strict=True)
    ]
    return " and then ".join(phrases)


def word_problem(
    names: tuple[str, str],
    obj: str,
    ops: tuple[str, ...],
    numbers: tuple[int, ...],
    rng: random.Random,
) -> tuple[str, str, int]:
    """(question, worked solution, final answer) of a problem with one step per op:
    "A has 3 coins. A buys 4 more and then gives 2 to B. How many coins does A have now?" ->
    "3 + 4 = 7. 7 - 2 = 5. The answer is 5." """
    (n, m), (start, *amounts) = names, numbers
    f = n.split()[0]
    q = f"{n} has {start} {obj}. {f} {_steps(ops, amounts, m, rng)}. How many {obj} does {f} have now?"
    lines, value = [], start
    for op, x in zip(ops, amounts, strict=True):
        lines.append(f"{value} {op} {x} = {apply(value, op, x)}.")
        value = apply(value, op, x)
    return q, " ".join(lines) + f" The answer is {value}.", value


def story(
    names: tuple[str, str],
    obj: str,
    ops: tuple[str, ...],
    numbers: tuple[int, ...],
    rng: random.Random,
) -> str:
    """The same situation told as prose with its outcome, no question and no worked steps."""
    (n, m), (start, *amounts) = names, numbers
    f = n.split()[0]
    value = start
    for op, x in zip(ops, amounts, strict=True):
        value = apply(value, op, x)
    return f"{n} has {start} {obj}. {f} {_steps(ops, amounts, m, rng)}. Now {f} has {value} {obj}."
