"""Continuous batching: one decoder thread runs every request, joining and leaving at steps.

Callers (threads, or an event loop) submit prepared requests and read their own queue. The decoder
thread owns the models; its loop, once per step:
    1. take what arrived; the `Scheduler` says which waiting tickets join now;
    2. join: their rows are prefilled together (`DecodeBatch.prefilled`) and `extend` the running
       batch;
    3. step: every running row is fused (its own experts and mode), sampled (its own settings and
       generator), and its token sent to its caller; rows that finished (or whose caller went away)
       leave by `filter`, and the others read their token.
A request returns the moment its own rows finish; a request larger than `max_rows` is decoded in
parts (tickets).

Faults stay with their request (`decoder.py`): a row without a finite large-model logit fails its
own request only; when a shared prefill or step raises, each request involved runs again alone
(steps already delivered are skipped), so only the request at fault gets the error. Whatever a
forward raises (any `BaseException`), the caller gets a typed error and the thread goes on; a dead
thread is restarted by the next `submit`.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable

import torch

from ..core.fusion import AlphaSolver
from .batch import DecodeBatch, DecodeRow
from .decoder import SHUTDOWN, grammar_fault, row_fault, stop_at_exit, typed_fault
from .models import ModelSet
from .request import Request, RowEvent, Submission, Ticket, TokenScores
from .rows import RowId
from .sampler import SamplingBatch, StepLogprobs, sample, token_logprobs
from .scheduler import Scheduler
from .stops import stopped


class ContinuousBatcher:
    """The `Decoder` over HF models; see the module docstring."""

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
        self._window_s = window_s  # after a request arrives at an idle decoder, wait for others
        self._max_rows = max_rows
        self._idle_s = idle_s  # an idle decoder thread ends after this long
        self._incoming: queue.Queue[Ticket] = queue.Queue()
        self._lock = threading.Lock()  # guards starting and ending the thread
        self._worker: threading.Thread | None = None
        self._scheduler = Scheduler(max_rows)
        self._batch: DecodeBatch | None = None  # the running rows; None when there are none
        self._row_ids = itertools.count()
        stop_at_exit(self)

    def start(self) -> None:
        """Start the decoder thread now, so that the first request does not wait for it. Like any
        idle decoder thread, it ends after `idle_s` without work; `submit` starts it again."""
        with self._lock:
            self._start_worker()

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
            self._start_worker()
        return submission

    def _start_worker(self) -> None:
        """Start the decoder thread unless it runs (the caller holds `_lock`)."""
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(
                target=self._serve, name="fusion-llm-decoder", daemon=True
            )
            self._worker.start()

    # -- the loop ------------------------------------------------------------------------------
    @torch.inference_mode()  # the decoder thread never needs autograd (thread-local switch)
    def _serve(self) -> None:
        try:
            while self._batch is not None or self._wait_for_work():
                self._take_incoming()
                joining = self._scheduler.admit(*self._running())
                if joining:
                    self._join(joining)
                if self._batch is not None:
                    self._step()
        except BaseException as fault:  # a bug of the batcher itself: fail what it holds, not hang
            running = self._batch.rows if self._batch is not None else []
            held = {r.ticket.id: r.ticket for r in running}
            held.update((t.id, t) for t in self._scheduler.waiting)
            for ticket in held.values():
                ticket.submission.fail(typed_fault(fault))
            self._scheduler.waiting.clear()
            self._batch = None
            with self._lock:
                self._worker = None  # the next submit starts a new worker for what is queued

    def _running(self) -> tuple[int, bool]:
        """(rows running, whether they are a ticket rerun alone): what the scheduler admits to."""
        if self._batch is None:
            return 0, False
        return len(self._batch), any(r.ticket.isolated for r in self._batch.rows)

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
        rows = [
            DecodeRow(RowId(next(self._row_ids)), ticket, index, ticket.request.row_experts[index])
            for ticket in tickets
            for index in range(ticket.request.rows)
        ]
        try:
            with self._models_lock:
                joining = DecodeBatch.prefilled(self._models(), rows)
        except BaseException as fault:  # noqa: BLE001 - a forward may raise anything; we live on
            if len(tickets) == 1:
                tickets[0].submission.fail(typed_fault(fault))
                return
            for ticket in tickets:
                self._join([ticket])
            return
        if self._batch is None:
            self._batch = joining
        else:
            self._batch.extend(joining)

    # -- one step ------------------------------------------------------------------------------
    def _step(self) -> None:
        """Fuse, sample and deliver one token per running row, then feed the tokens back."""
        self._leave({b for b, r in enumerate(self._batch.rows) if r.ticket.submission.finished})
        if self._batch is None:
            return
        try:
            with self._models_lock:
                fused = self._batch.fuse(self._solver_for)
                tokens = sample(fused.logits, self._batch.sampling)  # [B]
                logprobs = token_logprobs(fused.logits, tokens, self._batch.sampling)
                # The step's one host read: tokens (exact in float32 below 2**24 ids), flags, alpha.
                flags = [t.float()[:, None] for t in (tokens, fused.fallback, fused.fault)]
                read = torch.cat([*flags, fused.alpha.float()], dim=1).tolist()
                finished = self._deliver(read, _scores(logprobs, self._batch.sampling))
                self._leave(finished)
                if self._batch is not None:
                    kept = [b for b in range(len(tokens)) if b not in finished]
                    self._batch.step(tokens[torch.tensor(kept, device=tokens.device)])
        except BaseException as fault:  # noqa: BLE001 - the shared state is lost: isolate
            self._isolate(fault)

    def _deliver(self, read: list[list[float]], scores: dict[int, TokenScores]) -> set[int]:
        """Record each row's token, send each ticket its events; the positions that finished.
        `read[b]`: row b's token, fallback and fault flags, then alpha over the batch's columns;
        `scores[b]`: row b's log-probabilities, when it reports them."""
        rows, columns = self._batch.rows, self._batch.columns
        tokens = [int(r[0]) for r in read]
        stops = self._stopped(tokens)
        allowed = self._batch.grammars.accept(tokens)
        events: dict[int, tuple[Ticket, list[RowEvent]]] = {}  # by ticket id
        finished: set[int] = set()
        for b, (row, (token, fallback, fault, *alpha)) in enumerate(zip(rows, read, strict=True)):
            ticket, token = row.ticket, int(token)
            if fault or not allowed[b]:
                ticket.submission.fail(row_fault() if fault else grammar_fault(token))
                finished.add(b)
                continue
            row.tokens.append(token)
            reason = _finish_reason(row, token, stops[b], self._batch.grammars.terminated(b))
            if reason is not None:
                finished.add(b)
            if len(row.tokens) <= ticket.delivered[row.index]:
                continue  # a rerun replays what its caller already has
            ticket.delivered[row.index] = len(row.tokens)
            own_alpha = [alpha[columns.index(e)] for e in row.experts]
            event = RowEvent(
                ticket.first_row + row.index,
                token,
                own_alpha,
                bool(fallback),
                reason,
                scores.get(b),
            )
            events.setdefault(ticket.id, (ticket, []))[1].append(event)
        for ticket, batch in events.values():
            ticket.submission.deliver(batch)
        self._complete(finished)
        return finished

    def _stopped(self, tokens: list[int]) -> list[bool]:
        """Per row, whether its text with its new token contains one of its own stop strings
        (one check per distinct stop list)."""
        rows = self._batch.rows
        by_stops: dict[tuple[str, ...], list[int]] = {}
        for b, row in enumerate(rows):
            if row.spec.stop:
                by_stops.setdefault(tuple(row.spec.stop), []).append(b)
        result = [False] * len(rows)
        for stops, members in by_stops.items():
            generated = [[*rows[b].tokens, tokens[b]] for b in members]
            hits = stopped(self._models().large.tokenizer, stops, generated)
            for b, hit in zip(members, hits, strict=True):
                result[b] = hit
        return result

    def _complete(self, finished: set[int]) -> None:
        """A ticket whose rows have all finished is answered now, not when the batch ends."""
        rows = self._batch.rows
        running = {r.ticket.id for b, r in enumerate(rows) if b not in finished}
        for b in finished:
            ticket = rows[b].ticket
            if not ticket.done and ticket.id not in running and not ticket.submission.failed:
                ticket.done = True
                ticket.submission.part_done()

    def _leave(self, positions: set[int]) -> None:
        """The rows at `positions` leave the batch (every cache and per-row state with them)."""
        if not positions:
            return
        kept = [b for b in range(len(self._batch)) if b not in positions]
        if kept:
            self._batch.filter(kept)
        else:
            self._batch = None

    def _isolate(self, fault: BaseException) -> None:
        """The shared batch raised: its requests run again one by one (the guilty one fails)."""
        tickets = list({r.ticket.id: r.ticket for r in self._batch.rows}.values())
        self._batch = None
        if len(tickets) == 1:
            tickets[0].submission.fail(typed_fault(fault))
            return
        self._scheduler.readmit_alone([t for t in tickets if not t.submission.finished])


def _scores(step: StepLogprobs | None, sampling: SamplingBatch) -> dict[int, TokenScores]:
    """Each reporting row's log-probabilities by position, with its own number of alternatives
    (read from the device only on steps where some row reports)."""
    if step is None:
        return {}
    chosen, ids, logprobs = step.chosen.tolist(), step.top_ids.tolist(), step.top_logprobs.tolist()
    return {
        b: TokenScores(
            chosen[r], list(zip(ids[r], logprobs[r], strict=True))[: sampling.logprobs[b]]
        )
        for r, b in enumerate(step.rows)
    }


def _finish_reason(row: DecodeRow, token: int, stopped: bool, completed: bool) -> str | None:
    """Why the row ends with `token` (None: it goes on); `completed`: its grammar has ended."""
    if token in row.ticket.request.eos_ids:
        return "eos"
    if stopped or completed:
        return "stop"
    if len(row.tokens) >= row.spec.max_new_tokens:
        return "length"
    return None
