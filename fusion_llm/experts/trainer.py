"""`train_expert`: fine-tune the small base on JSONL rows into an expert that fusion-llm can load.

transformers' `Trainer` runs the optimisation (the training loop, gradient clipping, seeding, CPU or
CUDA placement, mixed precision on GPUs, loss logging) and peft makes the LoRA; this module only
turns rows into token ids with the loss on the completion tokens (prompt tokens are labelled -100),
hands the Trainer the recipe's data order, optimiser and schedule (`recipe.py`), shows a progress bar
with the loss and ETA, and writes the expert: safetensors weights (the adapter, or the whole model
with `full`), the tokenizer, and its card (`card.py`) with a sample of the training prompts as its
`examples`.

Defaults are the recipe that trained the shipped family's experts (`fusion_llm/zoo/train.py` uses
the same `recipe.py`): LoRA rank 16, alpha 32 on every linear layer, 3 epochs, batch 16, lr 2e-3
(LoRA) / 5e-4 (full), weight decay 0.01, 5 % warmup, cosine decay to 10 %, gradient norm 1, float32
on CPU. So the zoo's task data and an expert's seed (`zoo.json`) rebuild that expert.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

from ..core.config import ModelSpec
from ..core.errors import DataError, RequestError
from ..routing.card import CARD_FILE, write_card
from ..runtime.models import load_model
from . import recipe
from .data import Record, read_jsonl, render
from .recipe import IGNORE

VALIDATION_FILE = "validation.jsonl"


@dataclass(frozen=True)
class TrainSettings:
    """How an expert is trained; `None` learning rate: 2e-3 for LoRA, 5e-4 for a full fine-tune."""

    full: bool = False  # fine-tune every weight instead of a LoRA adapter
    rank: int = 16  # LoRA rank
    lora_alpha: int | None = None  # LoRA scaling numerator; None: 2 * rank
    lora_dropout: float = 0.0
    target_modules: str | list[str] = (
        "all-linear"  # peft's name for every linear layer but the head
    )
    epochs: float = 3.0
    lr: float | None = None
    batch_size: int = 16
    weight_decay: float = 0.01
    warmup: float = 0.05  # share of the steps with a linear warmup
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # bfloat16 mixed precision (float32 weights and optimiser, bfloat16 matmuls under autocast).
    # None: on GPUs that support it, off on CPU, where only CPUs with native bfloat16 gain from it
    # and the shipped family's experts were trained in float32.
    bf16: bool | None = None
    examples: int = 20  # training prompts written to the card for the `examples` router
    holdout: int = 0  # rows kept out of training, written as the gate's validation file

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (5e-4 if self.full else 2e-3)

    def check(self) -> None:
        problems = [
            (self.rank < 1, "rank must be at least 1"),
            (self.epochs <= 0, "epochs must be positive"),
            (self.batch_size < 1, "batch_size must be at least 1"),
            (self.learning_rate <= 0, "lr must be positive"),
            (not 0 <= self.warmup < 1, "warmup must be in [0, 1)"),
            (self.examples < 0 or self.holdout < 0, "examples and holdout must be >= 0"),
        ]
        for bad, msg in problems:
            if bad:
                raise RequestError(f"invalid training settings: {msg}")


@dataclass
class TrainResult:
    directory: Path
    rows: int  # training rows
    validation_rows: int
    steps: int
    train_loss: float
    seconds: float  # wall time of the optimisation (model loading excluded)
    card: dict[str, Any] = field(default_factory=dict)


def train_expert(
    small: str | Path | ModelSpec,
    data: str | Path,
    out: str | Path,
    settings: TrainSettings | None = None,
    log: Any = None,
) -> TrainResult:
    """Train an expert on `data` (JSONL) from the small base `small`; write it to `out`.

    `log`: a file for the progress bar (default: stderr); `False`-y values other than None hide it.
    """
    settings = settings or TrainSettings()
    settings.check()
    out = Path(out)
    records = read_jsonl(data)
    train_rows, held_out = _split(records, settings)
    spec = small if isinstance(small, ModelSpec) else ModelSpec(path=str(small), dtype="float32")
    spec = spec.model_copy(update={"device": _device(settings.device)})
    loaded = load_model(spec, "small base")
    tokenizer, model = loaded.tokenizer, loaded.model
    features = [_features(r, tokenizer, loaded.context_window, str(data)) for r in train_rows]

    set_seed(settings.seed)  # LoRA initialisation, then the Trainer reseeds for the data order
    if not settings.full:
        lora = LoraConfig(
            r=settings.rank,
            lora_alpha=settings.lora_alpha or 2 * settings.rank,
            lora_dropout=settings.lora_dropout,
            target_modules=settings.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    batches = recipe.epoch_batches(
        len(features), settings.batch_size, settings.epochs, settings.seed
    )
    steps = len(batches)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimiser = recipe.optimiser(
        trained, settings.learning_rate, settings.weight_decay, steps,
        recipe.warmup_steps(steps, settings.warmup),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        trainer = _RecipeTrainer(
            batches,
            model=model,
            args=_arguments(settings, scratch, spec.device, steps),
            train_dataset=features,
            data_collator=recipe.Collator(tokenizer.pad_token_id),
            optimizers=optimiser,
        )
        trainer.remove_callback(PrinterCallback)  # the bar below shows the loss instead
        if log is None or log:
            trainer.add_callback(_LossBar(f"train {out.name}", log or sys.stderr))
        start = time.perf_counter()
        metrics = trainer.train().metrics
        seconds = time.perf_counter() - start

    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if held_out:
        lines = "".join(json.dumps(r.as_json()) + "\n" for r in held_out)
        (out / VALIDATION_FILE).write_text(lines, encoding="utf-8")
    card = {
        "name": out.name,
        "kind": "full" if settings.full else "lora",
        "small_base": spec.path,
        "examples": _example_prompts(train_rows, tokenizer, settings),
        "validation": VALIDATION_FILE if held_out else None,
        "training": {
            "data": str(data),
            "rows": len(train_rows),
            "completion_tokens": sum(sum(t != IGNORE for t in f["labels"]) for f in features),
            "steps": trainer.state.global_step,
            "train_loss": round(metrics["train_loss"], 4),
            "seconds": round(seconds, 1),
            "trainer": "transformers.Trainer",
            "settings": asdict(settings),
        },
        "verdicts": {},
    }
    write_card(out / CARD_FILE, card)
    return TrainResult(
        out, len(train_rows), len(held_out), trainer.state.global_step,
        metrics["train_loss"], seconds, card,
    )  # fmt: skip


def _split(records: list[Record], settings: TrainSettings) -> tuple[list[Record], list[Record]]:
    """(training rows, held-out rows): `holdout` rows drawn with the seed, file order kept."""
    if settings.holdout >= len(records):
        msg = f"holdout ({settings.holdout}) must leave training rows: the data has {len(records)}"
        raise RequestError(msg)
    held = set(random.Random(settings.seed).sample(range(len(records)), settings.holdout))
    return (
        [r for i, r in enumerate(records) if i not in held],
        [r for i, r in enumerate(records) if i in held],
    )


def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _features(record: Record, tokenizer, window: int | None, source: str) -> dict[str, list[int]]:
    """Token ids and labels: prompt tokens carry no loss, completion tokens and the EOS do.

    Prompt and completion are tokenized apart, as the decoder sees them: the prompt alone, then
    generated tokens.
    """
    text = render(record, tokenizer, source)
    prompt = tokenizer(text.prompt, add_special_tokens=text.add_special_tokens)["input_ids"]
    completion = tokenizer(text.completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and completion[-1:] != [tokenizer.eos_token_id]:
        completion = [*completion, tokenizer.eos_token_id]
    ids = prompt + completion
    if window is not None and len(ids) > window:
        msg = (
            f"{source}, line {record.line}: prompt + completion are {len(ids)} tokens, more than "
            f"the small base's context window of {window}; shorten or drop the row"
        )
        raise DataError(msg)
    return {"input_ids": ids, "labels": [IGNORE] * len(prompt) + completion}


class _RecipeTrainer(Trainer):
    """A `Trainer` whose steps read the recipe's batches (`recipe.epoch_batches`), in order."""

    def __init__(self, batches: list[list[int]], **kwargs):
        super().__init__(**kwargs)
        self.batches = batches

    def get_train_dataloader(self) -> DataLoader:
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=self.batches,
            collate_fn=self.data_collator,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)


def _arguments(settings: TrainSettings, scratch: str, device: str, steps: int) -> TrainingArguments:
    """The loop's settings; the optimiser, schedule and batches come from `recipe` instead."""
    on_gpu = device.startswith("cuda")
    bf16 = settings.bf16 if settings.bf16 is not None else on_gpu and torch.cuda.is_bf16_supported()
    return TrainingArguments(
        output_dir=scratch,
        max_steps=steps,  # every epoch is in the recipe's batches: the Trainer makes one pass
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        max_grad_norm=1.0,
        seed=settings.seed,
        use_cpu=not on_gpu,
        bf16=bf16,
        logging_steps=max(1, steps // 50),
        disable_tqdm=True,  # replaced by `_LossBar`
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,  # rows are plain dicts, not a `datasets.Dataset`
        dataloader_pin_memory=on_gpu,
    )


class _LossBar(TrainerCallback):
    """One tqdm bar per run (tqdm shows the ETA) with the latest logged training loss."""

    def __init__(self, desc: str, file):
        self.desc, self.file, self.bar = desc, file, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.desc, file=self.file, mininterval=1)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def _example_prompts(rows: list[Record], tokenizer, settings: TrainSettings) -> list[str]:
    """A seeded sample of distinct training prompts, as the small base reads them."""
    prompts = list(dict.fromkeys(render(r, tokenizer).prompt for r in rows))
    return random.Random(settings.seed).sample(prompts, min(settings.examples, len(prompts)))
