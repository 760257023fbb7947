"""Sizes and step counts of a zoo build: `full` (the shipped family) and `toy` (a smoke test).

The shipped family is `full`, built by `fusion-llm zoo build --processes 2 --threads 1` (probes in
`zoo.json`, tables in docs/reproduction.md). Its step counts were chosen from probes of each base
alone (eval people's fact recall in pretraining wording, before any fine-tune or fusion run; one
thread each) on the 600-person world, where one pass is ~120 k tokens, so a step is 1/58 of a pass:
- pretraining in 1024-token blocks throughout keeps the bases from memorising (1500 steps: small
  19 %, large 38 %, mid 38 % at 1625 steps); the same steps and tokens in 128-token blocks, 16 a
  step, give the large base 93 % (city 82 %, pet 86 %) and the small one 25 %. So pretraining runs
  in short blocks and reaches the 1024-token window (2 blocks a step) only for the last
  `window_share` of the steps: 10 % of 1500 cost the large base 9 points (84 %), hence 5 % of 2000;
- mid in short blocks: 1625 steps 76 % (jobs 100 %); with the window phase 1350 steps 35 %, 1550
  steps 46 %, 1750 steps 80 %: the band (50-70 %) lies between, and 1550, the closest, ships.
The jobs relation is the easiest for every base (it is also named in articles) and stays above the
others.
"""

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
    n_people: int  # facts = 6 per person; sized so the small base cannot hold most of them
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
    batch_size: int = 16  # fine-tuning examples per step
    # Pretraining packs the corpus into `block_len`-token blocks, `block_batch_size` a step, then for
    # the last `window_share` of the steps into `window`-token blocks (the models' context window),
    # `window_batch_size` a step: the large base memorises in short blocks, not in long ones.
    block_len: int = 128
    block_batch_size: int = 16
    window: int = 1024
    window_batch_size: int = 2
    window_share: float = 0.1


SCALES = {
    "full": Scale(
        n_people=600,
        n_misconceptions=300,
        vocab_size=2048,
        sizes={
            "large": ModelSize(256, 8, 704, 8),
            "mid": ModelSize(160, 6, 448, 4),
            "small": ModelSize(96, 4, 256, 4),
        },
        pretrain_steps={"large": 2000, "mid": 1550, "small": 1500},
        pretrain_lr={"large": 1.5e-3, "mid": 2e-3, "small": 3e-3},
        n_train=800,
        n_eval=100,
        finetune_epochs=3,
        window_share=0.05,
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
        block_len=64,
        block_batch_size=8,
        window=256,
    ),
}


def get_scale(name: str) -> Scale:
    if name not in SCALES:
        msg = f"unknown zoo scale {name!r}; choose one of {', '.join(SCALES)}"
        raise ValueError(msg)
    return SCALES[name]
