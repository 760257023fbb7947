"""FusionLogitsProcessor: fusion in vLLM's V1 logits-processor interface (the V1 model runner,
which vLLM's CPU worker runs).

Requests are named by their index in vLLM's persistent batch, which `update_state` follows
(added, removed, moved, swapped); each step, a request whose output grew by one has the small
models read its newest sampled token, and `fused_rows.FusedRows` does the rest (the fused step,
the small-model pool, admission). It needs each sampled token before the next step's logits, so
vLLM runs it with async scheduling off (`launch.engine_arguments`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from .fused_rows import FusedRequest, FusedRows, admitted_options, fusion_config


@dataclass(eq=False)  # slots are compared by identity
class _Slot:
    """One request of vLLM's persistent batch."""

    request: FusedRequest
    prompt: list[int]
    output: list[int]  # vLLM's live list of the request's generated ids

    @property
    def tokens(self) -> int:
        return len(self.prompt) + len(self.output)


class FusionLogitsProcessor(LogitsProcessor):
    """Fuses every request that names experts; other rows keep the large model's logits."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        admitted_options(sampling_params, fusion_config())

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.rows = FusedRows(fusion_config())
        self.slots: dict[int, _Slot] = {}  # batch index -> slot

    def is_argmax_invariant(self) -> bool:
        return False  # fusion changes which token is most likely

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.slots.pop(index, None)
        for index, params, prompt, output in batch_update.added:
            request = self.rows.admit(params)
            self.slots[index] = _Slot(request, list(prompt or []), output)
        for source, target, direction in batch_update.moved:
            moving = self.slots.pop(source, None)
            if direction == MoveDirectionality.SWAP:
                if target in self.slots:
                    self.slots[source] = self.slots.pop(target)
            else:
                self.slots.pop(target, None)
            if moving is not None:
                self.slots[target] = moving

    @torch.inference_mode()
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        fused = [
            (i, s) for i, s in sorted(self.slots.items()) if s.request.experts and i < len(logits)
        ]
        if not fused and not self.rows.pooled:
            return logits
        stepping: list[_Slot] = []
        joining = []
        for _, slot in fused:
            if slot.request.steps_to(slot.tokens):
                stepping.append(slot)
            else:
                joining.append((slot.request, slot.prompt, list(slot.output)))
        newest = torch.tensor([s.output[-1] for s in stepping], dtype=torch.long)
        self.rows.advance([s.request for s in stepping], newest, joining)
        return self.rows.fuse(
            logits,
            [i for i, _ in fused],
            [s.request for _, s in fused],
            [len(s.output) for _, s in fused],
        )
