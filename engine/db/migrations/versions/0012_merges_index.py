"""The index of events that merge two leads holds them processed too, not only pending.

Its condition no longer names `processed_at`, so the worker's lookup of a batch's
pending merges can use it while saying "pending" in a way that rules out
`ix_events_pending`: PostgreSQL planned on statistics from a quiet moment took that
index for a handful of rows and walked all of it, every pending event, per batch.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | None = None
depends_on: str | None = None

MERGES = "merge_lead_id IS NOT NULL"
PENDING_MERGES = "processed_at IS NULL AND merge_lead_id IS NOT NULL"


def upgrade() -> None:
    op.drop_index("ix_events_pending_merges", table_name="events")
    op.create_index(
        "ix_events_merges",
        "events",
        ["lead_id"],
        sqlite_where=sa.text(MERGES),
        postgresql_where=sa.text(MERGES),
    )


def downgrade() -> None:
    op.drop_index("ix_events_merges", table_name="events")
    op.create_index(
        "ix_events_pending_merges",
        "events",
        ["lead_id"],
        sqlite_where=sa.text(PENDING_MERGES),
        postgresql_where=sa.text(PENDING_MERGES),
    )
