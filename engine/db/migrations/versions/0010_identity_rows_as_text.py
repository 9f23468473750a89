"""Identifiers hashed ahead, kept as the text the exports send, and checked in SQL.

The stored rows are a cache the audience job fills (channels/audiences/identities.py):
the old ones are dropped rather than converted, and the job works them out again
when it starts.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | None = None
depends_on: str | None = None

LEAD_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.drop_table("audience_identities")
    op.create_table(
        "audience_identities",
        sa.Column("lead_id", LEAD_ID, nullable=False),
        sa.Column("region", sa.Text(), nullable=False),
        sa.Column("identifiers", sa.Text(), nullable=False),
        sa.Column("meta", sa.Text(), nullable=False),
        sa.Column("google", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("lead_id", name="pk_audience_identities"),
    )


def downgrade() -> None:
    op.drop_table("audience_identities")
    op.create_table(
        "audience_identities",
        sa.Column("lead_id", LEAD_ID, nullable=False),
        sa.Column("digest", sa.String(32), nullable=False),
        sa.Column("rows", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("lead_id", name="pk_audience_identities"),
    )
