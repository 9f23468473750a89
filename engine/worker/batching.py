"""How many leads the worker's next batch claims: as many as fit in a short transaction.

A batch is one write transaction, and on SQLite the database has one writer: while a
batch is written, an HTTP call waiting for the inbox to store its events waits too.
Large batches cost the worker less per lead (a commit, a claim and a few bulk queries
each, whatever their size); small ones keep ingestion's waits short. What a lead costs
varies by an order of magnitude (a due timer is a small move; five fresh events are
a new run, its history and its outbox), so no one count suits both. A batch is sized
instead by time: each batch's duration gives the cost of a lead, and the next batch
claims as many leads as fit in a target, short while other writers wait for the
batches (the inbox, during ingestion), long while the worker has the database to
itself (a backlog of timers, the events left once ingestion pauses).
"""

from __future__ import annotations

import math

# While others wait: a wait behind a batch that a tracking call hardly notices. Alone:
# a batch's fixed costs small beside its leads, while a call that arrives during it
# waits about a tenth of a second, and the batches after it shrink toward 10 ms.
CONTENDED_TARGET_S = 0.01
ALONE_TARGET_S = 0.1
SMALLEST = 20
LARGEST = 5_000
FIRST = 200
# PostgreSQL's workers never wait for one another's batches, and there a batch's fixed
# costs are high: measured (bench/scaleout.py), batches sized to 50 ms tripled the
# workers' CPU per event, and so did four workers on two cores, whose batches run long
# because the cores are shared, sizing themselves down. There batches never go below
# a thousand leads, and run up to a quarter of a second: nobody waits for them.
POSTGRES_SMALLEST = 1_000
POSTGRES_TARGET_S = 0.25


def for_database(is_sqlite: bool) -> BatchSize:
    """The worker's sizing on SQLite or on PostgreSQL."""
    if is_sqlite:
        return BatchSize()
    return BatchSize(
        smallest=POSTGRES_SMALLEST, first=POSTGRES_SMALLEST, alone_target_s=POSTGRES_TARGET_S
    )


class BatchSize:
    """The number of leads to claim next, learnt from the batches before."""

    def __init__(
        self,
        *,
        smallest: int = SMALLEST,
        largest: int = LARGEST,
        first: int = FIRST,
        contended_target_s: float = CONTENDED_TARGET_S,
        alone_target_s: float = ALONE_TARGET_S,
    ) -> None:
        if not 0 < smallest <= first <= largest:
            raise ValueError(
                f"need 0 < smallest <= first <= largest, got {smallest}, {first}, {largest}"
            )
        self.smallest = smallest
        self.largest = largest
        self.contended_target_s = contended_target_s
        self.alone_target_s = alone_target_s
        self.leads = first

    def observe(self, leads: int, seconds: float, *, others_waited: bool) -> None:
        """A batch of `leads` leads held the writer `seconds` seconds, and other writers
        asked for it meanwhile or not.

        Only batches at least half full teach anything: a batch of the few leads that
        happened to be waiting is mostly fixed cost, and would make leads look dearer
        than they are. The step is the geometric mean of the size now and the size the
        batch suggests, so one slow batch (a checkpoint, a busy machine) moves it part
        of the way, not all of it.
        """
        if leads < self.leads / 2 or seconds <= 0:
            return
        target = self.contended_target_s if others_waited else self.alone_target_s
        suggested = leads * target / seconds
        stepped = math.sqrt(self.leads * suggested)
        self.leads = max(self.smallest, min(self.largest, round(stepped)))
