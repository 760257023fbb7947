"""The one BPE tokenizer every zoo model shares.

Why names are masked while training it: a name seen thousands of times would become one token, and a
model could then store each person's facts in that token's embedding row (lesson 3 of issue 3). The
trainer sees every name and creature only once, so BPE splits them into syllable pieces shared
across many words, and knowledge has to live in the network. Cities are values, not keys: they stay
unmasked and become one token each, like the jobs, pets and colours they sit beside (a city spread
over syllable pieces was the hardest fact to recall for every base).
"""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fusion_llm.zoo.corpus import pretraining_pass
from fusion_llm.zoo.world import World

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# Chat in the question format of the zoo's QA tasks (`Question: ...\nAnswer:`, as the experts were
# fine-tuned): a user turn is a question, the reply its answer, a system message a line of its own
# (the models were never trained on roles). `summary` prompts (`Article:`) are not chat.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}Question: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}Answer: {{ m['content'] }}\n"
    "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Answer:{% endif %}"
)


def _tokenizer_texts(world: World, n_eval: int) -> list[str]:
    """One corpus pass with every name and creature replaced by "someone", plus each of them once."""
    rare = [p.name for p in world.people] + [m.creature for m in world.misconceptions]
    pattern = re.compile("|".join(re.escape(w) for w in sorted(rare, key=len, reverse=True)))
    texts = [pattern.sub("someone", doc) for doc in pretraining_pass(world, 0, n_eval)]
    return texts + rare


def train_tokenizer(world: World, vocab_size: int, n_eval: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_texts(world, n_eval), trainer)
    # BPE stops merging before `vocab_size` (min_frequency keeps names split); reserved ids fill the
    # rest so that the tokenizer's length equals every model's embedding rows.
    tok.add_special_tokens([f"<reserved_{i}>" for i in range(vocab_size - tok.get_vocab_size())])
    # Every sequence starts with BOS, in pretraining as in any prompt a user sends.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="left"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """Writes tokenizer.json and the config files `AutoTokenizer.from_pretrained` needs."""
    tokenizer.save_pretrained(directory)


def load_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(directory)
