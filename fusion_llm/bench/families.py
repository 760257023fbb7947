"""Random-weight model families at benchmark shapes (weights do not change speed).

Each family is written with `save_pretrained` and loaded through the engine's own loading path:
a large base, a small base, `k` full experts (the small base, perturbed) and `k` LoRA adapters.
The tokenizer is a synthetic word-level vocabulary of the shape's size, so realistic vocabularies
(151 936 ids) cost nothing to build.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast


@dataclass(frozen=True)
class ModelShape:
    """Sizes of one Llama-architecture model."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


@dataclass(frozen=True)
class FamilyShape:
    name: str
    vocab: int
    large: ModelShape
    small: ModelShape


SHAPES = {
    # Seconds on a CPU; what the test suite runs.
    "toy": FamilyShape("toy", 2_000, ModelShape(128, 4, 4, 2, 256), ModelShape(64, 2, 4, 2, 128)),
    # Qwen2-0.5B's sizes as the large model, a 4-layer model of the same vocabulary as the small one.
    "realistic": FamilyShape(
        "realistic", 151_936, ModelShape(896, 24, 14, 2, 4864), ModelShape(448, 4, 7, 1, 1216)
    ),
}


# The last ids are single printable characters, so that grammars (JSON, regexes) can be spelled
# in the synthetic vocabulary; prompts use the words only.
CHARACTERS = [c for c in string.printable if not c.isspace()] + [" "]


def random_prompts(vocab: int, lengths: list[int], seed: int) -> list[str]:
    """Prompts of random words of the synthetic vocabulary, one per length."""
    gen = torch.Generator().manual_seed(seed)
    words = vocab - len(CHARACTERS)
    return [
        " ".join(f"w{int(t)}" for t in torch.randint(3, words, (n,), generator=gen))
        for n in lengths
    ]


def synthetic_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with ids 0..vocab-1: `<pad>`, `<s>`, `</s>`, then `w3`, `w4`, ...,
    then the `CHARACTERS`."""
    first_character = vocab - len(CHARACTERS)
    words = (
        {"<pad>": 0, "<s>": 1, "</s>": 2}
        | {f"w{i}": i for i in range(3, first_character)}
        | {c: first_character + i for i, c in enumerate(CHARACTERS)}
    )
    backend = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def _model(vocab: int, shape: ModelShape, seed: int):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def write_family(root: str | Path, shape: FamilyShape, experts: int) -> dict[str, Path]:
    """Write the family; returns {name: folder} with large, small, full0.., lora0.."""
    root = Path(root)
    tokenizer = synthetic_tokenizer(shape.vocab)
    paths: dict[str, Path] = {}

    def save(name: str, model) -> None:
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])

    save("large", _model(shape.vocab, shape.large, seed=0))
    small = _model(shape.vocab, shape.small, seed=1)
    save("small", small)
    for i in range(experts):
        expert = _model(shape.vocab, shape.small, seed=1)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.02 * torch.randn_like(p))
        save(f"full{i}", expert)
        torch.manual_seed(100 + i)
        lora = LoraConfig(
            r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        )
        adapter = get_peft_model(_model(shape.vocab, shape.small, seed=1), lora)
        paths[f"lora{i}"] = root / f"lora{i}"
        adapter.save_pretrained(paths[f"lora{i}"])
    return paths


def family_config(paths: dict[str, Path], experts: int, device: str) -> dict:
    """Engine config with every full and LoRA expert (requests pick which ones run)."""
    names = [f"full{i}" for i in range(experts)] + [f"lora{i}" for i in range(experts)]
    return {
        "large": {"path": str(paths["large"]), "device": device},
        "small": {"path": str(paths["small"]), "device": device},
        "experts": [{"name": n, "path": str(paths[n]), "device": device} for n in names],
    }
