"""FusionLogitsProcessorV2: fusion in Model Runner V2's logits-processor interface (vLLM's
default runner on GPUs).

vLLM names a request by its slot: `add_request(slot, params)` when it enters the batch (slots are
recycled through the runner's free list, so a slot's state is replaced whole there; a preempted
request comes back this way too). Each step's layout arrives in a `LogitsContext`: logits row b is
batch position b, of slot `idx_mapping_np[b]`, whose large model reads `input_ids[b]` at position
`pos[b]`. Per row, with n = `seq_lens_upper_bound_np[b]` = pos[b] + 1 tokens (exact without
speculative decoding; host side, so deciding reads no device value):
    n < prefill_len[slot]      a chunk of a prompt still being prefilled: vLLM samples nothing
                               there, the row is left alone;
    the pool read n - 1        the small models read `input_ids[b]`, the token the large model
                               reads this step (not the previous step's sample, which the host
                               has not seen yet under async scheduling);
    otherwise                  a request that joins, resumes after a preemption (prefill_len then
                               covers its output so far) or missed a step: prefilled on
                               `all_token_ids[slot, :n - 1]` + `input_ids[b]`, the first
                               prompt_len[slot] of them its prompt.
`fused_rows.FusedRows` does the rest (the fused step, the small-model pool, admission).
Speculative decoding (one row per draft token, drafts the small models would have to read and
roll back) is refused when vLLM builds the processor.
"""

from __future__ import annotations

import torch
from vllm.v1.worker.gpu.sample.logits_processor import (
    LogitsContext,
    LogitsProcessor,
    LogitsProcRequestState,
)

from ...core.errors import ConfigError
from .fused_rows import FusedRequest, FusedRows, admitted_options, fusion_config
from .launch import SPECULATIVE_DECODING_REFUSED


class FusionLogitsProcessorV2(LogitsProcessor):
    """Fuses every request that names experts; other rows keep the large model's logits."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        admitted_options(sampling_params, fusion_config())

    def __init__(self, vllm_config, req_states: LogitsProcRequestState):
        super().__init__(vllm_config, req_states)
        if vllm_config.speculative_config is not None:
            raise ConfigError(SPECULATIVE_DECODING_REFUSED)
        self.rows = FusedRows(fusion_config())
        self.req_states = req_states
        self.slots: dict[int, FusedRequest] = {}  # request slot -> its fused request

    def add_request(self, req_idx: int, sampling_params) -> bool:
        request = self.rows.admit(sampling_params)
        if request.experts:
            self.slots[req_idx] = request
        else:
            self.slots.pop(req_idx, None)
        return bool(request.experts)

    @torch.inference_mode()
    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        prefill_len = self.req_states.prefill_len.np
        fused = []  # (row, slot, request, tokens)
        for b, slot in enumerate(ctx.idx_mapping_np.tolist()):
            request = self.slots.get(slot)
            tokens = int(ctx.seq_lens_upper_bound_np[b])
            if request is not None and tokens >= prefill_len[slot]:
                fused.append((b, slot, request, tokens))
        if not fused and not self.rows.pooled:
            return logits
        stepping: list[tuple[int, FusedRequest]] = []
        joining = []
        for b, slot, request, tokens in fused:
            if request.steps_to(tokens):
                stepping.append((b, request))
            else:
                joining.append((request, *self._history(slot, tokens, ctx.input_ids[b])))
        at = torch.tensor([b for b, _ in stepping], dtype=torch.long, device=ctx.input_ids.device)
        newest = ctx.input_ids[at].long()  # [S] on the device: no host read
        self.rows.advance([request for _, request in stepping], newest, joining)
        prompt_len = self.req_states.prompt_len.np
        return self.rows.fuse(
            logits,
            [b for b, _, _, _ in fused],
            [request for _, _, request, _ in fused],
            [tokens - int(prompt_len[slot]) for _, slot, _, tokens in fused],
        )

    def _history(self, slot: int, tokens: int, newest: torch.Tensor) -> tuple[list[int], list[int]]:
        """(prompt, output so far) of the request in `slot` whose large model reads its
        `tokens`-th token, `newest`, this step."""
        ids = self.req_states.all_token_ids.gpu[slot, : tokens - 1].tolist() + [int(newest)]
        split = int(self.req_states.prompt_len.np[slot])
        return ids[:split], ids[split:]
