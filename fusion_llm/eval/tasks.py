"""Loading the zoo's task splits for evaluation.

The splits are not shipped as files: they are regenerated from the world seed, deterministically,
exactly as the zoo build generated the fine-tuning data (so eval never overlaps train). The scale
must be the one the zoo was built at ("full" for the shipped family).
"""

from __future__ import annotations

from functools import lru_cache

from fusion_llm.zoo.scales import get_scale
from fusion_llm.zoo.task_families import SEEN_TASKS, TASKS, TaskExample, task_examples
from fusion_llm.zoo.world import World, make_world

__all__ = ["SEEN_TASKS", "TASKS", "TaskExample", "few_shot_prompt", "load_task"]


@lru_cache(maxsize=4)
def _world(scale: str, seed: int) -> World:
    spec = get_scale(scale)
    return make_world(seed, spec.n_people, n_misconceptions=spec.n_misconceptions)


def load_task(
    task: str, split: str = "eval", n: int | None = None, scale: str = "full", seed: int = 0
) -> list[TaskExample]:
    """The first `n` examples of a split (all of it when None: the scale's n_eval or n_train)."""
    spec = get_scale(scale)
    size = spec.n_eval if split == "eval" else spec.n_train
    examples = task_examples(_world(scale, seed), task, split, size, spec.n_eval)
    return examples if n is None else examples[:n]


def few_shot_prompt(
    example: TaskExample, shots: int = 5, scale: str = "full", seed: int = 0
) -> str:
    """The example's prompt preceded by `shots` solved train examples of the same task (for the
    ICL rows), separated by blank lines."""
    demos = load_task(example.task, "train", shots, scale, seed)
    return "".join(f"{d.prompt}{d.target}\n\n" for d in demos) + example.prompt
