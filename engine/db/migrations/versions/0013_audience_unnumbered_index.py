"""Memberships waiting for a change number are found through one partial index.

The index of memberships by `seq` alone served only the two look-ups of those not
numbered yet (`seq IS NULL`): the sequencer's, in key order, and the queue depth's
count. It cost an entry on every membership change, added, removed or numbered.
The partial index of the memberships not numbered yet, keyed like the table
(`audience`, `lead_id`), now serves both: the sequencer reads it in its order, and
holds only the changes still to number.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | None = None
depends_on: str | None = None

UNNUMBERED = "seq IS NULL"


def _unnumbered_index(columns: list[str]) -> None:
    op.create_index(
        "ix_audience_members_unsequenced",
        "audience_members",
        columns,
        sqlite_where=sa.text(UNNUMBERED),
        postgresql_where=sa.text(UNNUMBERED),
    )


def upgrade() -> None:
    op.drop_index("ix_audience_members_seq", table_name="audience_members")
    op.drop_index("ix_audience_members_unsequenced", table_name="audience_members")
    _unnumbered_index(["audience", "lead_id"])


def downgrade() -> None:
    op.drop_index("ix_audience_members_unsequenced", table_name="audience_members")
    _unnumbered_index(["lead_id"])
    op.create_index("ix_audience_members_seq", "audience_members", ["seq"])
