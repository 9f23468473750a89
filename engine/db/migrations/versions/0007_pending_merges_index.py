"""An index of the pending events that merge two leads, looked up by every worker batch.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None

PENDING_MERGES = "processed_at IS NULL AND merge_lead_id IS NOT NULL"


def upgrade() -> None:
    op.create_index(
        "ix_events_pending_merges",
        "events",
        ["lead_id"],
        sqlite_where=sa.text(PENDING_MERGES),
        postgresql_where=sa.text(PENDING_MERGES),
    )


def downgrade() -> None:
    op.drop_index("ix_events_pending_merges", table_name="events")
