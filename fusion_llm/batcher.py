"""Micro-batching: concurrent requests are decoded together, one batch at a time.

Callers (threads, or an event loop's executor) submit prepared requests and read their own queue.
One worker thread owns the models: it collects what arrives within a short window, merges the
requests that can share a batch (same mode and sampling; sampled requests only alone, so a seed
keeps its meaning), decodes them as one `DecodeBatch` (experts as the union with a per-row mask,
each row with its own budget and stop strings) and routes each step's rows back to their request.
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
from .errors import DeviceError
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


@dataclass
class RowEvent:
    row: int  # index within its request
    token: int
    alpha: list[float]  # over the request's own experts
    fallback: bool
    finished: str | None


@dataclass
class Ticket:
    """A submitted request: where its events go (`put`) and its cancellation flag."""

    request: Request
    put: Callable[[object], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


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

    def submit(self, request: Request, put: Callable[[object], None]) -> Ticket:
        """Queue a request; its events (lists of `RowEvent`, an exception, then DONE) go to `put`."""
        ticket = Ticket(request, put)
        with self._lock:
            self._incoming.put(ticket)
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._serve, name="fusion-llm-decoder", daemon=True
                )
                self._worker.start()
        return ticket

    def _serve(self) -> None:
        backlog: deque[Ticket] = deque()
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
            fits = ticket.request.batch_key() == key and (
                not group or rows + ticket.request.rows <= self._max_rows
            )
            if fits and not ticket.cancelled.is_set():
                group.append(ticket)
                rows += ticket.request.rows
            elif not ticket.cancelled.is_set():
                rest.append(ticket)
            else:
                ticket.put(DONE)
        backlog.extend(rest)
        return group

    def _run(self, group: list[Ticket]) -> None:
        if not group:
            return
        try:
            with self._models_lock:
                self._decode(group)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            error = DeviceError(
                "the accelerator ran out of memory; lower the batch size or max_new_tokens"
            )
            for ticket in group:
                ticket.put(error)
        except Exception as error:  # handed to every caller of the batch; the worker lives on
            for ticket in group:
                ticket.put(error)
        else:
            for ticket in group:
                ticket.put(DONE)

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
                for i, row in enumerate(step.rows):
                    ticket = owner[row]
                    k = index[id(ticket)]
                    alpha = step.alpha[i, row_columns[row]].tolist() if row_columns[row] else []
                    event = RowEvent(
                        row - offsets[k],
                        step.tokens[i],
                        alpha,
                        step.fallback[i],
                        step.finished.get(row),
                    )
                    per_ticket.setdefault(k, []).append(event)
                for k, events in per_ticket.items():
                    group[k].put(events)
                for k, ticket in enumerate(group):
                    if ticket.cancelled.is_set():
                        cancelled.update(range(offsets[k], offsets[k] + ticket.request.rows))
                if len(cancelled) == len(owner):
                    return
        finally:
            steps.close()
