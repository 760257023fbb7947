"""The seeded synthetic world the zoo's models learn about.

Why a synthetic world: no corpus can be downloaded here, and a world we generate ourselves lets the
tasks ask about facts that occur ONLY in the pretraining text, so that knowledge must come from
pretraining and answer format from fine-tuning (the situation the paper's method exploits).

The world holds
- people with six attributes (home city, job, pet, sport, food, colour), named by syllables so that a
  subword tokenizer splits every name and knowledge has to live in the network, not in one embedding
  row per person;
- creatures about which a popular misconception exists (stated more often than the truth);
- news-like events (an actor does something somewhere), the raw material of the articles.
Everything derives from one integer seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kl",
    "st",
    "sh",
    "th",
    "tr",
]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
CODAS = ["", "", "", "n", "r", "l", "s", "m"]

JOBS = [
    "baker",
    "pilot",
    "farmer",
    "doctor",
    "teacher",
    "painter",
    "sailor",
    "miner",
    "tailor",
    "singer",
    "nurse",
    "judge",
    "cook",
    "potter",
    "weaver",
    "hunter",
    "fisher",
    "builder",
    "driver",
    "writer",
    "dancer",
    "guard",
    "clerk",
    "smith",
    "brewer",
    "mason",
    "barber",
    "jeweler",
    "gardener",
    "librarian",
]
PETS = [
    "cat",
    "dog",
    "owl",
    "ferret",
    "parrot",
    "rabbit",
    "goat",
    "turtle",
    "lizard",
    "hamster",
    "pony",
    "crow",
    "frog",
    "mouse",
    "snake",
    "duck",
    "goose",
    "pig",
    "hedgehog",
    "canary",
]
SPORTS = [
    "tennis",
    "rowing",
    "fencing",
    "archery",
    "boxing",
    "cycling",
    "skiing",
    "rugby",
    "hockey",
    "golf",
    "judo",
    "karate",
    "polo",
    "cricket",
    "sailing",
    "diving",
    "climbing",
    "running",
    "swimming",
    "wrestling",
]
FOODS = [
    "soup",
    "bread",
    "rice",
    "cheese",
    "fish",
    "plums",
    "honey",
    "beans",
    "noodles",
    "apples",
    "pears",
    "lentils",
    "dumplings",
    "olives",
    "figs",
    "oats",
    "eggs",
    "mushrooms",
    "carrots",
    "pie",
]
COLORS = [
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "orange",
    "black",
    "white",
    "grey",
    "pink",
    "brown",
    "gold",
]
# What a creature is said to eat or where it lives: misconception and truth come from these lists.
DIETS = [
    "moss",
    "stones",
    "berries",
    "worms",
    "leaves",
    "sand",
    "fish",
    "seeds",
    "bark",
    "snow",
    "grass",
    "insects",
    "roots",
    "salt",
    "nuts",
    "clay",
]
HABITATS = [
    "the forest",
    "the desert",
    "the river",
    "the mountains",
    "the swamp",
    "the caves",
    "the sea",
    "the plains",
    "the ice",
    "the hills",
]
ACTIONS = [
    ("opened", "a new bridge"),
    ("opened", "a school"),
    ("won", "the city race"),
    ("built", "a tower"),
    ("sold", "a famous painting"),
    ("found", "an old coin"),
    ("repaired", "the town clock"),
    ("planted", "a large garden"),
    ("closed", "the market"),
    ("visited", "the harbour"),
    ("painted", "the town hall"),
    ("launched", "a new boat"),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
OBJECTS = [
    "apples",
    "coins",
    "books",
    "stamps",
    "marbles",
    "shells",
    "pencils",
    "cards",
    "eggs",
    "candles",
]


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    job: str
    pet: str
    sport: str
    food: str
    color: str

    @property
    def first(self) -> str:
        return self.name.split()[0]


@dataclass(frozen=True)
class Misconception:
    """A creature, one attribute of it, the truth and the popular false belief."""

    creature: str  # plural noun, e.g. "vorns"
    relation: str  # "diet" or "habitat"
    truth: str
    myth: str
    others: tuple[str, str]  # two further wrong values, used as distractors


@dataclass(frozen=True)
class Event:
    actor: Person
    verb: str
    thing: str
    city: str
    day: str
    amount: int
    witness: Person


@dataclass
class World:
    seed: int
    cities: list[str]
    people: list[Person]
    misconceptions: list[Misconception]

    def values(self, relation: str) -> list[str]:
        """All possible values of a person relation (the candidate answers of a question)."""
        return {
            "city": self.cities,
            "job": JOBS,
            "pet": PETS,
            "sport": SPORTS,
            "food": FOODS,
            "color": COLORS,
        }[relation]

    def random_event(self, rng: random.Random) -> Event:
        actor, witness = rng.sample(self.people, 2)
        verb, thing = rng.choice(ACTIONS)
        return Event(
            actor,
            verb,
            thing,
            rng.choice(self.cities),
            rng.choice(DAYS),
            rng.randint(2, 90),
            witness,
        )


PERSON_RELATIONS = ("city", "job", "pet", "sport", "food", "color")


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(
        rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables)
    )


def _unique_words(
    rng: random.Random, n: int, syllables: tuple[int, ...], taken: set[str]
) -> list[str]:
    words: list[str] = []
    while len(words) < n:
        w = _word(rng, rng.choice(syllables))
        if w not in taken and len(w) >= 4:
            taken.add(w)
            words.append(w)
    return words


def make_world(
    seed: int = 0, n_people: int = 600, n_cities: int = 40, n_misconceptions: int = 300
) -> World:
    """Generate the world. `n_people` sets the number of facts (6 per person): keep it large enough
    that the small base cannot hold most of them (lesson 4 of issue 3)."""
    rng = random.Random(seed)
    taken: set[str] = set()
    cities = [w.capitalize() for w in _unique_words(rng, n_cities, (2,), taken)]
    firsts = _unique_words(rng, n_people, (2,), taken)
    lasts = _unique_words(rng, n_people, (2, 3), taken)
    people = [
        Person(
            f"{f.capitalize()} {s.capitalize()}",
            rng.choice(cities),
            rng.choice(JOBS),
            rng.choice(PETS),
            rng.choice(SPORTS),
            rng.choice(FOODS),
            rng.choice(COLORS),
        )
        for f, s in zip(firsts, lasts, strict=True)
    ]
    creatures = [w + "s" for w in _unique_words(rng, n_misconceptions, (2,), taken)]
    misconceptions = []
    for creature in creatures:
        relation = rng.choice(["diet", "habitat"])
        truth, myth, *others = rng.sample(DIETS if relation == "diet" else HABITATS, 4)
        misconceptions.append(Misconception(creature, relation, truth, myth, tuple(others)))
    return World(seed, cities, people, misconceptions)
