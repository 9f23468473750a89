"""The sender's group commit of outcomes: a batch's outcomes recorded in few transactions,
never waiting out the linger once every email of the batch is in.

The lingers here are a minute long and every wait is bounded at a few seconds, so a
test that passes shows the group was written because the batch was complete, not
because the linger ran out."""

from __future__ import annotations

import asyncio
from typing import Any

from channels.email.sender import SENT, GroupCommit, Outcome

LONG_LINGER_S = 60.0
BOUND_S = 5.0


class Written:
    """The groups handed to the commit's `write`, as it received them."""

    def __init__(self) -> None:
        self.groups: list[list[int]] = []

    async def __call__(self, group: list[tuple[Any, Outcome]]) -> None:
        self.groups.append([email for email, _ in group])


def sent(lead_id: int) -> Outcome:
    return Outcome(SENT, lead_id, to_address=f"lead{lead_id}@example.com", event="email.sent")


async def test_a_batch_whose_outcomes_are_all_in_is_written_at_once_in_one_group() -> None:
    written = Written()
    commit = GroupCommit(written, expected=5, linger_s=LONG_LINGER_S)

    await asyncio.wait_for(
        asyncio.gather(*(commit.record(email, sent(email)) for email in range(5))), BOUND_S
    )

    assert written.groups == [[0, 1, 2, 3, 4]]


async def test_an_email_that_hands_in_no_outcome_does_not_hold_its_group() -> None:
    written = Written()
    commit = GroupCommit(written, expected=3, linger_s=LONG_LINGER_S)

    async def left_for_later() -> None:
        await asyncio.sleep(0)
        commit.none_from(2)

    await asyncio.wait_for(
        asyncio.gather(commit.record(0, sent(0)), commit.record(1, sent(1)), left_for_later()),
        BOUND_S,
    )

    assert written.groups == [[0, 1]]


async def test_outcomes_still_awaited_do_not_hold_a_group_past_its_linger() -> None:
    written = Written()
    commit = GroupCommit(written, expected=10, linger_s=0.01)

    await asyncio.wait_for(commit.record(0, sent(0)), BOUND_S)

    assert written.groups == [[0]]


async def test_an_outcome_handed_in_while_a_group_is_written_goes_in_the_next() -> None:
    writing, release = asyncio.Event(), asyncio.Event()
    groups: list[list[int]] = []

    async def slow_write(group: list[tuple[Any, Outcome]]) -> None:
        groups.append([email for email, _ in group])
        writing.set()
        await release.wait()

    commit = GroupCommit(slow_write, expected=2, linger_s=0.01)
    first = asyncio.create_task(commit.record(0, sent(0)))
    await asyncio.wait_for(writing.wait(), BOUND_S)  # the first group is being written
    second = asyncio.create_task(commit.record(1, sent(1)))
    await asyncio.sleep(0)
    release.set()

    await asyncio.wait_for(asyncio.gather(first, second, commit.flushed()), BOUND_S)

    assert groups == [[0], [1]]
