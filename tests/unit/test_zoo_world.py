"""The zoo's world, corpus, tokenizer and task splits keep the promises issue 3 asks of them."""

import pytest

from fusion_llm.zoo import phrasing as ph
from fusion_llm.zoo.corpus import pretraining_pass
from fusion_llm.zoo.scales import get_scale
from fusion_llm.zoo.task_families import (
    MC_RELATIONS,
    TASKS,
    TRIVIA_RELATIONS,
    split_misconceptions,
    split_people,
    task_examples,
)
from fusion_llm.zoo.tokenizer import train_tokenizer
from fusion_llm.zoo.world import PERSON_RELATIONS, make_world

SCALE = get_scale("toy")


@pytest.fixture(scope="module")
def world():
    return make_world(0, SCALE.n_people, n_misconceptions=SCALE.n_misconceptions)


@pytest.fixture(scope="module")
def corpus(world):
    return "\n".join(
        pretraining_pass(world, 0, SCALE.n_eval) + pretraining_pass(world, 1, SCALE.n_eval)
    )


def _split(world, task, split):
    n = SCALE.n_eval if split == "eval" else 10 * SCALE.n_train
    return task_examples(world, task, split, n, SCALE.n_eval)


def test_world_and_tasks_are_deterministic_in_the_seed(world):
    again = make_world(0, SCALE.n_people, n_misconceptions=SCALE.n_misconceptions)
    assert again.people == world.people
    assert _split(again, "math", "eval") == _split(world, "math", "eval")
    other = make_world(1, SCALE.n_people, n_misconceptions=SCALE.n_misconceptions)
    assert other.people != world.people


@pytest.mark.parametrize("task", TASKS)
def test_train_and_eval_questions_are_disjoint(world, task):
    train = {e.prompt for e in _split(world, task, "train")}
    evaluation = _split(world, task, "eval")
    assert len(evaluation) == SCALE.n_eval
    assert not train & {e.prompt for e in evaluation}


@pytest.mark.parametrize("task", TASKS)
def test_gold_candidate_is_the_target(world, task):
    for e in _split(world, task, "eval"):
        assert e.candidates[e.gold] == e.target
        assert len(set(e.candidates)) == len(e.candidates)


@pytest.mark.parametrize("task", ["mc", "truthful"])
def test_eval_gold_letters_cycle_so_one_letter_scores_chance(world, task):
    evaluation = _split(world, task, "eval")
    assert [e.answer for e in evaluation] == [ph.LETTERS[i % 4] for i in range(len(evaluation))]
    for e in evaluation:
        assert f"{e.answer}. {e.options[e.gold]}" in e.prompt
        assert len(set(e.options)) == 4


def test_trivia_and_mc_eval_ask_about_people_no_train_question_mentions(world):
    def names(examples):
        return {p.name for p in world.people for e in examples if p.name + " " in e.prompt}

    for task in ("trivia", "mc"):
        assert not names(_split(world, task, "train")) & names(_split(world, task, "eval"))


@pytest.mark.parametrize("task", TASKS)
def test_eval_questions_are_never_pretrained_in_their_task_format(world, corpus, task):
    for e in _split(world, task, "eval"):
        assert e.prompt not in corpus


def test_eval_facts_are_stated_in_pretraining(world, corpus):
    for e in _split(world, "trivia", "eval"):
        assert e.answer in corpus


def test_every_template_token_occurs_in_pretraining():
    """Lesson 2: never-trained embeddings of template words derail the large base. Checked on the
    full-scale world: the toy world is too small to name every distractor value."""
    full = get_scale("full")
    world = make_world(0, full.n_people, n_misconceptions=full.n_misconceptions)
    tokenizer = train_tokenizer(world, full.vocab_size, full.n_eval)
    seen = set(tokenizer("\n".join(pretraining_pass(world, 0, full.n_eval))).input_ids)
    for task in TASKS:
        for e in task_examples(world, task, "eval", full.n_eval, full.n_eval):
            assert set(tokenizer(e.prompt + e.target).input_ids) <= seen, e.prompt


def test_misconceptions_are_stated_more_often_than_the_truth(world, corpus):
    for m in world.misconceptions:
        verb = "eat" if m.relation == "diet" else "live in"
        truth = corpus.count(f"{m.creature} {verb} {m.truth}.")
        truth += corpus.count(f"{m.creature} really {verb} {m.truth}.")
        assert corpus.count(f"{m.creature} {verb} {m.myth}.") > truth > 0


def test_names_are_split_into_subword_pieces_and_cities_are_one_token(world):
    """Lesson 3: a name that is one token lets a model store facts in its embedding row. A city is a
    value, like a job: one token, so recalling it is one choice, not a spelling."""
    tokenizer = train_tokenizer(world, SCALE.vocab_size, SCALE.n_eval)
    for p in world.people:
        assert len(tokenizer(" " + p.name, add_special_tokens=False).input_ids) >= 3
    full = get_scale("full")  # the toy corpus names a city too rarely to merge it
    world = make_world(0, full.n_people, n_misconceptions=full.n_misconceptions)
    tokenizer = train_tokenizer(world, full.vocab_size, full.n_eval)
    for city in world.cities:
        assert len(tokenizer(" " + city, add_special_tokens=False).input_ids) == 1


def test_every_task_template_is_pretrained_about_train_entities_only(world):
    """Question pages, as the web holds them: every relation the tasks ask, in the tasks' templates,
    for some train people and creatures, never for an eval one."""
    docs = [d for i in range(6) for d in pretraining_pass(world, i, SCALE.n_eval)]
    train_people, eval_people = split_people(world, SCALE.n_eval)
    _, eval_creatures = split_misconceptions(world, SCALE.n_eval)
    pages = [d for d in docs if d.startswith("Question: ")]
    asked = {
        (r, "\nA. " in d)
        for d in pages
        for p in train_people
        for r in PERSON_RELATIONS
        if d.startswith(ph.open_prompt(ph.question(p, r)).removesuffix("\nAnswer:"))
    }
    assert {(r, mc) for r in (*TRIVIA_RELATIONS, *MC_RELATIONS) for mc in (False, True)} <= asked
    assert any(
        "\nA. " in d and ph.misconception_question(m) in d
        for d in pages
        for m in world.misconceptions
    )
    assert any(d.startswith("Article: ") and "\nSummary: " in d for d in docs)
    assert any(d.startswith("Question: ") and d.count(" = ") == 2 for d in docs)
    questions = [ph.question(p, r) for p in eval_people for r in PERSON_RELATIONS]
    questions += [ph.misconception_question(m) for m in eval_creatures]
    for d in pages:
        assert not any(q in d for q in questions)
