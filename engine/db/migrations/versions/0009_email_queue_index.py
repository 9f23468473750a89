"""An index of the emails a sender may claim, in the order it claims them.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | None = None
depends_on: str | None = None

EMAIL_QUEUE = "status IN ('queued', 'deferred', 'sending')"


def upgrade() -> None:
    op.create_index(
        "ix_emails_queue",
        "emails",
        ["due_at", "id"],
        sqlite_where=sa.text(EMAIL_QUEUE),
        postgresql_where=sa.text(EMAIL_QUEUE),
    )


def downgrade() -> None:
    op.drop_index("ix_emails_queue", table_name="emails")
