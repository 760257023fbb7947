"""The sampler stage: fused logits [B, V] -> one token per row, each row under its own settings.

A `SamplingBatch` holds every row's settings as tensors [B] (temperature, top-k, top-p), built when
rows join and filtered / extended with the running rows, and each sampled row's own generator.
`sample` runs one step for the whole batch:
    1. greedy: argmax for every row; a batch without sampled rows stops here;
    2. the sampled rows alone, in float32 (a grammar's mask is already in the fused logits:
       `DecodeBatch.fuse` applies it before and after fusion);
    3. temperature: z / T per row;
    4. top-k, then top-p, on one ascending sort: top-k keeps the k largest logits (ties at the k-th
       stay), top-p the smallest set of most likely tokens whose mass is >= p (never empty);
    5. the probabilities softmax(z);
    6. draw: each sampled row from its probabilities with its own generator, seeded once per row
       (`row_seeds`), so a seed reproduces its row whatever else shares the batch.
`token_logprobs` then reads, for the rows that ask (`GenerationSpec.logprobs`), the distribution
a token was drawn from, defined as the fused distribution after constraints (step 2) and before
steps 3-4:
    log p(v) = log_softmax(z_fused)[v]    (float32, z_fused: the fused logits [B, V])
the chosen token's and the k most likely tokens' (k: the largest any row asks; each row keeps
its own). Temperature, top-k and top-p shape the draw, not the reported distribution, so a
greedy row's token is the top-1 of its own report.
Only step 6 loops over rows (a generator draws for one row at a time). A temperature below
`GREEDY_TEMPERATURE` is greedy: dividing by it would overflow, and the argmax is the limit anyway.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.config import SEED_LIMIT, GenerationSpec

Tensor = torch.Tensor
GREEDY_TEMPERATURE = 1e-5


def row_seeds(spec: GenerationSpec, rows: int) -> list[int | None]:
    """Row i samples with seed + i (None on greedy rows). Without a seed, one is drawn now, so a
    rerun of the same rows (after a fault) repeats them."""
    if spec.temperature < GREEDY_TEMPERATURE:
        return [None] * rows
    base = spec.seed if spec.seed is not None else secrets.randbits(63)
    return [(base + i) % SEED_LIMIT for i in range(rows)]


@dataclass
class SamplingBatch:
    """Per-row sampling settings, aligned by position with the running rows (CPU tensors: rows
    join and leave without reading the device)."""

    seeds: list[int | None]  # None: a greedy row
    temperature: Tensor  # [B] float32
    top_k: Tensor  # [B] int64; 0: no limit
    top_p: Tensor  # [B] float32; 1: no limit
    generators: list[torch.Generator | None]  # a sampled row's own, made at its first draw
    logprobs: list[int | None]  # alternatives a row reports; None: no log-probabilities

    @classmethod
    def of(cls, specs: Sequence[GenerationSpec], seeds: Sequence[int | None]) -> SamplingBatch:
        """The settings of rows with `specs[b]` and `seeds[b]` (a sampled row needs a seed)."""
        greedy = [s.temperature < GREEDY_TEMPERATURE for s in specs]
        if any(seed is None and not g for seed, g in zip(seeds, greedy, strict=True)):
            raise ValueError("every sampled row needs a seed: draw them with row_seeds()")
        return cls(
            seeds=[None if g else seed for seed, g in zip(seeds, greedy, strict=True)],
            temperature=torch.tensor([s.temperature for s in specs], dtype=torch.float32),
            top_k=torch.tensor([s.top_k or 0 for s in specs], dtype=torch.long),
            top_p=torch.tensor([s.top_p for s in specs], dtype=torch.float32),
            generators=[None] * len(specs),
            logprobs=[s.logprobs for s in specs],
        )

    @property
    def sampled(self) -> list[int]:
        """Positions of the rows that sample (the others are greedy)."""
        return [b for b, seed in enumerate(self.seeds) if seed is not None]

    @property
    def reporting(self) -> list[int]:
        """Positions of the rows that report log-probabilities."""
        return [b for b, k in enumerate(self.logprobs) if k is not None]

    def filter(self, positions: Sequence[int]) -> None:
        """Keep the rows at `positions`, in that order."""
        index = torch.tensor(positions, dtype=torch.long)
        self.seeds = [self.seeds[i] for i in positions]
        self.generators = [self.generators[i] for i in positions]
        self.logprobs = [self.logprobs[i] for i in positions]
        self.temperature, self.top_k, self.top_p = (
            self.temperature[index], self.top_k[index], self.top_p[index],
        )  # fmt: skip

    def extend(self, other: SamplingBatch) -> None:
        """Append `other`'s rows."""
        self.seeds += other.seeds
        self.generators += other.generators
        self.logprobs += other.logprobs
        self.temperature = torch.cat([self.temperature, other.temperature])
        self.top_k = torch.cat([self.top_k, other.top_k])
        self.top_p = torch.cat([self.top_p, other.top_p])

    def generator(self, position: int, device: torch.device) -> torch.Generator:
        """The row's own generator, seeded at its first draw."""
        if self.generators[position] is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seeds[position])
            self.generators[position] = generator
        return self.generators[position]


def sample(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """logits [B, V] -> tokens [B]: steps 1-6 of the module docstring."""
    tokens = logits.argmax(dim=-1)  # [B]  1.
    sampled = batch.sampled
    if not sampled:
        return tokens
    device = logits.device
    rows = torch.tensor(sampled, dtype=torch.long)
    z = logits[rows.to(device)].float()  # [S, V]  2.
    z = z / batch.temperature[rows].to(device)[:, None]  # 3.
    top_k, top_p = batch.top_k[rows], batch.top_p[rows]
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):  # CPU tensors: no device read
        z = top_k_top_p(z, top_k.to(device), top_p.to(device))  # 4.
    probs = z.softmax(dim=-1)  # 5.
    for s, b in enumerate(sampled):  # 6.
        draw = torch.multinomial(probs[s], 1, generator=batch.generator(b, device))
        tokens[b] = draw[0]
    return tokens


@dataclass
class StepLogprobs:
    """One step's log-probabilities of the rows that report them (`SamplingBatch.reporting`)."""

    rows: list[int]  # positions in the batch, [R]
    chosen: Tensor  # [R] float32: log p(sampled token)
    top_ids: Tensor  # [R, k] int64: the k most likely tokens, most likely first
    top_logprobs: Tensor  # [R, k] float32


def token_logprobs(logits: Tensor, tokens: Tensor, batch: SamplingBatch) -> StepLogprobs | None:
    """logits [B, V], sampled tokens [B] -> the reporting rows' log-probabilities (None: no row
    reports): the definition in the module docstring, one batched top-k with k = the rows' largest."""
    reporting = batch.reporting
    if not reporting:
        return None
    device = logits.device
    rows = torch.tensor(reporting, dtype=torch.long, device=device)
    logprobs = logits[rows].float().log_softmax(dim=-1)  # [R, V]
    chosen = logprobs.gather(-1, tokens[rows][:, None])[:, 0]  # [R]
    top = logprobs.topk(max(batch.logprobs[b] for b in reporting), dim=-1)  # [R, k]
    return StepLogprobs(reporting, chosen, top.indices, top.values)


def top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """logits [B, V] with -inf outside each row's top-k (`top_k[b]`, 0: all) and then outside its
    top-p nucleus (`top_p[b]`, 1: all): the smallest set of most likely tokens whose probability
    mass is >= p. The most likely token always stays."""
    vocab = logits.shape[-1]
    ordered, order = logits.sort(dim=-1)  # [B, V] ascending
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)  # [B]
    kth_largest = ordered.gather(-1, (vocab - k)[:, None])  # [B, 1]
    ordered = ordered.masked_fill(ordered < kth_largest, -torch.inf)
    below = ordered.softmax(dim=-1).cumsum(dim=-1)  # [B, V] mass of this token and all less likely
    outside = below <= (1 - top_p)[:, None]  # the more likely tokens alone hold >= p
    outside[:, -1] = False
    ordered = ordered.masked_fill(outside, -torch.inf)
    return torch.empty_like(logits).scatter_(-1, order, ordered)
