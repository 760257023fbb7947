"""FusedRows: the core both vLLM logits processors share (V1 runner and Model Runner V2).

vLLM computes the large model's logits for every scheduled request (its own paged KV cache and
scheduler); before sampling, a processor hands this core the step's fused requests and
    1. `advance`: brings the small base and its experts to each request's tokens
       (`pool.SmallPool`: per-request KV caches, one batched forward per model per step): a request
       whose count grew by one reads its newest token, a request that joins, or whose count moved
       otherwise (a preemption resumed, a step it was not scheduled for), is prefilled on its
       prompt and output so far; the pool then holds exactly this step's fused requests,
    2. `fuse`: replaces each request's logits row by `fusion.fusion_step` of the large row, the
       small base and the experts (the pure function the HF backend uses), over the common
       vocabulary; ids beyond it get -inf,
and vLLM then applies temperature / top-k / top-p and samples, as the HF backend does after fusion.
The processors differ only in how vLLM names a request (a persistent-batch index in V1, a request
slot in V2) and where its tokens are read (the live output list in V1, the step's input ids and the
runner's token buffer in V2).

Per request, through `SamplingParams.extra_args` (`vllm_xargs` in an OpenAI request body):
    experts      expert names (default: every configured expert; [] the large model alone)
    fusion_mode  none | static | paper | dynamic (default: the config's mode)
Unknown names, and prompt log-probabilities on a fused request, are refused when the request is
admitted (`admitted_options`: an HTTP 400 on vLLM's server).

The fusion config is read from FUSION_LLM_CONFIG (a config file path or its JSON text), which
`fusion-llm serve` and the engine's vLLM backend set before vLLM starts its processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch

from ...core.config import FusionConfig
from ...core.errors import ConfigError, RequestError
from ...runtime.pool import SmallPool
from ...runtime.rows import RowId, RowPrompt
from ...runtime.step import ConfigSolvers, fuse_rows
from ...runtime.validation import expert_list, fusion_mode
from .channel import CHANNEL_KEY, CHANNELS, CHANNELS_LOCK, RowChannel, StepTrace
from .launch import CONFIG_ENV, small_models

PROMPT_LOGPROBS_REFUSED = (
    "prompt_logprobs (also asked by echo with logprobs): vLLM computes prompt log-probabilities "
    "from the large model alone, so on a fused request they would be the large model's, not the "
    "fused ones; score a text under the fused model with FusionEngine.score or the lm-eval model "
    'fusion_llm.eval.harness.FusionLM, or send vllm_xargs {"experts": []} (or '
    '{"fusion_mode": "none"}) for the large model\'s'
)


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


def admitted_options(params, config: FusionConfig) -> tuple[list[str], str]:
    """`request_options` of a request's `SamplingParams`, refusing prompt log-probabilities on a
    fused request: vLLM computes them from the large model's logits, which no logits processor
    sees (`PROMPT_LOGPROBS_REFUSED`)."""
    experts, mode = request_options(params.extra_args, config)
    if experts and (
        params.prompt_logprobs is not None or params.prompt_logprob_token_ids is not None
    ):
        raise RequestError(PROMPT_LOGPROBS_REFUSED)
    return experts, mode


@dataclass(eq=False)  # requests are compared by identity
class FusedRequest:
    """One request as the small-model pool sees it."""

    row: RowId  # its id in the pool (a new one each time vLLM adds the request)
    experts: list[str]  # [] : the large model alone
    mode: str
    channel: RowChannel | None  # the in-process backend's: renderings in, alpha out
    read: int = 0  # tokens the pool has read for it (0: not in the pool)

    def steps_to(self, tokens: int) -> bool:
        """Whether the pool reaches `tokens` (the large model's count, newest included) by
        reading one more token; otherwise the request is prefilled again."""
        return self.read > 0 and tokens == self.read + 1


class FusedRows:
    """See the module docstring."""

    def __init__(self, config: FusionConfig):
        self.config = config
        self.models = small_models(config.model_dump_json())
        self.pool = SmallPool(self.models)
        self.pooled: dict[RowId, FusedRequest] = {}  # the requests the pool holds, by row
        self._solvers = ConfigSolvers(config)
        self._next_row = 0

    def admit(self, params) -> FusedRequest:
        """A new request of vLLM's batch (`SamplingParams`), with a row id of its own."""
        experts, mode = admitted_options(params, self.config)
        with CHANNELS_LOCK:
            channel = CHANNELS.get(str((params.extra_args or {}).get(CHANNEL_KEY)))
        request = FusedRequest(RowId(self._next_row), experts, mode, channel)
        self._next_row += 1
        return request

    def advance(
        self,
        stepping: Sequence[FusedRequest],
        tokens: torch.Tensor,
        joining: Sequence[tuple[FusedRequest, list[int], list[int]]],
    ) -> None:
        """Bring the pool to this step: `stepping[b]` reads `tokens[b]` ([S], on any device);
        each `(request, prompt, output)` of `joining` is prefilled on its prompt then its output
        so far; every other row leaves the pool."""
        keep = {r.row: r for r in stepping}
        if self.pooled.keys() != keep.keys():  # requests that left, missed a step, or moved
            self.pool.keep_rows(keep)
            for row, request in self.pooled.items():
                if row not in keep:
                    request.read = 0  # out of the pool: prefilled if it comes back
        if stepping:
            self.pool.step([r.row for r in stepping], tokens)
            for request in stepping:
                request.read += 1
        if joining:
            fresh = SmallPool(self.models)
            fresh.prefill([_row_prompt(*entry) for entry in joining])
            self.pool.extend(fresh)
            for request, prompt, output in joining:
                request.read = len(prompt) + len(output)
        self.pooled = keep | {r.row: r for r, _, _ in joining}

    def fuse(
        self,
        logits: torch.Tensor,
        index: Sequence[int],
        requests: Sequence[FusedRequest],
        outputs: Sequence[int],
    ) -> torch.Tensor:
        """logits[index[b]] <- the fused row of `requests[b]` (in place; returned), each read by
        the pool up to the token the large row follows; `outputs[b]`: the output position that
        row samples (where its channel records the step)."""
        if not requests:
            return logits
        at = torch.tensor(index, device=logits.device)
        rows = logits[at]  # one gather: fused from, then overwritten and scattered back
        columns = list(dict.fromkeys(e for r in requests for e in r.experts))
        step = fuse_rows(
            rows,
            self.pool,
            [r.row for r in requests],
            [r.experts for r in requests],
            [r.mode for r in requests],
            columns,
            self._solvers,
        )
        vocab = self.models.vocab_size
        rows[:, :vocab] = step.logits.to(rows)
        rows[:, vocab:] = -torch.inf  # ids beyond the common vocabulary: no fused probability
        logits[at] = rows
        self._record(requests, outputs, columns, step)
        return logits

    def _record(self, requests, outputs, columns: list[str], step) -> None:
        """The step's trace of requests with a channel (one host read, only when there is one)."""
        traced = [b for b, r in enumerate(requests) if r.channel is not None]
        if not traced:
            return
        flags = [f.float()[:, None] for f in (step.fallback, step.fault)]
        packed = torch.cat([*flags, step.alpha.float()], dim=1).tolist()  # [B, 2 + T]
        with CHANNELS_LOCK:
            for b in traced:
                fallback, fault, *alpha = packed[b]
                own = [alpha[columns.index(e)] for e in requests[b].experts]
                requests[b].channel.steps[outputs[b]] = StepTrace(own, bool(fallback), bool(fault))


def _row_prompt(request: FusedRequest, prompt: list[int], output: list[int]) -> RowPrompt:
    """The request as the small models read it: their prompt (the channel's renderings, else
    vLLM's prompt), then the output so far."""
    channel = request.channel
    small = channel.small if channel is not None else prompt
    renderings = channel.experts if channel is not None else {}
    return RowPrompt(
        row=request.row,
        large=[],
        small=small + output,
        experts=request.experts,
        expert_prompts={e: ids + output for e, ids in renderings.items() if e in request.experts},
    )
