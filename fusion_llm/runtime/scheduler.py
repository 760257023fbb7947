"""Which waiting requests join the running batch at a step boundary.

One `admit` call per decoding step returns the tickets that join now; the batcher prefills them
and they decode with the running rows from that step on, while finished rows leave at every step.
First come, first served within `max_rows`: a ticket that does not fit waits, and so does every
ticket behind it (no overtaking, so none starves). A ticket rerun after a fault in a shared batch
(`Ticket.isolated`) runs alone: it joins only an empty batch and nothing joins it.
"""

from __future__ import annotations

from collections import deque

from .request import Ticket


class Scheduler:
    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self.waiting: deque[Ticket] = deque()

    def add(self, ticket: Ticket) -> None:
        self.waiting.append(ticket)

    def readmit_alone(self, tickets: list[Ticket]) -> None:
        """Tickets whose shared batch failed: each runs again alone, before anything new."""
        for ticket in reversed(tickets):
            ticket.isolated = True
            self.waiting.appendleft(ticket)

    def admit(self, running_rows: int, running_isolated: bool) -> list[Ticket]:
        """The tickets that join a batch of `running_rows` rows now (cancelled ones are ended)."""
        admitted: list[Ticket] = []
        rows = running_rows
        while self.waiting and not running_isolated:
            ticket = self.waiting[0]
            if ticket.submission.finished:
                self.waiting.popleft().submission.part_done()
                continue
            busy = rows > 0
            if ticket.isolated and busy:
                break
            if busy and rows + ticket.request.rows > self.max_rows:
                break
            admitted.append(self.waiting.popleft())
            rows += ticket.request.rows
            if ticket.isolated:
                break
        return admitted
