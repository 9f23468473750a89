"""An index of the offer grants not dispatched yet, which the email sender's claim probes.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | None = None
depends_on: str | None = None

PENDING_GRANT = "action = 'offer.grant' AND status = 'pending'"


def upgrade() -> None:
    op.create_index(
        "ix_outbox_pending_grants",
        "outbox",
        ["lead_id", "journey_id"],
        sqlite_where=sa.text(PENDING_GRANT),
        postgresql_where=sa.text(PENDING_GRANT),
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_pending_grants", table_name="outbox")
