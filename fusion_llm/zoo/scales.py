"""Sizes and step counts of a zoo build: `full` (the shipped family) and `toy` (a smoke test).

Why the full numbers are what they are (measured on this 2-core CPU, one thread, batch 16 x 128
tokens, 20-step timing runs): large (7.0 M params) 1970 tok/s, mid (2.2 M) 4850 tok/s, small
(0.64 M) 12600 tok/s. A corpus pass is ~140 k tokens, so 1600 steps (3.3 M tokens, ~24 passes, each
fact seen ~40 times in varied forms) take ~28 / 11 / 5 min alone; with a test suite sharing the
machine the first full build took 35 / 13 / 7 min. Fine-tunes add ~10 min and the large baselines
~20 min: inside the issue's 2-hour limit on one thread."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    intermediate: int
    heads: int


@dataclass(frozen=True)
class Scale:
    n_people: int  # facts = 5 per person; sized so the small base cannot hold most of them
    n_misconceptions: int
    vocab_size: int
    sizes: dict[str, ModelSize]
    pretrain_steps: dict[str, int]
    pretrain_lr: dict[str, float]
    n_train: int  # fine-tuning examples per task
    n_eval: int  # eval examples per task (also the held-out partition size)
    finetune_epochs: int
    finetune_lr: float = 5e-4
    lora_lr: float = 2e-3
    lora_rank: int = 16
    batch_size: int = 16
    seq_len: int = 128


SCALES = {
    "full": Scale(
        n_people=500,
        n_misconceptions=300,
        vocab_size=2048,
        sizes={
            "large": ModelSize(256, 8, 704, 8),
            "mid": ModelSize(160, 6, 448, 4),
            "small": ModelSize(96, 4, 256, 4),
        },
        pretrain_steps={"large": 1600, "mid": 1600, "small": 1600},
        pretrain_lr={"large": 1.5e-3, "mid": 2e-3, "small": 3e-3},
        n_train=800,
        n_eval=100,
        finetune_epochs=3,
    ),
    "toy": Scale(
        n_people=40,
        n_misconceptions=20,
        vocab_size=1024,
        sizes={
            "large": ModelSize(64, 2, 128, 2),
            "mid": ModelSize(48, 2, 96, 2),
            "small": ModelSize(32, 1, 64, 2),
        },
        pretrain_steps={"large": 6, "mid": 6, "small": 6},
        pretrain_lr={"large": 3e-3, "mid": 3e-3, "small": 3e-3},
        n_train=16,
        n_eval=8,
        finetune_epochs=1,
        batch_size=8,
        seq_len=64,
    ),
}


def get_scale(name: str) -> Scale:
    if name not in SCALES:
        msg = f"unknown zoo scale {name!r}; choose one of {', '.join(SCALES)}"
        raise ValueError(msg)
    return SCALES[name]
