"""The history loses its index by journey and time, which no query reads.

KPIs are read from the roll-ups, never from the history; the history is read by
enrollment (a lead's page, a merge or erasure rewriting the roll-ups), through
`ix_transitions_enrollment_id`. The index of (journey_id, at) cost an entry on
every move and was read by nothing.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.drop_index("ix_transitions_journey_id_at", table_name="transitions")


def downgrade() -> None:
    op.create_index("ix_transitions_journey_id_at", "transitions", ["journey_id", "at"])
