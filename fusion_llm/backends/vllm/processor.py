"""FusionLogitsProcessor: vLLM's large-model logits fused with the small-model pool, per request.

vLLM computes the large model's logits for every running request (its own paged KV cache and
scheduler); before sampling, this processor
    1. feeds each fused request's newest token to the small base and its experts
       (`pool.SmallPool`: per-slot KV caches, one batched forward per model per step; a request
       that joins is prefilled on its prompt, plus its output so far after a preemption),
    2. replaces the request's logits row by `fusion.fusion_step` of the large row, the small base
       and the experts (the pure function the HF backend uses), over the common vocabulary,
and vLLM then applies temperature / top-k / top-p and samples, as the HF backend does after fusion.

Per request, through `SamplingParams.extra_args` (`vllm_xargs` in an OpenAI request body):
    experts      expert names (default: every configured expert; [] the large model alone)
    fusion_mode  none | static | paper | dynamic (default: the config's mode)
Unknown names are rejected when the request is admitted (an HTTP 400 naming the configured ones).

The fusion config is read from FUSION_LLM_CONFIG (a config file path or its JSON text), which
`fusion-llm serve` and the engine's vLLM backend set before vLLM starts its processes. This is
vLLM's V1 logits-processor interface: CPU workers use it, GPU workers with
VLLM_USE_V2_MODEL_RUNNER=0 (set by both launchers).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from ...core.config import FusionConfig
from ...core.errors import ConfigError, RequestError
from ...runtime.pool import SmallPool
from ...runtime.rows import RowPrompt
from ...runtime.step import ConfigSolvers, fuse_rows
from ...runtime.validation import expert_list, fusion_mode
from .channel import CHANNEL_KEY, CHANNELS, CHANNELS_LOCK, RowChannel, StepTrace
from .launch import CONFIG_ENV, small_models


def fusion_config() -> FusionConfig:
    """The config named by FUSION_LLM_CONFIG."""
    source = os.environ.get(CONFIG_ENV, "").strip()
    if not source:
        msg = (
            f"{CONFIG_ENV} is not set: vLLM's fusion logits processor needs the fusion config "
            "(start the server with `fusion-llm serve --config F`, or set it to the config's path)"
        )
        raise ConfigError(msg)
    return _config_from(source)


@cache
def _config_from(source: str) -> FusionConfig:
    return FusionConfig.load(json.loads(source) if source.startswith("{") else source)


def request_options(extra_args: dict | None, config: FusionConfig) -> tuple[list[str], str]:
    """(experts, mode) of one request, validated as the engine validates its calls; the errors
    are ValueErrors, which vLLM answers with a 400."""
    extra = extra_args or {}
    try:
        mode = fusion_mode(extra.get("fusion_mode"), config.fusion.mode)
    except RequestError as err:
        raise RequestError(f"vllm_xargs.fusion_mode: {err}") from None
    try:
        experts = expert_list(extra.get("experts"), config.expert_names)
    except RequestError as err:
        raise type(err)(f"vllm_xargs.experts: {err}") from None
    return ([] if mode == "none" else experts), mode


@dataclass(eq=False)  # slots are compared by identity
class _Slot:
    """One request of vLLM's persistent batch, as the small-model pool sees it."""

    row: int  # its id in the pool
    experts: list[str]
    mode: str
    prompt: list[int]
    output: list[int]  # vLLM's live list of the request's generated ids
    channel: RowChannel | None  # the in-process backend's: renderings in, alpha out
    read: int = 0  # tokens the pool has read for it (0: not in the pool)

    @property
    def tokens(self) -> int:
        return len(self.prompt) + len(self.output)


class FusionLogitsProcessor(LogitsProcessor):
    """Fuses every request that names experts; other rows keep the large model's logits."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        request_options(sampling_params.extra_args, fusion_config())

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.config = fusion_config()
        self.models = small_models(self.config.model_dump_json())
        self.pool = SmallPool(self.models)
        self.slots: dict[int, _Slot] = {}  # batch index -> slot
        self.leaving: set[int] = set()  # pool rows of requests that left the batch
        self._next_row = 0
        self._solvers = ConfigSolvers(self.config)

    def is_argmax_invariant(self) -> bool:
        return False  # fusion changes which token is most likely

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._vacate(index)
        for index, params, prompt, output in batch_update.added:
            self._vacate(index)
            experts, mode = request_options(params.extra_args, self.config)
            with CHANNELS_LOCK:
                channel = CHANNELS.get(str((params.extra_args or {}).get(CHANNEL_KEY)))
            self.slots[index] = _Slot(
                self._next_row, experts, mode, list(prompt or []), output, channel
            )
            self._next_row += 1
        for source, target, direction in batch_update.moved:
            moving = self.slots.pop(source, None)
            if direction == MoveDirectionality.SWAP:
                if target in self.slots:
                    self.slots[source] = self.slots.pop(target)
            else:
                self._vacate(target)
            if moving is not None:
                self.slots[target] = moving

    def _vacate(self, index: int) -> None:
        slot = self.slots.pop(index, None)
        if slot is not None and slot.read:
            self.leaving.add(slot.row)

    @torch.inference_mode()
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        fused = [(i, s) for i, s in sorted(self.slots.items()) if s.experts and i < len(logits)]
        if not fused and not self.leaving:
            return logits
        self._feed([s for _, s in fused])
        if not fused:
            return logits
        index = torch.tensor([i for i, _ in fused], device=logits.device)
        rows = logits[index]  # one gather: fused from, then overwritten and scattered back
        slots = [s for _, s in fused]
        columns = list(dict.fromkeys(e for s in slots for e in s.experts))
        step = fuse_rows(
            rows,
            self.pool,
            [s.row for s in slots],
            [s.experts for s in slots],
            [s.mode for s in slots],
            columns,
            self._solvers,
        )
        vocab = self.models.vocab_size
        rows[:, :vocab] = step.logits.to(rows)
        rows[:, vocab:] = -torch.inf  # ids beyond the common vocabulary: no fused probability
        logits[index] = rows
        self._record(slots, columns, step)
        return logits

    def _feed(self, slots: Sequence[_Slot]) -> None:
        """Bring the pool to every slot's current tokens: one step for each slot that gained one
        token since the last step; a prefill for new slots (and, rarely, a slot whose count moved
        otherwise: a chunked prefill or a resumed preemption)."""
        stepping = [s for s in slots if s.read and s.tokens == s.read + 1]
        if self.leaving or len(stepping) != sum(1 for s in slots if s.read):
            self.pool.keep_rows({s.row for s in stepping})
            self.leaving.clear()
            for s in slots:
                if s.read and s not in stepping:
                    s.read = 0
        if stepping:
            self.pool.step(
                [s.row for s in stepping], torch.tensor([s.output[-1] for s in stepping])
            )
            for s in stepping:
                s.read += 1
        joining = [s for s in slots if not s.read]
        if joining:
            fresh = SmallPool(self.models)
            fresh.prefill([_row_prompt(s) for s in joining])
            self.pool.extend(fresh)
            for s in joining:
                s.read = s.tokens

    def _record(self, slots: Sequence[_Slot], columns: list[str], step) -> None:
        """The step's trace of slots with a channel (one host read, only when there is one)."""
        traced = [(b, s) for b, s in enumerate(slots) if s.channel is not None]
        if not traced:
            return
        flags = [f.float()[:, None] for f in (step.fallback, step.fault)]
        packed = torch.cat([*flags, step.alpha.float()], dim=1).tolist()  # [B, 2 + T]
        with CHANNELS_LOCK:
            for b, slot in traced:
                fallback, fault, *alpha = packed[b]
                own = [alpha[columns.index(e)] for e in slot.experts]
                slot.channel.steps[len(slot.output)] = StepTrace(own, bool(fallback), bool(fault))


def _row_prompt(slot: _Slot) -> RowPrompt:
    """The slot as the small models read it: their prompt (the channel's renderings, else vLLM's
    prompt), then the output so far."""
    output = list(slot.output)
    channel = slot.channel
    small = channel.small if channel is not None else slot.prompt
    renderings = channel.experts if channel is not None else {}
    return RowPrompt(
        row=slot.row,
        large=[],
        small=small + output,
        experts=slot.experts,
        expert_prompts={e: ids + output for e, ids in renderings.items() if e in slot.experts},
    )
