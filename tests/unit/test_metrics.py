"""Hand-checked cases for the task metrics (EM normalisation, final number, ROUGE-2, MC letters)."""

import pytest

from fusion_llm.eval.metrics import (
    exact_match,
    final_number,
    normalize_answer,
    number_match,
    parse_choice,
    rouge2,
    score,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   Owl. ", "owl"),
        ("A baker", "baker"),
        ("Theatre", "theatre"),  # "the" inside a word is kept
        ("rock, paper & scissors", "rock paper scissors"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        (" Meirbi", "Meirbi", 1.0),
        ("meirbi.", "Meirbi", 1.0),
        ("a farmer", "farmer", 1.0),
        ("Meirbi\nQuestion: What is the job of X?", "Meirbi", 1.0),  # only the first line counts
        ("Meirbi Town", "Meirbi", 0.0),
        ("", "Meirbi", 0.0),
    ],
)
def test_exact_match(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3 + 4 = 7. 7 - 2 = 5. The answer is 5.", 5.0),
        ("The answer is 1,204.", 1204.0),
        ("It is -3", -3.0),
        ("2.5 apples", 2.5),
        ("no digits here", None),
    ],
)
def test_final_number(text, expected):
    assert final_number(text) == expected


def test_number_match_compares_final_numbers_of_the_first_line():
    assert number_match(" 3 + 4 = 7. 7 - 2 = 5. The answer is 5.", "5") == 1.0
    assert number_match(" The answer is 5.0", "5") == 1.0
    assert number_match(" The answer is 6.\nThe answer is 5.", "5") == 0.0
    assert number_match(" I do not know.", "5") == 0.0


def test_rouge2_hand_checked():
    reference = "the cat sat on the mat"
    assert rouge2(reference, reference) == pytest.approx(1.0)
    # bigrams: reference has 5, prediction "the cat sat" has 2, both shared: P=1, R=2/5, F=4/7.
    assert rouge2("the cat sat", reference) == pytest.approx(4 / 7)
    assert rouge2("mat the on", reference) == 0.0
    assert rouge2("", reference) == 0.0


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        (" B", "B"),
        ("C.", "C"),
        ("(D) owl", "D"),
        ("A\nQuestion: next", "A"),
        ("The answer is B", "B"),
        ("answer: C", "C"),
        ("the answer is a cat", None),  # letters are capitals only
        (" owl", None),
        ("Because", None),  # a capital B starting a word is not a choice
        ("E", None),
    ],
)
def test_parse_choice(prediction, expected):
    assert parse_choice(prediction) == expected


def test_score_dispatches_by_task_and_rejects_unknown_tasks():
    assert score("mc", " B", "B") == 1.0
    assert score("truthful", " A", "B") == 0.0
    assert score("math", " The answer is 12.", "12") == 1.0
    with pytest.raises(ValueError, match="known tasks"):
        score("gsm8k", "1", "1")
