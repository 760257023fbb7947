"""The scheduler alone: fake tickets in, the tickets that join at this step out."""

from __future__ import annotations

from fusion_llm.core.config import GenerationSpec
from fusion_llm.runtime.request import DONE, PromptBatch, Request, Submission, Ticket
from fusion_llm.runtime.scheduler import Scheduler


def ticket(rows: int, events: list | None = None) -> Ticket:
    tokens = PromptBatch([[1, 2]] * rows, [[1, 2]] * rows)
    request = Request(tokens, [], "none", GenerationSpec(), set(), [[]] * rows)
    return Ticket(request, 0, Submission((events if events is not None else []).append, 1))


def test_waiting_tickets_join_first_come_first_served_within_max_rows():
    scheduler = Scheduler(max_rows=4)
    a, b, c = ticket(2), ticket(3), ticket(1)
    for t in (a, b, c):
        scheduler.add(t)
    assert scheduler.admit(running_rows=0, running_isolated=False) == [a]  # b does not fit
    assert scheduler.admit(running_rows=2, running_isolated=False) == []  # nor overtaking c
    assert scheduler.admit(running_rows=1, running_isolated=False) == [b]
    assert scheduler.admit(running_rows=4, running_isolated=False) == []
    assert scheduler.admit(running_rows=3, running_isolated=False) == [c]


def test_a_ticket_larger_than_an_empty_batch_still_runs():
    scheduler = Scheduler(max_rows=2)
    big = ticket(5)
    scheduler.add(big)
    assert scheduler.admit(running_rows=0, running_isolated=False) == [big]


def test_cancelled_tickets_are_ended_not_admitted():
    events: list = []
    scheduler = Scheduler(max_rows=8)
    gone, kept = ticket(1, events), ticket(1)
    gone.submission.cancelled.set()
    scheduler.add(gone)
    scheduler.add(kept)
    assert scheduler.admit(running_rows=0, running_isolated=False) == [kept]
    assert events == [DONE]


def test_tickets_rerun_after_a_fault_run_alone_and_first():
    scheduler = Scheduler(max_rows=8)
    new, x, y = ticket(1), ticket(1), ticket(1)
    scheduler.add(new)
    scheduler.readmit_alone([x, y])
    assert (
        scheduler.admit(running_rows=1, running_isolated=False) == []
    )  # x waits for an empty batch
    assert scheduler.admit(running_rows=0, running_isolated=False) == [x]
    assert scheduler.admit(running_rows=1, running_isolated=True) == []  # nothing joins x
    assert scheduler.admit(running_rows=0, running_isolated=False) == [y]
    assert scheduler.admit(running_rows=0, running_isolated=False) == [new]
