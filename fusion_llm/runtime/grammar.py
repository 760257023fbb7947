"""Constrained decoding: a request's grammar, compiled once, and one matcher per running row.

A request with `structured_outputs` (JSON schema, regex, choice, EBNF, JSON object, structural
tag) has its grammar compiled by `GrammarCompiler` when it is prepared (bad grammars are a
`RequestError` naming the field, before any decoding). Each of its rows then gets its own
matcher when it joins the batch (`GrammarRows`, aligned by position with the running rows, like
the sampler's settings), so a row that runs again after a fault starts from a fresh matcher
and no matcher is ever advanced twice by the same token. Per step:
    1. `mask`: one batched bitmask fill for the constrained rows (bit v of row b: token v is
       allowed next);
    2. the mask is applied to the large model's row before fusion (`core.fusion.fusion_step`
       treats -inf as a constraint: alpha is solved on the allowed tokens) and again to the
       fused row before sampling, so a row can only sample an allowed token;
    3. `accept`: each constrained row's matcher reads the token it sampled; a matcher that has
       read a stop token is terminated, and its row ends.
When the grammar is complete only its stop tokens (the request's EOS ids) are allowed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import xgrammar

from ..core.config import StructuredOutputs
from ..core.errors import RequestError, first_line

Tensor = torch.Tensor
# xgrammar's messages start with "[hh:mm:ss] /path/file.cc:line: ", which says nothing to a user
_SOURCE_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar and the stop tokens its matchers end on."""

    compiled: xgrammar.CompiledGrammar
    stop_ids: tuple[int, ...]  # empty: the tokenizer's EOS

    def matcher(self) -> xgrammar.GrammarMatcher:
        return xgrammar.GrammarMatcher(
            self.compiled, override_stop_tokens=list(self.stop_ids) or None
        )


class GrammarCompiler:
    """Compiles `StructuredOutputs` for one tokenizer over the fused vocabulary (`vocab_size`
    ids: the width of the logits it masks); compiled grammars are cached by xgrammar."""

    def __init__(self, tokenizer, vocab_size: int):
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        self.vocab_size = vocab_size

    def compile(self, structured: StructuredOutputs, stop_ids: Iterable[int]) -> Grammar:
        """The request's grammar; raises RequestError naming the field when it is invalid or
        admits no token at the first step."""
        field = f"structured_outputs.{structured.kind}"
        try:
            compiled = self._compiled(structured)
        except (RuntimeError, ValueError, TypeError) as err:  # xgrammar's parse errors
            reason = _SOURCE_PREFIX.sub("", first_line(err)) or type(err).__name__
            raise RequestError(f"{field} is not a valid grammar: {reason}") from None
        grammar = Grammar(compiled, tuple(sorted(stop_ids)))
        if not _allowed_first(grammar, self.vocab_size):
            msg = f"{field} admits no token of the model's vocabulary at the first step"
            raise RequestError(msg)
        return grammar

    def _compiled(self, structured: StructuredOutputs) -> xgrammar.CompiledGrammar:
        kind, value = structured.kind, structured.value
        separators = (",", ":") if structured.disable_any_whitespace else None
        any_whitespace = not structured.disable_any_whitespace
        if kind == "json":
            schema = value if isinstance(value, str) else json.dumps(value)
            return self._compiler.compile_json_schema(
                schema, any_whitespace=any_whitespace, separators=separators
            )
        if kind == "json_object":
            return self._compiler.compile_json_schema(
                '{"type": "object"}', any_whitespace=any_whitespace, separators=separators
            )
        if kind == "regex":
            return self._compiler.compile_regex(value)
        if kind == "choice":
            return self._compiler.compile_grammar(choice_grammar(value))
        if kind == "grammar":
            return self._compiler.compile_grammar(value)
        tag = value if isinstance(value, str) else json.dumps(value)
        return self._compiler.compile_structural_tag(tag)


def compact_json_grammar(structured: StructuredOutputs) -> str:
    """The EBNF of a `json` / `json_object` constraint with `disable_any_whitespace`: JSON with
    compact separators and no optional whitespace (for engines that take whitespace settings
    per server, not per request, such as vLLM)."""
    schema = {"type": "object"} if structured.kind == "json_object" else structured.value
    text = schema if isinstance(schema, str) else json.dumps(schema)
    grammar = xgrammar.Grammar.from_json_schema(text, any_whitespace=False, separators=(",", ":"))
    return str(grammar)


def choice_grammar(choices: Sequence[str]) -> str:
    """EBNF whose language is exactly `choices` (JSON string escapes are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _allowed_first(grammar: Grammar, vocab_size: int) -> bool:
    bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
    grammar.matcher().fill_next_token_bitmask(bitmask)
    return bool(_allowed(bitmask, vocab_size).any())


def _allowed(bitmask: Tensor, vocab_size: int) -> Tensor:
    """bitmask [B, ceil(V / 32)] int32 -> allowed [B, V] bool."""
    bits = torch.arange(32, dtype=torch.int32)
    allowed = (bitmask[:, :, None] >> bits) & 1  # [B, W, 32]
    return allowed.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


@dataclass
class StepMask:
    """One step's allowed tokens of the constrained rows."""

    bitmask: Tensor  # [B, ceil(V / 32)] int32 (rows not in `rows` unused)
    rows: list[int]  # positions of the constrained rows
    vocab_size: int

    def apply(self, logits: Tensor) -> Tensor:
        """logits [B, >= V] with -inf at the tokens the constrained rows may not take, in place."""
        bitmask = self.bitmask.to(logits.device, non_blocking=True)
        xgrammar.apply_token_bitmask_inplace(
            logits, bitmask, vocab_size=self.vocab_size, indices=self.rows
        )
        if logits.shape[-1] > self.vocab_size:  # ids past the fused vocabulary are never allowed
            index = torch.tensor(self.rows, device=logits.device)
            logits[index, self.vocab_size :] = -torch.inf
        return logits


class GrammarRows:
    """Each running row's matcher (None: an unconstrained row), aligned by position."""

    def __init__(self, matchers: list[xgrammar.GrammarMatcher | None], vocab_size: int):
        self.matchers = matchers
        self.vocab_size = vocab_size
        self._filler = xgrammar.BatchGrammarMatcher(max_threads=1)

    @classmethod
    def of(cls, grammars: Sequence[Grammar | None], vocab_size: int) -> GrammarRows:
        """Fresh matchers for rows that join with `grammars[b]`."""
        return cls([g.matcher() if g is not None else None for g in grammars], vocab_size)

    @property
    def constrained(self) -> list[int]:
        return [b for b, m in enumerate(self.matchers) if m is not None]

    def mask(self) -> StepMask | None:
        """This step's allowed tokens, filled for every constrained row at once (None: no row
        is constrained)."""
        rows = self.constrained
        if not rows:
            return None
        bitmask = xgrammar.allocate_token_bitmask(len(self.matchers), self.vocab_size)
        matchers = [self.matchers[b] for b in rows]
        self._filler.batch_fill_next_token_bitmask(matchers, bitmask, indices=rows)
        return StepMask(bitmask, rows, self.vocab_size)

    def accept(self, tokens: Sequence[int]) -> list[bool]:
        """Each constrained row's matcher reads its row's token; per position, whether the
        token was allowed (True on unconstrained rows)."""
        rows = self.constrained
        accepted = [True] * len(self.matchers)
        if rows:
            matchers = [self.matchers[b] for b in rows]
            taken = xgrammar.BatchGrammarMatcher.batch_accept_token(
                matchers, [tokens[b] for b in rows]
            )
            for b, ok in zip(rows, taken, strict=True):
                accepted[b] = ok
        return accepted

    def terminated(self, position: int) -> bool:
        """Whether the row's grammar has read its stop token (False when unconstrained)."""
        matcher = self.matchers[position]
        return matcher is not None and matcher.is_terminated()

    def filter(self, positions: Sequence[int]) -> None:
        self.matchers = [self.matchers[i] for i in positions]

    def extend(self, other: GrammarRows) -> None:
        self.matchers += other.matchers
