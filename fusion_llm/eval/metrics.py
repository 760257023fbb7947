"""The paper's metrics: exact match (TriviaQA-style normalisation; final number for math), ROUGE-2
(the `rouge_score` package, as CNN/DM evaluations use), and multiple-choice letter accuracy.

Every metric reads a prediction only up to its first newline: each task's answer is one line, and a
base model that keeps writing after it (a new "Question: ...") should not be penalised for the rest.
Scores are in [0, 1].
"""

from __future__ import annotations

import re
import string
from functools import lru_cache

from rouge_score import rouge_scorer

ARTICLES = re.compile(r"\b(a|an|the)\b")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
LEADING_CHOICE = re.compile(r"^\W*([A-D])(?![A-Za-z])")
STATED_CHOICE = re.compile(r"[Aa]nswer(?: is|:)?\s*\(?([A-D])(?![A-Za-z])")


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0] if text.strip() else ""


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(first_line(prediction)) == normalize_answer(reference))


def final_number(text: str) -> float | None:
    """The last number in the text ("... The answer is 1,204." -> 1204.0), None if there is none."""
    numbers = NUMBER.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


def number_match(prediction: str, reference: str) -> float:
    """GSM8K-style: the final number of the prediction equals the reference's final number."""
    predicted = final_number(first_line(prediction))
    return float(predicted is not None and predicted == final_number(reference))


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)


def rouge2(prediction: str, reference: str) -> float:
    """ROUGE-2 F1 of the prediction's first line against the reference."""
    return _scorer().score(reference, first_line(prediction))["rouge2"].fmeasure


def parse_choice(text: str) -> str | None:
    """The option letter a prediction picks: a leading letter ("B", "(C) owl", "D.") or a stated one
    ("The answer is A"); None when no letter A-D can be read."""
    line = first_line(text)
    match = LEADING_CHOICE.match(line) or STATED_CHOICE.search(line)
    return match.group(1) if match else None


def choice_accuracy(prediction: str, reference: str) -> float:
    return float(parse_choice(prediction) == reference)


TASK_METRICS = {
    "math": number_match,
    "truthful": choice_accuracy,
    "trivia": exact_match,
    "summary": rouge2,
    "mc": choice_accuracy,
}
METRIC_NAMES = {
    "math": "EM",
    "truthful": "accuracy",
    "trivia": "EM",
    "summary": "ROUGE-2",
    "mc": "accuracy",
}


def score(task: str, prediction: str, reference: str) -> float:
    if task not in TASK_METRICS:
        msg = f"no metric for task {task!r}; known tasks: {', '.join(TASK_METRICS)}"
        raise ValueError(msg)
    return TASK_METRICS[task](prediction, reference)
