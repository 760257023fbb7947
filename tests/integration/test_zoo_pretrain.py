"""Pretraining's block schedule: short blocks, then the context window for the last share of steps."""

import torch

from fusion_llm.zoo.scales import get_scale
from fusion_llm.zoo.tokenizer import train_tokenizer
from fusion_llm.zoo.train import new_base, pretrain
from fusion_llm.zoo.world import make_world


def test_pretraining_reads_short_blocks_then_window_blocks_of_one_document_stream():
    scale = get_scale("toy")
    world = make_world(0, scale.n_people, n_misconceptions=scale.n_misconceptions)
    tokenizer = train_tokenizer(world, scale.vocab_size, scale.n_eval)
    model = new_base(scale.sizes["small"], tokenizer, scale.window, seed=0)
    assert model.config.max_position_embeddings == scale.window  # the window it reports
    seen: list[torch.Tensor] = []
    model.model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True
    )
    pretrain(model, world, tokenizer, scale, steps=10, lr=1e-3, desc="schedule")
    shapes = [tuple(ids.shape) for ids in seen]
    window_steps = round(10 * scale.window_share)
    assert window_steps >= 1
    assert (
        shapes
        == [(scale.block_batch_size, scale.block_len)] * (10 - window_steps)
        + [(scale.window_batch_size, scale.window)] * window_steps
    )
    text = tokenizer.decode(seen[-1][0])
    assert tokenizer.eos_token in text and tokenizer.bos_token in text  # documents packed together
