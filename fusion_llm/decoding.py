"""Lock-step KV-cached decoding of the large model, the small base and the experts.

Pipeline of one request batch:
    1. prefill: every model reads its own rendering of each prompt (left padded) into its own cache;
    2. decode one step: fuse the last logits (`fusion.fusion_step`), sample one token per row;
    3. every model consumes that same token; rows that hit EOS, a stop string or the token budget
       leave the batch (their cache rows are dropped, so they cost nothing afterwards);
    4. repeat until no row is left.
`decode` is a generator of `Step`s; batch generation and streaming both consume it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from transformers import DynamicCache, LogitsProcessorList, StopStringCriteria
from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .config import GenerationSpec
from .fusion import AlphaSolver, FusedStep, fusion_step
from .models import BASE_ADAPTER, LoadedModel, ModelSet

Tensor = torch.Tensor
GREEDY_TEMPERATURE = 1e-5


class CacheRunner:
    """One model and its KV cache over a batch of rows that can shrink."""

    def __init__(self, loaded: LoadedModel, adapter_names: list[str] | None = None):
        self.loaded = loaded
        self.adapter_names = adapter_names  # one per row, for a mixed-LoRA peft batch
        self.cache = DynamicCache(config=loaded.model.config)
        self.attention_mask: Tensor | None = None  # [N, L]
        self.next_position: Tensor | None = None  # [N]

    def prefill(self, prompts: Sequence[Sequence[int]]) -> Tensor:
        """Left-pad the prompts, run them, return the logits of each row's last token [N, V]."""
        device = self.loaded.input_device
        pad = self.loaded.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        self.attention_mask = mask.to(device)
        positions = (self.attention_mask.cumsum(-1) - 1).clamp(min=0)
        self.next_position = self.attention_mask.sum(-1)
        return self._forward(ids.to(device), positions)

    def step(self, tokens: Tensor) -> Tensor:
        """Consume one token per row ([N]), return the next logits [N, V]."""
        device = self.loaded.input_device
        ones = torch.ones_like(self.attention_mask[:, :1])
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=-1)
        positions = self.next_position[:, None]
        self.next_position = self.next_position + 1
        return self._forward(tokens.to(device)[:, None], positions)

    def keep(self, rows: Tensor) -> None:
        """Drop every row not in `rows` (indices into the current batch)."""
        rows = rows.to(self.attention_mask.device)
        self.cache.batch_select_indices(rows)
        self.attention_mask = self.attention_mask[rows]
        self.next_position = self.next_position[rows]
        if self.adapter_names is not None:
            self.adapter_names = [self.adapter_names[i] for i in rows.tolist()]

    def _forward(self, ids: Tensor, positions: Tensor) -> Tensor:
        extra = {"adapter_names": self.adapter_names} if self.adapter_names is not None else {}
        out = self.loaded.model(
            input_ids=ids,
            attention_mask=self.attention_mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        return out.logits[:, -1, :]


class SmallPool:
    """The small base and the active experts of one request: LoRA experts as rows of ONE forward.

    Rows of the peft forward are laid out expert-major: [base rows, lora_1 rows, lora_2 rows, ...].
    Full-checkpoint experts each run their own model and cache.
    """

    def __init__(self, models: ModelSet, experts: Sequence[str], batch: int):
        self.experts = list(experts)
        self.vocab = models.vocab_size  # experts may have extra (special) ids: fuse the common ones
        lora = [e for e in self.experts if e in models.lora_experts]
        names = (
            [BASE_ADAPTER, *(models.lora_experts[e] for e in lora)] if models.lora_experts else None
        )
        self.lora_count = len(lora)
        self.shared = CacheRunner(
            models.small, None if names is None else [n for n in names for _ in range(batch)]
        )
        self.full = {e: CacheRunner(models.full_experts[e]) for e in self.experts if e not in lora}
        self.lora_order = lora
        self.batch = batch

    def prefill(
        self,
        small_prompts: Sequence[Sequence[int]],
        expert_prompts: dict[str, Sequence[Sequence[int]]],
    ) -> tuple[Tensor, Tensor]:
        shared_prompts = list(small_prompts)
        for name in self.lora_order:
            shared_prompts.extend(expert_prompts.get(name, small_prompts))
        shared = self.shared.prefill(shared_prompts)
        full = {e: r.prefill(expert_prompts.get(e, small_prompts)) for e, r in self.full.items()}
        return self._split(shared, full)

    def step(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        shared = self.shared.step(tokens.repeat(1 + self.lora_count))
        full = {e: r.step(tokens) for e, r in self.full.items()}
        return self._split(shared, full)

    def keep(self, rows: Tensor) -> None:
        self.shared.keep(torch.cat([rows + k * self.batch for k in range(1 + self.lora_count)]))
        for runner in self.full.values():
            runner.keep(rows)
        self.batch = rows.numel()

    def _split(self, shared: Tensor, full: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(small base logits [B, V], expert logits [B, T, V] in `self.experts` order)."""
        blocks = shared.view(1 + self.lora_count, self.batch, -1)[..., : self.vocab]
        by_name = {name: blocks[1 + k] for k, name in enumerate(self.lora_order)}
        by_name.update({e: z[:, : self.vocab].to(blocks.device) for e, z in full.items()})
        return blocks[0], torch.stack([by_name[e] for e in self.experts], dim=1)


@dataclass
class PromptBatch:
    """Token ids of each prompt as each model reads it (per-model renderings)."""

    large: list[list[int]]
    small: list[list[int]]
    experts: dict[str, list[list[int]]] = field(default_factory=dict)


@dataclass
class Step:
    """What one decoding step produced for the rows still running."""

    rows: list[int]  # original row indices, aligned with the tensors below
    tokens: list[int]
    alpha: Tensor  # [n, T] on CPU
    fallback: list[bool]
    # row -> "eos" | "stop" | "length" | "cancelled" | "fault" (no finite large logit)
    finished: dict[int, str] = field(default_factory=dict)


def build_sampler(spec: GenerationSpec) -> Callable[[Tensor, Tensor], Tensor]:
    """Greedy when temperature is (about) 0, else transformers' warpers, then multinomial with a
    seeded generator. Below 1e-5 dividing by the temperature overflows: that is greedy anyway."""
    if spec.temperature < GREEDY_TEMPERATURE:
        return lambda logits, _ids: logits.argmax(dim=-1)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(spec.temperature)])
    if spec.top_k is not None:
        warpers.append(TopKLogitsWarper(spec.top_k))
    if spec.top_p < 1.0:
        warpers.append(TopPLogitsWarper(spec.top_p))
    generator: torch.Generator | None = None

    def sample(logits: Tensor, ids: Tensor) -> Tensor:
        nonlocal generator
        if generator is None:
            generator = torch.Generator(device=logits.device)
            # Unseeded: a fresh seed of our own (torch.seed() would re-seed the global RNG).
            generator.manual_seed(spec.seed if spec.seed is not None else secrets.randbits(63))
        probs = torch.softmax(warpers(ids, logits), dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    return sample


def stop_checker(tokenizer, stops: Sequence[str]) -> Callable[[Tensor], list[bool]]:
    """generated ids [B, n] -> per row, whether its text now contains a stop string.

    transformers' StopStringCriteria handles multi-token stops from the token table alone; for
    tokenizers it cannot read (e.g. without a byte-level or metaspace decoder) the tail of each
    row's text is decoded instead.
    """
    if not stops:
        return lambda generated: [False] * generated.shape[0]
    criteria = _stop_criteria(tokenizer, tuple(stops))
    if criteria is None:
        # A stop can only complete within its last len(stop) tokens (each token is >= 1 char).
        window = max(len(s) for s in stops) + 1

        def decoded_tail(generated: Tensor) -> list[bool]:
            texts = tokenizer.batch_decode(
                generated[:, -window:].tolist(), skip_special_tokens=True
            )
            return [any(s in text for s in stops) for text in texts]

        return decoded_tail
    return lambda generated: criteria(generated, None).tolist()


@lru_cache(maxsize=128)
def _stop_criteria(tokenizer, stops: tuple[str, ...]) -> StopStringCriteria | None:
    """One StopStringCriteria per (tokenizer, stops): building one scans the whole vocabulary
    (seconds at 150 k ids), its calls keep no state. None where it cannot read the tokenizer."""
    try:
        return StopStringCriteria(tokenizer, list(stops))
    except ValueError:
        return None


@dataclass
class DecodeBatch:
    """Rows to decode together: prompts per model, experts, and each row's budget and stops."""

    prompts: PromptBatch
    experts: list[str]
    max_new_tokens: list[int]
    stops: list[tuple[str, ...]]
    active: Tensor | None = None  # [B, T] which experts fuse in each row; None: all of them


@torch.no_grad()
def decode(
    models: ModelSet,
    batch: DecodeBatch,
    solver: AlphaSolver | None,
    sampling: GenerationSpec,
    eos_ids: set[int],
    cancelled: set[int] | None = None,
) -> Iterator[Step]:
    """Generate for every row in lock step; yields one `Step` per decoding step.

    `solver(large_logp, shifts, active) -> alpha` picks alpha; `solver=None` runs the large model
    alone (no small forward at all). `sampling` gives temperature / top-k / top-p / seed for all
    rows. Rows whose index is added to `cancelled` leave at the next step (reason "cancelled").
    """
    size = len(batch.prompts.large)
    vocab = models.vocab_size
    device = models.large.input_device
    large = CacheRunner(models.large)
    pool = SmallPool(models, batch.experts, size) if solver is not None else None
    sample = build_sampler(sampling)
    checkers = {s: stop_checker(models.large.tokenizer, s) for s in set(batch.stops)}
    rows = torch.arange(size)  # original index of each live row
    generated = torch.zeros((size, 0), dtype=torch.long, device=device)
    active = batch.active if batch.active is not None else torch.ones(size, len(batch.experts))
    active = active.to(device=device, dtype=torch.bool)
    cancelled = cancelled if cancelled is not None else set()

    large_logits = large.prefill(batch.prompts.large)
    if pool is not None:
        small_logits, expert_logits = pool.prefill(batch.prompts.small, batch.prompts.experts)
    for count in range(1, max(batch.max_new_tokens) + 1):
        fused: FusedStep = fusion_step(
            large_logits[:, :vocab],
            None if pool is None else small_logits.to(device),
            None if pool is None else expert_logits.to(device),
            active,
            solver,
        )
        tokens = sample(fused.logits, generated)
        generated = torch.cat([generated, tokens[:, None]], dim=-1)

        live = rows.tolist()
        token_list = tokens.tolist()
        faults = fused.fault.tolist()
        stopped = _stopped(checkers, generated, [batch.stops[r] for r in live])
        finished: dict[int, str] = {}
        for i, (row, token) in enumerate(zip(live, token_list, strict=True)):
            if faults[i]:
                finished[i] = "fault"
            elif row in cancelled:
                finished[i] = "cancelled"
            elif token in eos_ids:
                finished[i] = "eos"
            elif stopped[i]:
                finished[i] = "stop"
            elif count >= batch.max_new_tokens[row]:
                finished[i] = "length"
        yield Step(
            rows=live,
            tokens=token_list,
            alpha=fused.alpha.cpu(),
            fallback=fused.fallback.tolist(),
            finished={live[i]: reason for i, reason in finished.items()},
        )
        if len(finished) == len(live):
            return
        if finished:
            # Finished rows leave every cache: they cost nothing from the next step on.
            keep = torch.tensor([i for i in range(len(live)) if i not in finished])
            rows = rows[keep]
            tokens, generated, active = (t[keep.to(device)] for t in (tokens, generated, active))
            large.keep(keep)
            if pool is not None:
                pool.keep(keep)
        large_logits = large.step(tokens)
        if pool is not None:
            small_logits, expert_logits = pool.step(tokens)


def _stopped(checkers, generated: Tensor, stops: list[tuple[str, ...]]) -> list[bool]:
    """Per live row, whether its own stop strings now occur; one check per distinct stop list."""
    result = [False] * len(stops)
    for key, check in checkers.items():
        positions = [i for i, s in enumerate(stops) if s == key]
        if key and positions:
            index = torch.tensor(positions, device=generated.device)
            for i, hit in zip(positions, check(generated[index]), strict=True):
                result[i] = hit
    return result
