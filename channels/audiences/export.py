"""Audience exports for ad platforms: Meta Custom Audience pages, Google Customer Match
CSV, and a clear CSV for CRMs, all full or incremental through one cursor.

A cursor says which change numbers an export has covered (see store.py). Without one,
an export starts from the beginning and gives the current members as adds. Every answer
carries the cursor to continue with; the last one's cursor, kept until the next sync,
asks for exactly the adds and removes made since. The newest change number is read once
when an export starts and fixed in its cursors, so its pages never shift under
concurrent changes: a member changed meanwhile is left to the next sync, which gets its
latest state.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection

from channels.audiences.identities import ExportedRow, platform_rows, row_text
from channels.audiences.normalize import GOOGLE_HEADER, META_SCHEMA
from channels.audiences.store import Member, Op, last_number, read_members
from engine.db.database import Database

META_PAGE = 10_000  # Meta takes at most 10,000 rows per request
STREAM_CHUNK = 5_000
CSV_HEADER = (
    "lead_id",
    "op",
    "email",
    "phone",
    "first_name",
    "last_name",
    "city",
    "state",
    "zip",
    "country",
    "added_at",
    "removed_at",
)


class BadCursor(ValueError):
    pass


@dataclass(frozen=True)
class Cursor:
    """Changes numbered above `after` are still to come, up to `upto` in this export
    (None: up to the newest, read when the export starts). `full`: current members only."""

    after: int = 0
    upto: int | None = None
    full: bool = True

    def encode(self) -> str:
        body = json.dumps({"a": self.after, "u": self.upto, "f": self.full}, separators=(",", ":"))
        return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            body = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            after, upto, full = body["a"], body["u"], body["f"]
        except (ValueError, TypeError, KeyError) as error:
            raise BadCursor(f"not a cursor this server gave: {text[:40]!r}") from error
        if not (
            _count(after) and (upto is None or (_count(upto) and upto >= after))
        ) or not isinstance(full, bool):
            raise BadCursor(f"not a cursor this server gave: {text[:40]!r}")
        return cls(after, upto, full)

    def finished(self, upto: int) -> Cursor:
        """The cursor for the next sync, after this export covered everything up to `upto`."""
        return Cursor(after=upto, upto=None, full=False)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


@dataclass(frozen=True)
class MetaPage:
    """One page of Meta's Custom Audience payload: one `op`, at most `limit` rows, each
    the JSON array of one member under META_SCHEMA."""

    op: Op
    rows: list[str]
    next_cursor: str
    has_more: bool

    def json(self) -> bytes:
        """The page as Meta takes it (`schema`, `data`), with the cursor to go on with."""
        return orjson.dumps(
            {
                "schema": META_SCHEMA,
                "op": self.op,
                "data": [orjson.Fragment(row) for row in self.rows],
                "next_cursor": self.next_cursor,
                "has_more": self.has_more,
            }
        )


async def meta_page(
    db: Database, audience: str, cursor: Cursor, limit: int, region: str | None
) -> MetaPage:
    """The page of Meta's payload that starts at `cursor`."""
    async with db.read() as connection:
        upto = cursor.upto if cursor.upto is not None else await last_number(connection)
        rows = await platform_rows(
            connection,
            audience,
            "meta",
            region,
            after=cursor.after,
            upto=upto,
            limit=min(limit, META_PAGE) + 1,
            adds_only=cursor.full,
        )
    op: Op = rows[0][1] if rows else "add"
    page = _leading_run(rows, op, min(limit, META_PAGE))
    has_more = len(rows) > len(page)
    following = Cursor(page[-1][0], upto, cursor.full) if has_more else cursor.finished(upto)
    return MetaPage(op, [text for _, _, text in page], following.encode(), has_more)


def _leading_run(rows: list[ExportedRow], op: Op, limit: int) -> list[ExportedRow]:
    """The first rows that share `op`, at most `limit` of them: a page is adds or removes."""
    page: list[ExportedRow] = []
    for row in rows[:limit]:
        if row[1] != op:
            break
        page.append(row)
    return page


@dataclass(frozen=True)
class CsvExport:
    """A whole CSV file, streamed, and the cursor to sync on from once it is read."""

    lines: AsyncIterator[str]
    next_cursor: str


async def csv_export(
    db: Database,
    audience: str,
    cursor: Cursor,
    *,
    google: bool,
    ops: Iterable[Op],
    region: str | None,
) -> CsvExport:
    """Google's Customer Match file (the rows of one `op`: a file of adds or of removes)
    or the clear CSV (with an `op` column), over the cursor's range, in constant memory."""
    async with db.read() as connection:
        upto = cursor.upto if cursor.upto is not None else await last_number(connection)
    wanted = set(ops)
    lines = (
        _google_lines(db, audience, cursor, upto, wanted, region)
        if google
        else _clear_lines(db, audience, cursor, upto, wanted)
    )
    return CsvExport(lines, cursor.finished(upto).encode())


Chunk = TypeVar("Chunk", ExportedRow, Member)


async def _chunks(
    db: Database,
    cursor: Cursor,
    read: Callable[[AsyncConnection, int], Awaitable[list[Chunk]]],
    seq_of: Callable[[Chunk], int],
) -> AsyncIterator[list[Chunk]]:
    """The export's rows after `cursor`, STREAM_CHUNK at a time, each chunk in a short
    read of its own: a long export holds no transaction open."""
    after = cursor.after
    while True:
        async with db.read() as connection:
            chunk = await read(connection, after)
        yield chunk
        if len(chunk) < STREAM_CHUNK:
            return
        after = seq_of(chunk[-1])


async def _google_lines(
    db: Database, audience: str, cursor: Cursor, upto: int, wanted: set[Op], region: str | None
) -> AsyncIterator[str]:
    yield row_text("google", list(GOOGLE_HEADER)) + "\n"

    def read(connection: AsyncConnection, after: int) -> Awaitable[list[ExportedRow]]:
        return platform_rows(
            connection,
            audience,
            "google",
            region,
            after=after,
            upto=upto,
            limit=STREAM_CHUNK,
            adds_only=cursor.full,
        )

    async for chunk in _chunks(db, cursor, read, lambda row: row[0]):
        yield "".join(f"{text}\n" for _, op, text in chunk if op in wanted)


async def _clear_lines(
    db: Database, audience: str, cursor: Cursor, upto: int, wanted: set[Op]
) -> AsyncIterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)

    def read(connection: AsyncConnection, after: int) -> Awaitable[list[Member]]:
        return read_members(
            connection, audience, after=after, upto=upto, limit=STREAM_CHUNK, adds_only=cursor.full
        )

    async for chunk in _chunks(db, cursor, read, lambda member: member.seq):
        # An erased lead's traits are empty: nothing in clear.
        writer.writerows(_clear_row(member) for member in chunk if member.op in wanted)
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()


def _clear_row(member: Member) -> list[Any]:
    traits = member.traits
    return [
        member.lead_id,
        member.op,
        *(_clear(traits.get(name)) for name in CSV_HEADER[2:10]),
        member.added_at.isoformat(),
        member.removed_at.isoformat() if member.removed_at else "",
    ]


def _clear(value: object) -> str:
    """A trait as a CSV cell: text as written (trimmed), numbers as digits, else empty."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return ""
