"""The probe run BEFORE fine-tuning (lesson 3 of issue 3): does the large base know more?

Two measurements per base, both by ranking candidate continuations by their summed log-probability:
1. fact recall in the pretraining format ("Sailfai Girnin lives in" -> every city), top-1 accuracy
   over held-out people (the people the eval questions ask about);
2. answer ranking inside each task template: how often the right candidate ranks first among the
   task's candidates (all cities/jobs for `trivia`, the four option texts for `mc`/`truthful`, a right
   vs three slipped worked solutions for `math`, the article's highlight vs three others for
   `summary`), even where the base's own generated format is wrong. High ranking here is the
   precondition for fusion to transfer anything.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

from fusion_llm.core.padding import padded
from fusion_llm.zoo import phrasing as ph
from fusion_llm.zoo.task_families import TASKS, TaskExample, split_people, task_examples
from fusion_llm.zoo.world import PERSON_RELATIONS, World


@torch.no_grad()
def continuation_logprobs(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    prompt: str,
    continuations: list[str],
) -> torch.Tensor:
    """log P(continuation | prompt) summed over the continuation's tokens, one value per
    continuation, in one right-padded forward pass."""
    prompt_ids = tokenizer(prompt).input_ids
    rows = [tokenizer(c, add_special_tokens=False).input_ids for c in continuations]
    ids, mask = padded([prompt_ids + row for row in rows], tokenizer.pad_token_id, side="right")
    logprobs = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)  # [C, S, V]
    scores = torch.zeros(len(rows))
    for i, row in enumerate(rows):
        positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(row))
        scores[i] = logprobs[i, positions, torch.tensor(row)].sum()
    return scores


def _top1(model, tokenizer, prompt: str, candidates: list[str], gold: int) -> bool:
    return int(continuation_logprobs(model, tokenizer, prompt, candidates).argmax()) == gold


def fact_recall(model, tokenizer, world: World, n_people: int) -> dict[str, float]:
    """Top-1 accuracy per relation, in pretraining wording, over the held-out people."""
    _, people = split_people(world, n_people)
    result = {}
    for relation in PERSON_RELATIONS:
        prefix, answer = ph.PROBE_PREFIXES[relation]
        values = world.values(relation)
        hits = 0
        for p in people:
            candidates = [" " + answer.format(v=v, av=ph.a_an(v)) for v in values]
            hits += _top1(
                model,
                tokenizer,
                prefix.format(n=p.name),
                candidates,
                values.index(getattr(p, relation)),
            )
        result[relation] = hits / len(people)
    result["mean"] = sum(result.values()) / len(PERSON_RELATIONS)
    return result


def _ranking_accuracy(model, tokenizer, examples: list[TaskExample], by_option: bool) -> float:
    hits = 0
    for e in examples:
        candidates = [f" {o}" for o in e.options] if by_option else list(e.candidates)
        hits += _top1(model, tokenizer, e.prompt, candidates, e.gold)
    return hits / len(examples)


def task_ranking(model, tokenizer, world: World, n_eval: int) -> dict[str, float]:
    """Top-1 candidate ranking inside each task template on the eval split; for the multiple-choice
    tasks both the option texts (knowledge) and the letters (the scored format) are ranked."""
    result = {}
    for task in TASKS:
        examples = task_examples(world, task, "eval", n_eval, n_eval)
        multiple_choice = bool(examples[0].options)
        result[task] = _ranking_accuracy(model, tokenizer, examples, by_option=multiple_choice)
        if multiple_choice:
            result[f"{task}_letter"] = _ranking_accuracy(model, tokenizer, examples, False)
    return result


def probe(model, tokenizer, world: World, n_eval: int) -> dict[str, dict[str, float]]:
    model.eval()
    return {
        "fact_recall": fact_recall(model, tokenizer, world, n_eval),
        "task_ranking": task_ranking(model, tokenizer, world, n_eval),
    }
