"""The gate's measurement: does fusing an expert raise the likelihood of reference answers over the
large model alone?

Teacher forcing, no generation. For a prompt x and reference y_1..y_m (+ EOS), every model reads
x + y in ONE full-sequence forward (the small base and a LoRA expert as rows of one peft forward);
at every reference position i the fused distribution P~_i is built from that position's logits
exactly as decoding builds it (`fusion.fusion_step`, alpha from the mode the engine is configured
to decode with, unless the call names another), so

    fused = sum_i log P~_i(y_i),    large = sum_i log P_i(y_i),
    gain  = (fused - large) / (reference tokens)      nats per token, over all rows,

and, because an expert can raise that likelihood by its answers' format alone (one trained on
answers shuffled within its own task did, on the first toy family), the same gain is measured with
each prompt paired with ANOTHER row's reference (the next row whose reference differs):

    specificity = mean over rows of [ gain on the row's own reference - gain on the other one ],

positive when fusion prefers the right answer to a well-formed wrong one. The verdict is
`helps = gain >= 0 and specificity > 0` (specificity is not judged when all references are equal).
It is stored in the expert's card (`card.py`) under the large model it was measured against; the
router's gate reads it. Measured on the shipped family (40 eval rows per task), specificity of the
shipped LoRA experts / of experts trained on within-task-shuffled answers: trivia +1.35 / -1.66,
math +0.71 / -1.09, summary +1.69 / -0.01; on truthful and mc (option answers) it does not
separate them (+0.03 / +0.02, +0.07 / +0.01), nor do their fused accuracies (the shuffled ones lift
the large model too: what they teach there is the format). No per-step guard: docs/step_guard.md.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..core.config import FUSED_MODES
from ..core.errors import RequestError, UnknownExpertError
from ..engine import FusionEngine, FusionPrompt
from ..routing.card import card_path, read_card, store_verdict
from ..runtime.scoring import TeacherForced, fused_logits, target_log_probs
from ..runtime.scoring import teacher_forced_logits as teacher_forced_logits_of
from ..runtime.step import ConfigSolvers
from ..runtime.validation import fusion_mode
from .data import Record, read_jsonl, render

Tensor = torch.Tensor


def gate_experts(
    engine: FusionEngine,
    experts: Sequence[str] | None = None,
    validation: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    mode: str | None = None,
    store: bool = True,
) -> dict[str, dict[str, Any]]:
    """{expert: verdict} for `experts` (default: all), measured on `validation` (JSONL with
    references; default: each expert's held-out `validation.jsonl` from `train-expert
    --holdout`) in `mode` (None: the config's), and stored in each expert's card unless `store`
    is False."""
    mode = _measured_mode(fusion_mode(mode, engine.config.fusion.mode))
    if batch_size < 1 or (limit is not None and limit < 1):
        msg = f"batch_size and limit must be at least 1, got {batch_size} and {limit}"
        raise RequestError(msg)
    names = list(experts) if experts is not None else list(engine.expert_names)
    unknown = [n for n in names if n not in engine.expert_names]
    if unknown:
        msg = (
            f"unknown expert(s) {', '.join(unknown)}; configured: {', '.join(engine.expert_names)}"
        )
        raise UnknownExpertError(msg)
    verdicts = {}
    for name in names:
        spec = next(e for e in engine.config.experts if e.name == name)
        source = Path(validation) if validation is not None else _held_out_file(spec)
        records = read_jsonl(source)[:limit]
        prompts, references = rows_for(engine, records, str(source))
        fused, large, tokens = reference_log_likelihoods(
            engine, name, prompts, references, mode, batch_size
        )
        specificity = _specificity(
            engine, name, prompts, references, fused - large, tokens, mode, batch_size
        )
        count = float(tokens.sum())
        measured = {
            # refused when fusion lowers the references' likelihood, or raises a wrong answer's more
            "helps": bool(fused.sum() >= large.sum()) and (specificity is None or specificity > 0),
            "gain": round(float(fused.sum() - large.sum()) / count, 5),
            "specificity": None if specificity is None else round(specificity, 5),
            "fused_nll": round(-float(fused.sum()) / count, 5),
            "large_nll": round(-float(large.sum()) / count, 5),
            "rows_won": round(float((fused > large).float().mean()), 4),
            "rows": len(records),
            "tokens": int(count),
            "mode": mode,
            "validation": str(source.resolve()),
            "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
        }
        if store:
            measured["card"] = str(store_verdict(spec, engine.config.large, measured))
        verdicts[name] = measured
    return verdicts


def _measured_mode(mode: str) -> str:
    if mode not in FUSED_MODES:  # "none" fuses nothing to measure
        msg = f"the gate measures a fusion mode, not {mode!r}: use {', '.join(FUSED_MODES)}"
        raise RequestError(msg)
    return mode


def _specificity(engine, name, prompts, references, own_gain, tokens, mode, batch_size):
    """Mean per-token gain on each row's own reference minus on the next differing reference;
    None when every reference is the same."""
    others = [_next_different(references, i) for i in range(len(references))]
    rows = [i for i, j in enumerate(others) if j is not None]
    if not rows:
        return None
    fused, large, counts = reference_log_likelihoods(
        engine, name, [prompts[i] for i in rows], [references[others[i]] for i in rows],
        mode, batch_size,
    )  # fmt: skip
    own = own_gain[rows] / tokens[rows].clamp(min=1)
    other = (fused - large) / counts.clamp(min=1)
    return float((own - other).mean())


def _next_different(references: Sequence[Sequence[int]], i: int) -> int | None:
    for step in range(1, len(references)):
        j = (i + step) % len(references)
        if list(references[j]) != list(references[i]):
            return j
    return None


def rows_for(
    engine: FusionEngine, records: Sequence[Record], source: str = "validation"
) -> tuple[list[FusionPrompt], list[list[int]]]:
    """Each record's prompt (each model's chat template for `messages`) and reference ids (the
    completion as the small base's template renders it, then EOS), as decoding would emit them."""
    models = engine.models
    tokenizer = models.large.tokenizer
    prompts, references = [], []
    for record in records:
        text = render(record, models.small.tokenizer, source)
        if record.messages:
            prompts.append(engine.render_chat(list(record.messages[:-1])))
        else:
            prompts.append(FusionPrompt(text.prompt))
        ids = tokenizer(text.completion, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None and ids[-1:] != [tokenizer.eos_token_id]:
            ids.append(tokenizer.eos_token_id)
        references.append(ids)
    return prompts, references


@torch.no_grad()
def reference_log_likelihoods(
    engine: FusionEngine,
    expert: str,
    prompts: Sequence[FusionPrompt],
    references: Sequence[Sequence[int]],
    mode: str,
    batch_size: int = 8,
) -> tuple[Tensor, Tensor, Tensor]:
    """([N] fused log-likelihood, [N] large-alone log-likelihood, [N] token counts) of the
    references, teacher-forced; tokens outside the models' common vocabulary are not counted."""
    solver = ConfigSolvers(engine.config)(_measured_mode(mode), [expert])
    fused, large, counts = [], [], []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=f"gate {expert}", mininterval=1, leave=False):
        rows = slice(start, start + batch_size)
        forced = _teacher_forced(engine, expert, prompts[rows], references[rows])
        for total, part in zip(
            (fused, large, counts), _per_row(forced, references[rows], solver), strict=True
        ):
            total.append(part)
    return torch.cat(fused), torch.cat(large), torch.cat(counts)


def teacher_forced_logits(
    engine: FusionEngine,
    expert: str,
    prompts: Sequence[FusionPrompt],
    references: Sequence[Sequence[int]],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """[T, V] logits of the large model, the small base and `expert` at every reference position
    (rows concatenated, V the common vocabulary), and the [T] reference tokens they predict."""
    forced = _teacher_forced(engine, expert, prompts, references)
    return forced.large, forced.small, forced.experts[:, 0], forced.targets


def _teacher_forced(engine, expert, prompts, references) -> TeacherForced:
    """`runtime.scoring.teacher_forced_logits` of the references, each prompt fitted with its
    reference's length free (its oldest tokens dropped; a reference as long as the window raises)."""
    tokens = engine.scoring_prompts(prompts, [expert], references, truncate=True)
    with engine.exclusive():  # the models are shared with generation
        return teacher_forced_logits_of(engine.models, tokens, references, [expert])


def _per_row(forced: TeacherForced, references, solver) -> tuple[Tensor, Tensor, Tensor]:
    """[N] fused and large-alone log-likelihoods and [N] counted tokens of a batch's references."""
    counted = forced.targets < forced.large.shape[-1]  # [T]: tokens outside V are not counted
    fused_token = target_log_probs(fused_logits(forced, solver), forced.targets)[0]
    large_token = target_log_probs(forced.large, forced.targets)[0]
    fused_token, large_token = (torch.where(counted, t, 0.0) for t in (fused_token, large_token))
    lengths = torch.tensor([len(r) for r in references], device=counted.device)
    row = torch.repeat_interleave(torch.arange(len(lengths), device=counted.device), lengths)

    def per_row(values: Tensor) -> Tensor:
        return torch.zeros(len(lengths), device=values.device).index_add_(0, row, values.float())

    return per_row(fused_token).cpu(), per_row(large_token).cpu(), per_row(counted).cpu()


def _held_out_file(spec) -> Path:
    name = read_card(spec).get("validation")
    if not name:
        msg = (
            f"expert {spec.name!r} has no held-out validation rows in {card_path(spec)}; pass "
            "--validation FILE (JSONL with references) or retrain it with --holdout N"
        )
        raise RequestError(msg)
    return card_path(spec).parent / name
