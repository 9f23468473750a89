"""Erasure: leads forgotten on request, and a record of each erasure without personal data.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

# As in 0001: engine.db.types.BigId and Instant, spelled out.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
INSTANT = sa.BigInteger()


def upgrade() -> None:
    op.add_column("leads", sa.Column("erased_at", INSTANT, nullable=True))
    op.add_column("audience_members", sa.Column("erased", sa.JSON(), nullable=True))
    op.create_table(
        "erasures",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("lead_id", ID, nullable=False),
        sa.Column("erased_at", INSTANT, nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_erasures"),
    )


def downgrade() -> None:
    op.drop_table("erasures")
    with op.batch_alter_table("audience_members") as batch:
        batch.drop_column("erased")
    with op.batch_alter_table("leads") as batch:
        batch.drop_column("erased_at")
