"""Time-limited offers: the code granted to each lead, and its fate.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

# As in 0001: engine.db.types.BigId and Instant, spelled out.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
INSTANT = sa.BigInteger()


def upgrade() -> None:
    op.create_table(
        "offers",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("lead_id", ID, nullable=False),
        sa.Column("enrollment_id", ID, nullable=True),
        sa.Column("journey_id", sa.String(64), nullable=False),
        sa.Column("offer", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("granted_at", INSTANT, nullable=False),
        sa.Column("expires_at", INSTANT, nullable=False),
        sa.Column("redeemed_at", INSTANT, nullable=True),
        sa.Column("redeemed_by", sa.String(256), nullable=True),
        sa.Column("expired_at", INSTANT, nullable=True),
        sa.Column("refused", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_offers"),
        sa.UniqueConstraint("code", name="uq_offers_code"),
    )
    op.create_index("ix_offers_lead", "offers", ["lead_id", "journey_id", "offer"])
    op.create_index("ix_offers_status_expires_at", "offers", ["status", "expires_at"])


def downgrade() -> None:
    op.drop_table("offers")
