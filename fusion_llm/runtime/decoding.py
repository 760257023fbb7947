"""The decode step: per-model KV caches of the running rows, fused logits, per-row sampling.

Rows join and leave the running batch at step boundaries (`batcher.py` decides when):
    1. prefill: a joining group reads its prompts (left padded) into fresh caches, which are then
       merged into the running ones (`CacheRunner.merge`: left padding to the longer cache);
    2. fuse: the last logits of every row (`fusion.fusion_step`, grouped by fusion mode);
    3. sample: greedy rows by argmax, sampled rows each with its own warpers and seeded generator;
    4. step: every model consumes the sampled token of each of its rows; finished rows leave every
       cache first (`keep`), so they cost nothing afterwards.
The large model is one `CacheRunner`; the small base and the experts form the `SmallPool`, which
knows nothing of how the large model's logits were produced (the vLLM backend reuses it).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from transformers import DynamicCache, LogitsProcessorList, StopStringCriteria
from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from ..core.config import FusionConfig, GenerationSpec
from ..core.fusion import AlphaSolver, FusedStep, fusion_step, make_solver
from ..core.padding import padded
from .models import BASE_ADAPTER, LoadedModel, ModelSet, cache_argument

Tensor = torch.Tensor
GREEDY_TEMPERATURE = 1e-5


class CacheRunner:
    """One model and its KV cache over a set of rows (`ids`) that grows and shrinks."""

    def __init__(self, loaded: LoadedModel, adapter_names: list[str] | None = None):
        self.loaded = loaded
        self.adapter_names = adapter_names  # one per row, for a mixed-LoRA peft batch
        self.cache = DynamicCache(config=loaded.model.config)
        self.ids: list[Hashable] = []  # what each row of the batch is (a row id, a slot)
        self.attention_mask: Tensor | None = None  # [N, L]
        self.next_position: Tensor | None = None  # [N]
        self.lengths: list[int] = []  # tokens each row has read (host copy: trimming needs no sync)
        self.last_logits: Tensor | None = None  # [N, V] logits of each row's last token

    def prefill(self, prompts: Sequence[Sequence[int]], ids: Sequence[Hashable] = ()) -> Tensor:
        """Left-pad the prompts, run them, return the logits of each row's last token [N, V]."""
        device = self.loaded.input_device
        tokens, mask = padded(prompts, self.loaded.tokenizer.pad_token_id)
        self.ids = list(ids) or list(range(len(prompts)))
        self.lengths = [len(p) for p in prompts]
        self.attention_mask = mask.to(device)
        positions = (self.attention_mask.cumsum(-1) - 1).clamp(min=0)
        self.next_position = self.attention_mask.sum(-1)
        return self._forward(tokens.to(device), positions)

    def step(self, tokens: Tensor) -> Tensor:
        """Consume one token per row ([N]), return the next logits [N, V]."""
        device = self.loaded.input_device
        ones = torch.ones_like(self.attention_mask[:, :1])
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=-1)
        positions = self.next_position[:, None]
        self.next_position = self.next_position + 1
        self.lengths = [n + 1 for n in self.lengths]
        return self._forward(tokens.to(device)[:, None], positions)

    def keep(self, rows: Tensor) -> None:
        """Drop every row not in `rows` (indices into the current batch); trim shared padding."""
        kept = rows.tolist()  # a CPU tensor: no device read
        self.ids = [self.ids[i] for i in kept]
        self.lengths = [self.lengths[i] for i in kept]
        if self.adapter_names is not None:
            self.adapter_names = [self.adapter_names[i] for i in kept]
        rows = rows.to(self.attention_mask.device)
        self.cache.batch_select_indices(rows)
        self.attention_mask = self.attention_mask[rows]
        self.next_position = self.next_position[rows]
        self.last_logits = self.last_logits[rows]
        unused = self.attention_mask.shape[1] - max(self.lengths, default=0)
        if unused > 0 and self.ids:  # left columns no remaining row attends to
            self.attention_mask = self.attention_mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys, layer.values = (
                    layer.keys[..., unused:, :],
                    layer.values[..., unused:, :],
                )

    def merge(self, other: CacheRunner) -> None:
        """Append `other`'s rows (same model): the shorter cache is left padded to the longer."""
        if not self.ids:
            self.__dict__.update(other.__dict__)
            return
        width = max(self.attention_mask.shape[1], other.attention_mask.shape[1])
        self.attention_mask = torch.cat(
            [_left_pad(self.attention_mask, width, 1), _left_pad(other.attention_mask, width, 1)]
        )
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat(
                [_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)]
            )
            mine.values = torch.cat(
                [_left_pad(mine.values, width, 2), _left_pad(theirs.values, width, 2)]
            )
        self.next_position = torch.cat([self.next_position, other.next_position])
        self.last_logits = torch.cat([self.last_logits, other.last_logits])
        self.ids += other.ids
        self.lengths += other.lengths
        if self.adapter_names is not None:
            self.adapter_names += other.adapter_names

    def _forward(self, ids: Tensor, positions: Tensor) -> Tensor:
        extra = {"adapter_names": self.adapter_names} if self.adapter_names is not None else {}
        out = self.loaded.model(
            input_ids=ids,
            attention_mask=self.attention_mask,
            position_ids=positions,
            **cache_argument(self.cache),
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        self.last_logits = out.logits[:, -1, :]
        return self.last_logits


def _left_pad(tensor: Tensor, width: int, dim: int) -> Tensor:
    """`tensor` with zeros prepended along `dim` up to `width`."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


@dataclass
class RowPrompt:
    """One row as the models read it: its id, token ids per model, and its experts."""

    row: int
    large: list[int]
    small: list[int]  # empty for a row that fuses no expert
    experts: list[str]
    expert_prompts: dict[str, list[int]] = field(default_factory=dict)  # own renderings


class SmallPool:
    """The small base and the experts over the running rows, each forward only where it is used.

    Slots of ONE peft forward: (row, None) runs the small base for every fused row, (row, e) runs
    LoRA expert e for the rows that fuse e (peft's `adapter_names` per slot). A full expert runs
    its own model over the rows that use it. Fed one step at a time, whatever produced the large
    model's logits.
    """

    def __init__(self, models: ModelSet):
        self.models = models
        self.shared: CacheRunner | None = None
        self.full: dict[str, CacheRunner] = {}

    def prefill(self, rows: Sequence[RowPrompt]) -> None:
        """Read the prompts of `rows` into this (empty) pool's caches; rows without experts skip."""
        fused = [r for r in rows if r.experts]
        if not fused:
            return
        lora = self.models.lora_experts
        slots = [(r.row, None) for r in fused]
        slots += [(r.row, e) for r in fused for e in r.experts if e in lora]
        by_row = {r.row: r for r in fused}
        self.shared = CacheRunner(
            self.models.small,
            [BASE_ADAPTER if e is None else lora[e] for _, e in slots] if lora else None,
        )
        self.shared.prefill([_prompt(by_row[row], e) for row, e in slots], slots)
        for name in dict.fromkeys(e for r in fused for e in r.experts if e not in lora):
            users = [r for r in fused if name in r.experts]
            self.full[name] = CacheRunner(self.models.full_experts[name])
            self.full[name].prefill([_prompt(r, name) for r in users], [r.row for r in users])

    def merge(self, other: SmallPool) -> None:
        """Take over `other`'s rows (a pool prefilled for joining rows)."""
        if other.shared is not None:
            self.shared = _merged(self.shared, other.shared)
        for name, runner in other.full.items():
            self.full[name] = _merged(self.full.get(name), runner)

    def step(self, tokens: dict[int, Tensor]) -> None:
        """Every slot consumes its row's token (`tokens`: row -> 0-dim token tensor)."""
        for runner in self._runners():
            runner.step(torch.stack([tokens[_row_of(i)] for i in runner.ids]))

    def keep(self, rows: set[int]) -> None:
        for runner in self._runners():
            positions = [i for i, key in enumerate(runner.ids) if _row_of(key) in rows]
            runner.keep(torch.tensor(positions, dtype=torch.long))
        self.full = {e: r for e, r in self.full.items() if r.ids}
        if self.shared is not None and not self.shared.ids:
            self.shared = None

    def logits(self, rows: Sequence[int], columns: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(small base [B, V], experts [B, T, V]) of fused `rows` over the common vocabulary; an
        expert a row does not use reads as the small base (a zero shift)."""
        vocab = self.models.vocab_size
        shared = self.shared.last_logits[:, :vocab]
        where = {key: i for i, key in enumerate(self.shared.ids)}
        small = shared[[where[(row, None)] for row in rows]]  # [B, V]
        experts = small[:, None, :].repeat(1, len(columns), 1)  # [B, T, V]
        for t, name in enumerate(columns):
            if name in self.models.lora_experts:
                source = shared
                position = {row: where[(row, name)] for row in rows if (row, name) in where}
            elif name in self.full:
                source = self.full[name].last_logits[:, :vocab]
                position = {row: i for i, row in enumerate(self.full[name].ids)}
            else:
                continue
            users = [b for b, row in enumerate(rows) if row in position]
            if users:
                experts[users, t] = source[[position[rows[b]] for b in users]].to(experts)
        return small, experts

    def _runners(self) -> list[CacheRunner]:
        return [r for r in (self.shared, *self.full.values()) if r is not None]


def _prompt(row: RowPrompt, expert: str | None) -> list[int]:
    return row.small if expert is None else row.expert_prompts.get(expert, row.small)


def _row_of(key: Hashable) -> int:
    return key[0] if isinstance(key, tuple) else key


def _merged(running: CacheRunner | None, joining: CacheRunner) -> CacheRunner:
    if running is None:
        return joining
    running.merge(joining)
    return running


class ModelState:
    """The running rows' caches: the large model's and the small-model pool's."""

    def __init__(self, models: ModelSet):
        self.models = models
        self.large: CacheRunner | None = None
        self.pool = SmallPool(models)

    @classmethod
    def prefilled(cls, models: ModelSet, rows: Sequence[RowPrompt]) -> ModelState:
        """The caches of joining rows, ready to `merge` into the running state."""
        state = cls(models)
        state.large = CacheRunner(models.large)
        state.large.prefill([r.large for r in rows], [r.row for r in rows])
        state.pool.prefill(rows)
        return state

    @property
    def rows(self) -> list[int]:
        """Row ids in batch order (every fused tensor is aligned with it)."""
        return [] if self.large is None else list(self.large.ids)

    def merge(self, other: ModelState) -> None:
        self.large = _merged(self.large, other.large)
        self.pool.merge(other.pool)

    def keep(self, rows: set[int]) -> None:
        positions = [i for i, row in enumerate(self.large.ids) if row in rows]
        self.large.keep(torch.tensor(positions, dtype=torch.long))
        self.pool.keep(rows)
        if not self.large.ids:
            self.large = None

    def step(self, tokens: Tensor) -> None:
        """Every model consumes each row's token (`tokens` [B] in row order)."""
        by_row = dict(zip(self.large.ids, tokens.unbind(), strict=True))
        self.large.step(tokens)
        self.pool.step(by_row)


def fuse_rows(
    large: Tensor,
    pool: SmallPool,
    rows: Sequence[int],
    experts: Sequence[Sequence[str]],
    modes: Sequence[str],
    columns: Sequence[str],
    solver_for: Callable[[str, list[str]], AlphaSolver | None],
) -> FusedStep:
    """The fused step of `rows` (pool row ids) from the large model's last logits [B, V] (however
    they were produced), with `experts[b]`, `modes[b]` per row; alpha over `columns`. Rows are
    fused in groups of one mode; rows without experts run alone."""
    vocab = pool.models.vocab_size
    large = large[:, :vocab]
    active = torch.tensor(
        [[c in names for c in columns] for names in experts], dtype=torch.bool, device=large.device
    ).reshape(len(rows), len(columns))  # [B, T]
    groups: dict[str, list[int]] = {}
    for b, (names, mode) in enumerate(zip(experts, modes, strict=True)):
        groups.setdefault(mode if names else "none", []).append(b)
    parts = []
    for mode, members in groups.items():
        index = torch.tensor(members, device=large.device)
        if mode == "none":
            step = fusion_step(large[index], None, None, active[index], None)
        else:
            small, expert = pool.logits([rows[b] for b in members], columns)
            device = large.device
            step = fusion_step(
                large[index], small.to(device), expert.to(device), active[index],
                solver_for(mode, list(columns)),
            )  # fmt: skip
        parts.append((index, step))
    return _scatter(parts, len(rows), len(columns), large)


class ConfigSolvers:
    """The alpha solver of each (mode, experts) under one config's weights and bounds, built once."""

    def __init__(self, config: FusionConfig):
        self.config = config
        self._built: dict[tuple[str, tuple[str, ...]], AlphaSolver | None] = {}

    def __call__(self, mode: str, experts: list[str]) -> AlphaSolver | None:
        key = (mode, tuple(experts))
        if key not in self._built:
            weights = {e.name: e.alpha for e in self.config.experts}
            self._built[key] = make_solver(
                mode, torch.tensor([weights[e] for e in experts]), self.config.fusion
            )
        return self._built[key]


def _scatter(parts, batch: int, width: int, like: Tensor) -> FusedStep:
    """One FusedStep over all rows from the steps of row groups."""
    if len(parts) == 1 and parts[0][1].alpha.shape[1] == width:
        return parts[0][1]
    logits = like.new_empty(batch, like.shape[1], dtype=torch.float32)
    alpha = like.new_zeros(batch, width, dtype=torch.float32)
    fallback = torch.zeros(batch, dtype=torch.bool, device=like.device)
    fault = torch.zeros_like(fallback)
    for index, step in parts:
        logits[index] = step.logits
        if step.alpha.shape[1] == width:
            alpha[index] = step.alpha.to(alpha)
        fallback[index], fault[index] = step.fallback, step.fault
    return FusedStep(logits, alpha, fallback, fault)


class RowSampler:
    """One row's next token: greedy when temperature is (about) 0, else transformers' warpers and
    multinomial with the row's own seeded generator, so a seed reproduces its row whatever else
    shares the batch. Below 1e-5 dividing by the temperature overflows: that is greedy anyway."""

    def __init__(self, spec: GenerationSpec, seed: int | None = None):
        self.greedy = spec.temperature < GREEDY_TEMPERATURE
        self.warpers = LogitsProcessorList()
        if not self.greedy:
            self.warpers.append(TemperatureLogitsWarper(spec.temperature))
        if spec.top_k is not None and not self.greedy:
            self.warpers.append(TopKLogitsWarper(spec.top_k))
        if spec.top_p < 1.0 and not self.greedy:
            self.warpers.append(TopPLogitsWarper(spec.top_p))
        # Unseeded: a fresh seed of our own (torch.seed() would re-seed the global RNG).
        self.seed = seed if seed is not None else secrets.randbits(63)
        self.generator: torch.Generator | None = None

    def sample(self, logits: Tensor) -> Tensor:
        """logits [V] -> token (0-dim)."""
        if self.generator is None:
            self.generator = torch.Generator(device=logits.device)
            self.generator.manual_seed(self.seed)
        warped = self.warpers(None, logits[None, :])
        return torch.multinomial(torch.softmax(warped, dim=-1), 1, generator=self.generator)[0, 0]


def sample_rows(logits: Tensor, samplers: Sequence[RowSampler]) -> Tensor:
    """logits [B, V] -> tokens [B]: greedy rows at once, sampled rows each with its own sampler."""
    tokens = logits.argmax(dim=-1)
    for b, sampler in enumerate(samplers):
        if not sampler.greedy:
            tokens[b] = sampler.sample(logits[b])
    return tokens


def build_sampler(spec: GenerationSpec) -> Callable[[Tensor, Tensor], Tensor]:
    """One sampler for every row of a batch (the bench times sampling this way)."""
    samplers: list[RowSampler] = []

    def sample(logits: Tensor, _ids: Tensor) -> Tensor:
        while len(samplers) < logits.shape[0]:
            samplers.append(
                RowSampler(spec, None if spec.seed is None else spec.seed + len(samplers))
            )
        return sample_rows(logits, samplers[: logits.shape[0]])

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


def stop_window(tokenizer, stops: Sequence[str]) -> int:
    """How many last tokens `stop_checker` needs to see."""
    criteria = _stop_criteria(tokenizer, tuple(stops)) if stops else None
    return (
        criteria.maximum_token_len if criteria is not None else max(map(len, stops), default=0) + 1
    )


@lru_cache(maxsize=128)
def _stop_criteria(tokenizer, stops: tuple[str, ...]) -> StopStringCriteria | None:
    """One StopStringCriteria per (tokenizer, stops): building one scans the whole vocabulary
    (seconds at 150 k ids), its calls keep no state. None where it cannot read the tokenizer."""
    try:
        return StopStringCriteria(tokenizer, list(stops))
    except ValueError:
        return None
