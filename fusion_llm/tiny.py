"""A tiny same-tokenizer model family built in seconds, for tests and offline smoke runs.

It has what a real deployment has, at toy scale: a BPE tokenizer trained on a few KB of text,
a large and a small Llama base with random weights, a full-checkpoint expert (the small base with
perturbed weights) and two LoRA adapters on the small base, all written with `save_pretrained` so
that the real loading path runs. Weights are random: the text is gibberish, the mechanics are real.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
_WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "it",
    "an",
    "be",
    "this",
    "which",
    "or",
    "are",
    "question",
    "answer",
    "summary",
    "article",
    "number",
    "city",
    "river",
    "king",
    "plus",
    "minus",
    "equals",
    "three",
    "seven",
    "eleven",
    "forty",
    "Paris",
    "Rome",
    "Nile",
    "Tiber",
    "what",
    "who",
    "where",
    "how",
    "many",
    "when",
    "stop",
    "STOP",
    "end",
    "###",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def corpus(lines: int = 400, seed: int = 0) -> list[str]:
    """Pseudo-sentences over a fixed word list, with digits and punctuation for BPE merges."""
    gen = torch.Generator().manual_seed(seed)
    words = _WORDS + [str(n) for n in range(20)] + list(".,:;?!")
    out = []
    for _ in range(lines):
        idx = torch.randint(
            len(words), (int(torch.randint(4, 14, (1,), generator=gen)),), generator=gen
        )
        out.append(" ".join(words[i] for i in idx.tolist()))
    return out


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer with <pad>, <s>, </s> and a minimal chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _llama(
    tokenizer: PreTrainedTokenizerFast, hidden: int, layers: int, seed: int
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        # Large init makes the random next-token distributions peaked, like a trained model's.
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # Special tokens get a constant zero logit: random weights then seldom end a generation
        # at once or emit only tokens that decode to nothing; a fixed value keeps fusion neutral.
        model.lm_head.weight[[tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]] = 0.0
    return model


def build_family(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the family under `root`; returns {name: folder} for large, small, full, lora_a, lora_b."""
    root = Path(root)
    tokenizer = build_tokenizer()
    paths = {name: root / name for name in ("large", "small", "full", "lora_a", "lora_b")}

    large = _llama(tokenizer, hidden=64, layers=2, seed=seed)
    small = _llama(tokenizer, hidden=32, layers=2, seed=seed + 1)
    for name, model in (("large", large), ("small", small)):
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])

    expert = _llama(tokenizer, hidden=32, layers=2, seed=seed + 1)
    torch.manual_seed(seed + 2)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(0.05 * torch.randn_like(p))
    expert.save_pretrained(paths["full"])
    tokenizer.save_pretrained(paths["full"])

    for offset, name in enumerate(("lora_a", "lora_b")):
        base = _llama(tokenizer, hidden=32, layers=2, seed=seed + 1)
        torch.manual_seed(seed + 10 + offset)  # after the base: each adapter gets its own weights
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "o_proj"],
            init_lora_weights=False,  # random B: an adapter that actually changes the model
        )
        get_peft_model(base, config).save_pretrained(paths[name])
    return paths


def family_config(
    paths: dict[str, Path], experts: tuple[str, ...] = ("lora_a", "lora_b", "full"), **sections
) -> dict:
    """An engine config dict over a built family; `sections` replace top-level config sections."""
    config = {
        "large": {"path": str(paths["large"])},
        "small": {"path": str(paths["small"])},
        "experts": [{"name": name, "path": str(paths[name])} for name in experts],
        "generation": {"max_new_tokens": 8},
    }
    config.update(sections)
    return config
