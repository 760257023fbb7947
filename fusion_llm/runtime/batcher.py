"""Continuous batching: one decoder thread runs every request, joining and leaving at steps.

Callers (threads, or an event loop) submit prepared requests and read their own queue. The worker
owns the models. At every step boundary the `Scheduler` says which waiting requests join; they
are prefilled and merged into the running caches (`decoding.ModelState`), then every running row
is fused (each with its own experts and mode), sampled (each with its own sampling parameters and
seeded generator), and its token sent to its caller; a request returns the moment its own rows
finish, and a request whose reader goes away leaves at the next step. A request larger than
`max_rows` is decoded in parts.

Faults stay with their request: a row without a finite large-model logit fails its own request
only; when a shared prefill or step raises, each request involved runs again alone (steps already
delivered are skipped), so only the request at fault gets the error. Whatever a forward raises
(any `BaseException`), the caller gets a typed error and the worker goes on; a dead worker is
restarted by the next `submit`.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..core.errors import NumericalFaultError
from ..core.fusion import AlphaSolver
from .decoder import SHUTDOWN, stop_at_exit, typed_fault
from .decoding import ModelState, RowSampler, fuse_rows, sample_rows, stop_checker, stop_window
from .models import ModelSet
from .request import Request, RowEvent, Submission, Ticket
from .scheduler import Scheduler

STOP_PAD = 2**31 - 1  # left padding of short rows for the stop check: no token's text


@dataclass
class LiveRow:
    """One running row: who it belongs to and how it samples, stops and ends."""

    ticket: Ticket
    local: int  # index within its ticket
    sampler: RowSampler
    experts: list[str]
    tokens: list[int] = field(default_factory=list)

    @property
    def spec(self):
        return self.ticket.request.spec


class ContinuousBatcher:
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
        self._scheduler = Scheduler(max_rows)
        self._state: ModelState | None = None
        self._rows: list[LiveRow] = []  # in the state's row order
        self._row_ids = itertools.count()
        stop_at_exit(self)

    def start(self) -> None:
        """Nothing to start ahead of the first request: the models load with the engine."""

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the decoder thread once it is idle (a thread torch still runs in at exit aborts)."""
        worker = self._worker
        if worker is not None and worker.is_alive():
            self._incoming.put(SHUTDOWN)
            worker.join(timeout_s)

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

    # -- the loop ------------------------------------------------------------------------------
    @torch.inference_mode()  # the decoder thread never needs autograd (thread-local switch)
    def _serve(self) -> None:
        try:
            while self._rows or self._wait_for_work():
                self._take_incoming()
                running_isolated = any(r.ticket.isolated for r in self._rows)
                joining = self._scheduler.admit(len(self._rows), running_isolated)
                if joining:
                    self._join(joining)
                if self._rows:
                    self._step()
        except BaseException as fault:  # a bug of the batcher itself: fail what it holds, not hang
            held = {id(r.ticket): r.ticket for r in self._rows}
            held.update((id(t), t) for t in self._scheduler.waiting)
            for ticket in held.values():
                ticket.submission.fail(typed_fault(fault))
            self._scheduler.waiting.clear()
            self._rows, self._state = [], None
            with self._lock:
                self._worker = None  # the next submit starts a new worker for what is queued

    def _wait_for_work(self) -> bool:
        """Block until a request arrives (then gather the window's others); False when idle."""
        if self._scheduler.waiting:
            return True
        try:
            first = self._incoming.get(timeout=self._idle_s)
        except queue.Empty:
            with self._lock:  # submit() holds this lock: no request slips through
                if self._incoming.empty():
                    self._worker = None
                    return False
            return True
        if first is SHUTDOWN:
            with self._lock:
                self._worker = None
            return False
        self._scheduler.add(first)
        deadline = time.monotonic() + self._window_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = self._incoming.get(timeout=left)
            except queue.Empty:
                break
            if item is not SHUTDOWN:
                self._scheduler.add(item)
        return True

    def _take_incoming(self) -> None:
        while True:
            try:
                item = self._incoming.get_nowait()
            except queue.Empty:
                return
            if item is not SHUTDOWN:  # busy at exit: the daemon thread ends with the process
                self._scheduler.add(item)

    # -- joining -------------------------------------------------------------------------------
    def _join(self, tickets: list[Ticket]) -> None:
        """Prefill joining tickets together; if that raises, each alone (only the guilty fail)."""
        rows, prompts = [], []
        for ticket in tickets:
            request = ticket.request
            for local in range(request.rows):
                row_id = next(self._row_ids)
                sampler = RowSampler(request.spec, ticket.seeds[local])
                rows.append(LiveRow(ticket, local, sampler, request.row_experts[local]))
                prompts.append(request.row_prompt(local, row_id))
        try:
            with self._models_lock:
                joining = ModelState.prefilled(self._models(), prompts)
        except BaseException as fault:  # noqa: BLE001 - a forward may raise anything; we live on
            if len(tickets) == 1:
                tickets[0].submission.fail(typed_fault(fault))
                return
            for ticket in tickets:
                self._join([ticket])
            return
        if self._state is None:
            self._state = joining
        else:
            self._state.merge(joining)
        self._rows += rows

    # -- one step ------------------------------------------------------------------------------
    def _step(self) -> None:
        """Fuse, sample and deliver one token per running row, then feed the tokens back."""
        self._drop({i for i, r in enumerate(self._rows) if r.ticket.submission.finished})
        if not self._rows:
            return
        try:
            with self._models_lock:
                tokens, alpha, flags, columns = self._sample()
                finished = self._deliver(tokens, alpha, flags, columns)
                self._drop(finished)
                if self._rows:
                    keep = [i for i in range(len(tokens)) if i not in finished]
                    self._state.step(tokens[torch.tensor(keep, device=tokens.device)])
        except BaseException as fault:  # noqa: BLE001 - the shared state is lost: isolate
            self._isolate(fault)

    def _sample(self):
        rows = self._rows
        columns = list(dict.fromkeys(e for r in rows for e in r.experts))
        fused = fuse_rows(
            self._state.large.last_logits,
            self._state.pool,
            self._state.rows,
            [r.experts for r in rows],
            [r.ticket.request.mode for r in rows],
            columns,
            self._solver_for,
        )
        tokens = sample_rows(fused.logits, [r.sampler for r in rows])
        # The step's one host read: tokens (exact in float32 below 2**24 ids), flags and alpha.
        flags = [t.float()[:, None] for t in (tokens, fused.fallback, fused.fault)]
        packed = torch.cat([*flags, fused.alpha.float()], dim=1).tolist()
        read = [(int(row[0]), bool(row[1]), bool(row[2])) for row in packed]
        return tokens, [row[3:] for row in packed], read, columns

    def _deliver(self, tokens, alpha, flags, columns: list[str]) -> set[int]:
        """Record each row's token, send each ticket its events; the rows that finished."""
        stopped = self._stopped(flags)
        events: dict[int, tuple[Ticket, list[RowEvent]]] = {}
        finished: set[int] = set()
        for i, (row, (token, fallback, fault)) in enumerate(zip(self._rows, flags, strict=True)):
            ticket = row.ticket
            if fault:
                ticket.submission.fail(
                    NumericalFaultError(
                        "the large model produced no finite logit for a row of this request; "
                        "nothing can be sampled from it (check the model's weights and dtype)"
                    )
                )
                finished.add(i)
                continue
            row.tokens.append(token)
            reason = self._finish_reason(row, token, stopped[i])
            if reason is not None:
                finished.add(i)
            if len(row.tokens) <= ticket.delivered[row.local]:
                continue  # a rerun replays what its caller already has
            ticket.delivered[row.local] = len(row.tokens)
            event = RowEvent(
                ticket.first_row + row.local,
                token,
                [alpha[i][columns.index(e)] for e in row.experts],
                fallback,
                reason,
            )
            events.setdefault(id(ticket), (ticket, []))[1].append(event)
        for ticket, batch in events.values():
            ticket.submission.deliver(batch)
        self._complete(finished)
        return finished

    def _finish_reason(self, row: LiveRow, token: int, stopped: bool) -> str | None:
        if token in row.ticket.request.eos_ids:
            return "eos"
        if stopped:
            return "stop"
        if len(row.tokens) >= row.spec.max_new_tokens:
            return "length"
        return None

    def _stopped(self, flags) -> list[bool]:
        """Per row, whether its own stop strings now end its text (one check per stop list)."""
        result = [False] * len(self._rows)
        tokenizer = self._models().large.tokenizer
        by_stops: dict[tuple[str, ...], list[int]] = {}
        for i, row in enumerate(self._rows):
            if row.spec.stop:
                by_stops.setdefault(tuple(row.spec.stop), []).append(i)
        for stops, members in by_stops.items():
            width = stop_window(tokenizer, stops)
            tails = [([*self._rows[i].tokens, flags[i][0]])[-width:] for i in members]
            ids = torch.tensor([[STOP_PAD] * (width - len(t)) + t for t in tails])
            for i, hit in zip(members, stop_checker(tokenizer, stops)(ids), strict=True):
                result[i] = hit
        return result

    def _complete(self, finished: set[int]) -> None:
        """A ticket whose rows have all finished is answered now, not when the batch ends."""
        left: dict[int, int] = {}
        for i, row in enumerate(self._rows):
            if i not in finished:
                left[id(row.ticket)] = left.get(id(row.ticket), 0) + 1
        for i in finished:
            ticket = self._rows[i].ticket
            if not ticket.done and id(ticket) not in left and not ticket.submission.failed:
                ticket.done = True
                ticket.submission.part_done()

    def _drop(self, positions: set[int]) -> None:
        if not positions:
            return
        kept = [r for i, r in enumerate(self._rows) if i not in positions]
        ids = self._state.rows
        self._state.keep({ids[i] for i in range(len(ids)) if i not in positions})
        self._rows = kept
        if not kept:
            self._state = None

    def _isolate(self, fault: BaseException) -> None:
        """The shared batch raised: its requests run again one by one (the guilty one fails)."""
        tickets = list({id(r.ticket): r.ticket for r in self._rows}.values())
        self._rows, self._state = [], None
        if len(tickets) == 1:
            tickets[0].submission.fail(typed_fault(fault))
            return
        self._scheduler.readmit_alone([t for t in tickets if not t.submission.finished])
