"""The training recipe: pretrain a Llama base on the corpus, fine-tune it (full or LoRA) on a task.

Fine-tunes put the loss on the answer tokens only (prompt tokens are labelled -100), so an expert
learns the task's format and selection rule, not the questions. Everything is saved with
`save_pretrained` as fp16 safetensors next to a copy of the shared tokenizer.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fusion_llm.experts import recipe
from fusion_llm.experts.recipe import IGNORE
from fusion_llm.zoo.corpus import pretraining_stream
from fusion_llm.zoo.scales import ModelSize, Scale
from fusion_llm.zoo.task_families import TaskExample
from fusion_llm.zoo.world import World

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHT_DECAY = 0.01
WARMUP_SHARE = 0.05


def new_base(
    size: ModelSize, tokenizer: PreTrainedTokenizerFast, window: int, seed: int
) -> LlamaForCausalLM:
    """A fresh Llama whose context window is `window`, the packed length it is pretrained on."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        intermediate_size=size.intermediate,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=window,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _blocks(docs: Iterator[list[int]], batch_size: int, length: int) -> Iterator[torch.Tensor]:
    """Token-id documents concatenated and cut into [batch_size, length] blocks."""
    buffer: list[int] = []
    need = batch_size * length
    for ids in docs:
        buffer += ids
        while len(buffer) >= need:
            yield torch.tensor(buffer[:need]).view(batch_size, length)  # [B, S]
            buffer = buffer[need:]


def _optimise(
    model: torch.nn.Module, batches: Iterator[dict], steps: int, lr: float, desc: str
) -> float:
    """AdamW over `steps` batches; returns the mean loss of the last 10 % of steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = recipe.optimiser(
        params, lr, WEIGHT_DECAY, steps, recipe.warmup_steps(steps, WARMUP_SHARE)
    )
    model.train()
    tail: list[float] = []
    bar = tqdm(range(steps), desc=desc, mininterval=5)
    for step, batch in zip(bar, batches, strict=False):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return sum(tail) / len(tail)


def pretrain(
    model: LlamaForCausalLM,
    world: World,
    tokenizer: PreTrainedTokenizerFast,
    scale: Scale,
    steps: int,
    lr: float,
    desc: str,
) -> float:
    """`steps` AdamW steps over the corpus (documents as BOS ... EOS): short blocks first, then
    blocks of the context window for the last `scale.window_share` of the steps, from one document
    stream under one learning-rate schedule."""
    docs = (
        tokenizer(doc).input_ids + [tokenizer.eos_token_id]
        for doc in pretraining_stream(world, scale.n_eval)
    )
    window_steps = round(steps * scale.window_share)
    short = itertools.islice(
        _blocks(docs, scale.block_batch_size, scale.block_len), steps - window_steps
    )
    blocks = itertools.chain(short, _blocks(docs, scale.window_batch_size, scale.window))
    batches = ({"input_ids": x, "labels": x} for x in blocks)
    return _optimise(model, batches, steps, lr, desc)


def _example_ids(example: TaskExample, tokenizer: PreTrainedTokenizerFast) -> dict[str, list]:
    prompt = tokenizer(example.prompt).input_ids
    target = tokenizer(example.target, add_special_tokens=False).input_ids
    target.append(tokenizer.eos_token_id)
    return {"input_ids": prompt + target, "labels": [IGNORE] * len(prompt) + target}


def _finetune_batches(
    examples: list[TaskExample],
    tokenizer: PreTrainedTokenizerFast,
    batch_size: int,
    epochs: int,
    seed: int,
) -> Iterator[dict]:
    """Right-padded batches whose labels cover only the target tokens and the closing EOS."""
    encoded = [_example_ids(e, tokenizer) for e in examples]
    collate = recipe.Collator(tokenizer.pad_token_id)
    for batch in recipe.epoch_batches(len(encoded), batch_size, epochs, seed):
        yield collate([encoded[j] for j in batch])


def finetune(
    base: LlamaForCausalLM,
    examples: list[TaskExample],
    tokenizer: PreTrainedTokenizerFast,
    scale: Scale,
    lora: bool,
    seed: int,
    desc: str,
) -> tuple[torch.nn.Module, float]:
    """A fine-tuned copy of `base` (full, or a LoRA adapter on it) and its training seconds."""
    torch.manual_seed(seed)
    model: torch.nn.Module = copy.deepcopy(base)
    if lora:
        config = LoraConfig(
            r=scale.lora_rank,
            lora_alpha=2 * scale.lora_rank,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    steps_per_epoch = math.ceil(len(examples) / scale.batch_size)
    batches = _finetune_batches(examples, tokenizer, scale.batch_size, scale.finetune_epochs, seed)
    start = time.perf_counter()
    _optimise(
        model,
        batches,
        steps_per_epoch * scale.finetune_epochs,
        scale.lora_lr if lora else scale.finetune_lr,
        desc,
    )
    return model, time.perf_counter() - start


def save(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    directory: Path,
    base_name: str | None = None,
) -> None:
    """fp16 safetensors + tokenizer. A LoRA adapter records its base as the sibling folder name."""
    directory.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).half()
    half.save_pretrained(directory, safe_serialization=True)
    if isinstance(
        half, PeftModel
    ):  # rewritten after saving: peft would try to read it while saving
        config_path = directory / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = f"../{base_name}"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(directory)
