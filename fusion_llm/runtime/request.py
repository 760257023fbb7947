"""A request as the decoder sees it: prompts, parts, where its events go, what was delivered.

The engine builds a `Request`; the batcher splits it into `Ticket`s of at most `max_rows` rows,
all sharing one `Submission` (the caller's queue, cancellation, and DONE once every part ended).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from ..core.config import GenerationSpec
from ..core.errors import FusionError
from .grammar import Grammar
from .rows import RowId, RowPrompt
from .sampler import row_seeds

DONE = object()  # end of a request's events


@dataclass
class PromptBatch:
    """Token ids of each prompt as each model reads it (per-model renderings)."""

    large: list[list[int]]
    small: list[list[int]]
    experts: dict[str, list[list[int]]] = field(default_factory=dict)

    def rows(self, index: Sequence[int], experts: Collection[str]) -> PromptBatch:
        """The prompts at `index`, with the renderings of `experts` only (`small` stays empty
        when no row fuses)."""
        return PromptBatch(
            [self.large[i] for i in index],
            [self.small[i] for i in index] if self.small else [],
            {n: [ids[i] for i in index] for n, ids in self.experts.items() if n in experts},
        )


@dataclass
class Request:
    """A validated, tokenized request."""

    tokens: PromptBatch
    experts: list[str]  # every expert some row uses, in a fixed order
    mode: str
    spec: GenerationSpec
    eos_ids: set[int]
    row_experts: list[list[str]]  # each row's experts (a subset of `experts`)
    grammar: Grammar | None = None  # `spec.structured_outputs`, compiled: every row follows it

    @property
    def rows(self) -> int:
        return len(self.tokens.large)

    def row_seeds(self) -> list[int | None]:
        """Each row's sampling seed (`sampler.row_seeds`: seed + index; None on greedy rows)."""
        return row_seeds(self.spec, self.rows)

    def row_prompt(self, index: int, row: RowId) -> RowPrompt:
        """The row at `index` of this request as the models read it, under its id `row`."""
        experts = self.row_experts[index]
        return RowPrompt(
            row=row,
            large=self.tokens.large[index],
            small=self.tokens.small[index] if experts else [],
            experts=experts,
            expert_prompts={
                name: ids[index] for name, ids in self.tokens.experts.items() if name in experts
            },
        )

    def parts(self, max_rows: int) -> list[tuple[int, Request]]:
        """(first row, sub-request) pieces of at most `max_rows` rows each."""
        if self.rows <= max_rows:
            return [(0, self)]
        pieces = []
        for start in range(0, self.rows, max_rows):
            rows = slice(start, start + max_rows)
            row_experts = self.row_experts[rows]
            used = {e for names in row_experts for e in names}
            tokens = self.tokens.rows(range(self.rows)[rows], used)
            experts = [e for e in self.experts if e in used]
            part = Request(
                tokens, experts, self.mode, self.spec, self.eos_ids, row_experts, self.grammar
            )
            pieces.append((start, part))
        return pieces


@dataclass
class TokenScores:
    """A generated token's log-probability and the row's k most likely alternatives (ids and
    log-probabilities, most likely first), as `sampler.token_logprobs` defines them."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RowEvent:
    """One token of one row, as its caller receives it."""

    row: int  # the row's index in the submitted request (as `StreamChunk.row`)
    token: int
    alpha: list[float]  # over the row's own experts
    fallback: bool
    finished: str | None
    scores: TokenScores | None = None  # when the request asks for log-probabilities


class Submission:
    """One caller's request as the decoder sees it: where events go, cancellation, parts left.

    Events (lists of `RowEvent`) go to `put`, then DONE once every part has finished, or a single
    typed error instead (after which nothing more is sent).
    """

    def __init__(self, put: Callable[[object], None], parts: int):
        self._put = put
        self._parts_left = parts
        self._lock = threading.Lock()
        self.cancelled = threading.Event()
        self.failed = False

    @property
    def finished(self) -> bool:
        return self.failed or self.cancelled.is_set()

    def deliver(self, events: list[RowEvent]) -> None:
        if not self.failed:
            self._put(events)

    def fail(self, error: FusionError) -> None:
        with self._lock:
            if self.failed:
                return
            self.failed = True
        self.cancelled.set()  # the request's other rows and parts stop
        self._put(error)

    def part_done(self) -> None:
        with self._lock:
            self._parts_left -= 1
            last = self._parts_left == 0 and not self.failed
        if last:
            self._put(DONE)


_ticket_ids = itertools.count()


@dataclass
class Ticket:
    """One part of a submission, as queued for the decoder."""

    request: Request
    first_row: int  # index of this part's first row in the submitted request
    submission: Submission
    id: int = field(default_factory=lambda: next(_ticket_ids))  # what tickets are keyed by
    seeds: list[int | None] = field(default_factory=list)  # per row, fixed at submission
    delivered: list[int] = field(default_factory=list)  # steps given out per row
    done: bool = False  # every row finished: the caller has had its answer
    isolated: bool = False  # rerun alone after a fault in a shared batch

    def __post_init__(self) -> None:
        self.seeds = self.request.row_seeds()
        self.delivered = [0] * self.request.rows
