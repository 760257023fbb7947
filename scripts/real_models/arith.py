"""Task arith's data: word problems of two to four operations, with a worked one-line solution."""

from __future__ import annotations

import operator
import random
from dataclasses import dataclass

ARITH_QUESTION = "Question: {question}\nAnswer:"
NAMES = ("Maya", "Omar", "Lena", "Theo", "Priya", "Jonas", "Aiko", "Sam", "Nadia", "Leo")
OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}
TIMES = {2: "doubles", 3: "triples", 4: "quadruples"}
PARTS = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth"}
# Sentences for "*" and "/" fit every scene: they speak of the unit, not of who holds it.
SCALE_SENTENCES = {
    "*": (
        "Then the number of {unit} {times}.",
        "A week later there are {k} times as many {unit} as before.",
    ),
    "/": (
        "Then the {unit} are split into {k} equal groups, and only one group is kept.",
        "After that, only {part} of the {unit} remain.",
    ),
}


@dataclass(frozen=True)
class Scene:
    """A setting of a word problem: who holds the quantity (`{name}`: a random person), its unit,
    how an amount is written, and sentences for the start, for "+" and "-", and the question."""

    who: str
    unit: str
    amount: str
    start: tuple[str, ...]
    more: tuple[str, ...]
    less: tuple[str, ...]
    question: tuple[str, ...]


SCENES = (
    Scene(
        "{name}",
        "stickers",
        "{n} stickers",
        start=("{who} has {amount}.", "{who} starts the week with {amount}."),
        more=("{who} buys {amount} more.", "A friend gives {who} {amount}."),
        less=("{who} puts {amount} on a poster.", "{who} gives {amount} to a cousin."),
        question=(
            "How many stickers does {who} have now?",
            "How many stickers does {who} end with?",
        ),
    ),
    Scene(
        "{name}",
        "dollars",
        "${n}",
        start=("{who} has {amount} in a piggy bank.", "{who} has saved {amount}."),
        more=("{who} earns {amount} walking dogs.", "{who} gets {amount} as a birthday present."),
        less=("{who} spends {amount} on a book.", "{who} pays {amount} for a concert ticket."),
        question=("How many dollars does {who} have now?", "How much money, in dollars, is left?"),
    ),
    Scene(
        "the tank",
        "liters",
        "{n} liters of water",
        start=("A tank holds {amount}.", "At dawn the tank contains {amount}."),
        more=("A hose adds {amount} to the tank.", "Rain adds {amount} to the tank."),
        less=("{amount} leak out of the tank.", "The garden is watered with {amount} from it."),
        question=("How many liters of water are in the tank now?", "How many liters are left?"),
    ),
    Scene(
        "the library",
        "books",
        "{n} books",
        start=("The school library has {amount}.", "A small library owns {amount}."),
        more=("The library receives {amount} as a gift.", "The library buys {amount}."),
        less=("The library lends out {amount}.", "{amount} are too worn and are recycled."),
        question=(
            "How many books does the library have now?",
            "How many books are on the shelves?",
        ),
    ),
    Scene(
        "the bakery",
        "muffins",
        "{n} muffins",
        start=("A bakery bakes {amount} in the morning.", "The bakery has {amount} on display."),
        more=("The bakers make {amount} more.", "Another {amount} come out of the oven."),
        less=("The bakery sells {amount}.", "{amount} are given to a school."),
        question=("How many muffins does the bakery have now?", "How many muffins are left?"),
    ),
    Scene(
        "the farmer",
        "chickens",
        "{n} chickens",
        start=("A farmer keeps {amount}.", "There are {amount} on a farm."),
        more=("The farmer buys {amount} at the market.", "{amount} hatch in spring."),
        less=("The farmer sells {amount}.", "A fox takes {amount}."),
        question=(
            "How many chickens are on the farm now?",
            "How many chickens does the farmer have?",
        ),
    ),
    Scene(
        "the warehouse",
        "boxes",
        "{n} boxes",
        start=("A warehouse stores {amount}.", "On Monday the warehouse holds {amount}."),
        more=("A truck delivers {amount}.", "The warehouse takes in {amount}."),
        less=("{amount} are shipped to stores.", "The warehouse sends out {amount}."),
        question=("How many boxes are in the warehouse now?", "How many boxes remain?"),
    ),
    Scene(
        "{name}",
        "marbles",
        "{n} marbles",
        start=("{who} owns {amount}.", "{who} keeps {amount} in a jar."),
        more=("{who} wins {amount} in a game.", "{who} finds {amount} under the sofa."),
        less=("{who} loses {amount} in a game.", "{who} trades away {amount}."),
        question=("How many marbles does {who} have now?", "How many marbles are in the jar now?"),
    ),
)


@dataclass(frozen=True)
class ArithProblem:
    """A word problem: `start`, then each (operation, number) of `steps` applied in order."""

    question: str
    start: int
    steps: tuple[tuple[str, int], ...]
    answer: int

    def solution(self) -> str:
        """One equation per step, then the answer: `12 + 5 = 17. 17 * 3 = 51. The answer is 51.`"""
        total, equations = self.start, []
        for op, number in self.steps:
            result = OPERATIONS[op](total, number)
            equations.append(f"{total} {op} {number} = {result}.")
            total = result
        return " ".join([*equations, f"The answer is {self.answer}."])


def arith_problem(rng: random.Random) -> ArithProblem:
    """Two to four operations on one quantity, each phrased in the scene's words; every
    intermediate total is a whole number of at least 2 (divisions are exact)."""
    scene = rng.choice(SCENES)
    who = scene.who.format(name=rng.choice(NAMES))
    total = start = rng.randint(6, 60)
    sentences = [rng.choice(scene.start).format(who=who, amount=scene.amount.format(n=start))]
    steps = []
    for _ in range(rng.randint(2, 4)):
        op, number = _next_step(rng, total)
        steps.append((op, number))
        total = OPERATIONS[op](total, number)
        sentences.append(_sentence(rng, scene, who, op, number))
    sentences.append(rng.choice(scene.question).format(who=who))
    question = " ".join(s[0].upper() + s[1:] for s in sentences)
    return ArithProblem(question, start, tuple(steps), total)


def _next_step(rng: random.Random, total: int) -> tuple[str, int]:
    """An operation that keeps the total a whole number of at least 2 and below about 1000."""
    choices = [("+", rng.randint(2, 40))]
    if total >= 4:
        choices.append(("-", rng.randint(2, total - 2)))
    if total <= 120:
        choices.append(("*", rng.choice(tuple(TIMES))))
    divisors = [k for k in PARTS if total % k == 0 and total // k >= 2]
    if divisors:
        choices.append(("/", rng.choice(divisors)))
    return rng.choice(choices)


def _sentence(rng: random.Random, scene: Scene, who: str, op: str, number: int) -> str:
    if op in SCALE_SENTENCES:
        template = rng.choice(SCALE_SENTENCES[op])
        return template.format(
            unit=scene.unit, k=number, times=TIMES.get(number), part=PARTS.get(number)
        )
    template = rng.choice(scene.more if op == "+" else scene.less)
    return template.format(who=who, amount=scene.amount.format(n=number))


def arith_row(rng: random.Random) -> dict:
    """A prompt in pyout's format and, as completion, the worked solution on ONE line.

    Why a worked solution and not the bare number: a 0.5B model gets one operation on two visible
    numbers right far more often than two to four chained in its head, and the expert's LoRA only
    has to learn a fixed pattern (equation, period, ..., "The answer is N."), which a few hundred
    rows teach; the bare number would ask the LoRA to learn the arithmetic itself. One line,
    because eval stops at the newline and the `number` metric reads the final number of the first
    line. The price is longer answers (up to about 60 tokens), so eval and training cost more."""
    problem = arith_problem(rng)
    return {
        "prompt": ARITH_QUESTION.format(question=problem.question),
        "completion": " " + problem.solution(),
        "question": problem.question,
        "start": problem.start,
        "steps": [list(s) for s in problem.steps],
        "answer": problem.answer,
    }
