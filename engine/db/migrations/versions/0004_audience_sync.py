"""Audience sync: a change number on each membership, from a counter, for incremental exports.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "counters",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_counters"),
    )
    # Existing members start unnumbered: the sequencer numbers them on its first run.
    op.add_column("audience_members", sa.Column("seq", sa.BigInteger(), nullable=True))
    op.create_index("ix_audience_members_seq", "audience_members", ["seq"])
    op.create_index("ix_audience_members_audience_seq", "audience_members", ["audience", "seq"])
    op.create_index(
        "ix_audience_members_audience_added_at", "audience_members", ["audience", "added_at"]
    )
    op.create_index(
        "ix_audience_members_unsequenced",
        "audience_members",
        ["lead_id"],
        sqlite_where=sa.text("seq IS NULL"),
        postgresql_where=sa.text("seq IS NULL"),
    )


def downgrade() -> None:
    for name in (
        "ix_audience_members_unsequenced",
        "ix_audience_members_audience_added_at",
        "ix_audience_members_audience_seq",
        "ix_audience_members_seq",
    ):
        op.drop_index(name, "audience_members")
    with op.batch_alter_table("audience_members") as batch:
        batch.drop_column("seq")
    op.drop_table("counters")
