"""Micro-batching: concurrent requests are decoded together, one batch at a time.

Callers (threads, or an event loop's executor) submit prepared requests and read their own queue.
One worker thread owns the models: it collects what arrives within a short window, merges the
requests that can share a batch (same mode and sampling; sampled requests only alone, so a seed
keeps its meaning), decodes them as one `DecodeBatch` (experts as the union with a per-row mask,
each row with its own budget and stop strings) and routes each step's rows back to their request.
A request larger than `max_rows` is decoded in parts of at most `max_rows` rows.

Faults stay with their request: a row without a finite large-model logit fails its own request
only, and when a merged batch raises, each request of it runs again alone (already delivered steps
are skipped), so only the request at fault gets the error. Whatever a forward raises (any
`BaseException`), the caller gets a typed error and the worker goes on; a dead worker is restarted
by the next `submit`.
A request whose reader goes away is cancelled: its rows leave the batch at the next step.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import GenerationSpec
from .decoding import GREEDY_TEMPERATURE, DecodeBatch, PromptBatch, decode
from .errors import DecoderFaultError, DeviceError, FusionError, NumericalFaultError
from .fusion import AlphaSolver
from .models import ModelSet

DONE = object()  # end of a request's events


@dataclass
class Request:
    """A validated, tokenized request."""

    tokens: PromptBatch
    experts: list[str]  # every expert some row uses, in a fixed order
    mode: str
    spec: GenerationSpec
    eos_ids: set[int]
    row_experts: list[list[str]]  # each row's experts (a subset of `experts`)

    @property
    def rows(self) -> int:
        return len(self.tokens.large)

    def batch_key(self) -> tuple:
        """Requests with equal keys can share a batch."""
        sampling = (self.spec.temperature, self.spec.top_k, self.spec.top_p, self.spec.seed)
        alone = id(self) if self.spec.temperature >= GREEDY_TEMPERATURE else None
        return (self.mode, sampling, frozenset(self.eos_ids), alone)

    def parts(self, max_rows: int) -> list[tuple[int, Request]]:
        """(first row, sub-request) pieces of at most `max_rows` rows each."""
        if self.rows <= max_rows:
            return [(0, self)]
        pieces = []
        for start in range(0, self.rows, max_rows):
            rows = slice(start, start + max_rows)
            row_experts = self.row_experts[rows]
            used = {e for names in row_experts for e in names}
            tokens = PromptBatch(
                self.tokens.large[rows],
                self.tokens.small[rows],
                {name: ids[rows] for name, ids in self.tokens.experts.items() if name in used},
            )
            experts = [e for e in self.experts if e in used]
            pieces.append(
                (start, Request(tokens, experts, self.mode, self.spec, self.eos_ids, row_experts))
            )
        return pieces


@dataclass
class RowEvent:
    row: int  # index within its request
    token: int
    alpha: list[float]  # over the request's own experts
    fallback: bool
    finished: str | None


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


@dataclass
class Ticket:
    """One part of a submission, as queued for the decoder."""

    request: Request
    first_row: int  # index of this part's first row in the submitted request
    submission: Submission
    delivered: list[int] = field(default_factory=list)  # steps given out per row
    done: bool = False  # every row finished: the caller has had its answer

    def __post_init__(self) -> None:
        self.delivered = [0] * self.request.rows


def typed_fault(fault: BaseException) -> FusionError:
    """What a caller receives for an exception raised while its rows were decoded."""
    if isinstance(fault, FusionError):
        return fault
    if isinstance(fault, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        return DeviceError(
            "the accelerator ran out of memory; lower the batch size or max_new_tokens"
        )
    detail = str(fault).strip().splitlines()[0] if str(fault).strip() else ""
    error = DecoderFaultError(
        f"decoding failed inside a model forward ({type(fault).__name__}"
        + (f": {detail[:300]}" if detail else "")
        + "); the engine is ready for the next call"
    )
    error.__cause__ = fault
    return error


class MicroBatcher:
    """Owns decoding; see the module docstring."""

    def __init__(
        self,
        models: Callable[[], ModelSet],
        solver_for: Callable[[str, list[str]], AlphaSolver | None],
        models_lock: threading.RLock,
        window_s: float,
        max_rows: int,
        idle_s: float = 5.0,
    ):
        self._models = models
        self._solver_for = solver_for
        self._models_lock = models_lock
        self._window_s = window_s
        self._max_rows = max_rows
        self._idle_s = idle_s
        self._incoming: queue.Queue[Ticket] = queue.Queue()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def submit(self, request: Request, put: Callable[[object], None]) -> Submission:
        """Queue a request; its events (lists of `RowEvent`, then DONE, or an error) go to `put`."""
        parts = request.parts(self._max_rows)
        submission = Submission(put, len(parts))
        with self._lock:
            for first_row, part in parts:
                self._incoming.put(Ticket(part, first_row, submission))
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(
                    target=self._serve, name="fusion-llm-decoder", daemon=True
                )
                self._worker.start()
        return submission

    def _serve(self) -> None:
        backlog: deque[Ticket] = deque()
        try:
            while True:
                if not backlog:
                    try:
                        backlog.append(self._incoming.get(timeout=self._idle_s))
                    except queue.Empty:
                        with self._lock:  # submit() holds this lock: no request slips through
                            if self._incoming.empty():
                                self._worker = None
                                return
                        continue
                self._collect(backlog)
                self._run(self._take_group(backlog))
        except BaseException as fault:  # a bug of the batcher itself: fail what it holds, not hang
            for ticket in backlog:
                ticket.submission.fail(typed_fault(fault))
            with self._lock:
                self._worker = None  # the next submit starts a new worker for what is queued

    def _collect(self, backlog: deque[Ticket]) -> None:
        """Gather what arrives within the window (and whatever is already waiting)."""
        deadline = time.monotonic() + self._window_s
        while True:
            try:
                backlog.append(self._incoming.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                return

    def _take_group(self, backlog: deque[Ticket]) -> list[Ticket]:
        key = backlog[0].request.batch_key()
        group, rows, rest = [], 0, deque()
        while backlog:
            ticket = backlog.popleft()
            if ticket.submission.finished:
                ticket.submission.part_done()
                continue
            fits = ticket.request.batch_key() == key and (
                not group or rows + ticket.request.rows <= self._max_rows
            )
            if fits:
                group.append(ticket)
                rows += ticket.request.rows
            else:
                rest.append(ticket)
        backlog.extend(rest)
        return group

    def _run(self, group: list[Ticket]) -> None:
        """Decode a group; if it raises, find whose fault it is by running each request alone."""
        if not group:
            return
        try:
            with self._models_lock:
                self._decode(group)
        except BaseException as fault:  # noqa: BLE001 - a forward may raise anything; we live on
            if len(group) == 1:
                group[0].submission.fail(typed_fault(fault))
                return
            for ticket in group:
                if not ticket.done and not ticket.submission.finished:
                    self._run([ticket])
            return
        for ticket in group:
            if not ticket.done:
                ticket.submission.part_done()

    def _decode(self, group: list[Ticket]) -> None:
        first = group[0].request
        experts = list(dict.fromkeys(e for t in group for e in t.request.experts))
        owner, offsets, row_columns = [], [], []
        active_rows, prompts = [], PromptBatch([], [], {})
        for ticket in group:
            request = ticket.request
            offsets.append(len(owner))
            owner += [ticket] * request.rows
            for names in request.row_experts:
                row_columns.append([experts.index(e) for e in names])
                active_rows.append([e in names for e in experts])
            prompts.large += request.tokens.large
            prompts.small += request.tokens.small
        for name in {n for t in group for n in t.request.tokens.experts}:
            prompts.experts[name] = [
                ids
                for t in group
                for ids in t.request.tokens.experts.get(name, t.request.tokens.small)
            ]
        batch = DecodeBatch(
            prompts=prompts,
            experts=experts,
            max_new_tokens=[t.request.spec.max_new_tokens for t in owner],
            stops=[tuple(t.request.spec.stop) for t in owner],
            active=torch.tensor(active_rows, dtype=torch.bool) if experts else None,
        )
        index = {id(t): i for i, t in enumerate(group)}
        produced = [0] * len(owner)  # steps this decode made per row (a rerun skips delivered ones)
        rows_finished = [0] * len(group)
        cancelled: set[int] = set()
        steps = decode(
            self._models(),
            batch,
            self._solver_for(first.mode, experts),
            first.spec,
            first.eos_ids,
            cancelled,
        )
        try:
            for step in steps:
                per_ticket: dict[int, list[RowEvent]] = {}
                faulty: set[int] = set()
                for i, row in enumerate(step.rows):
                    ticket = owner[row]
                    k = index[id(ticket)]
                    local = row - offsets[k]
                    produced[row] += 1
                    if step.finished.get(row) == "fault":
                        faulty.add(k)
                    elif step.finished.get(row) is not None:
                        rows_finished[k] += 1
                    if produced[row] <= ticket.delivered[local]:
                        continue
                    ticket.delivered[local] = produced[row]
                    alpha = step.alpha[i, row_columns[row]].tolist() if row_columns[row] else []
                    event = RowEvent(
                        ticket.first_row + local,
                        step.tokens[i],
                        alpha,
                        step.fallback[i],
                        step.finished.get(row),
                    )
                    per_ticket.setdefault(k, []).append(event)
                for k in faulty:
                    group[k].submission.fail(
                        NumericalFaultError(
                            "the large model produced no finite logit for a row of this request; "
                            "nothing can be sampled from it (check the model's weights and dtype)"
                        )
                    )
                for k, events in per_ticket.items():
                    group[k].submission.deliver(events)
                for k, ticket in enumerate(group):
                    if not ticket.done and rows_finished[k] == ticket.request.rows:
                        ticket.done = True  # answered now, not when the longest row ends
                        ticket.submission.part_done()
                for k, ticket in enumerate(group):
                    if ticket.submission.finished:
                        cancelled.update(range(offsets[k], offsets[k] + ticket.request.rows))
                if len(cancelled) == len(owner):
                    return
        finally:
            steps.close()
