"""Nurture sequences: a run per started sequence, and the email of each of its steps.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

# As in 0001: engine.db.types.BigId and Instant, spelled out.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
INSTANT = sa.BigInteger()


def upgrade() -> None:
    op.create_table(
        "sequence_runs",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("idempotency_key", sa.String(160), nullable=False),
        sa.Column("lead_id", ID, nullable=False),
        sa.Column("enrollment_id", ID, nullable=False),
        sa.Column("journey_id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("sequence", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("next_at", INSTANT, nullable=True),
        sa.Column("stop_reason", sa.String(32), nullable=True),
        sa.Column("started_at", INSTANT, nullable=False),
        sa.Column("updated_at", INSTANT, nullable=False),
        sa.Column("ended_at", INSTANT, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_sequence_runs"),
        sa.UniqueConstraint("idempotency_key", name="uq_sequence_runs_idempotency_key"),
    )
    op.create_index("ix_sequence_runs_lead_id", "sequence_runs", ["lead_id"])
    op.create_index("ix_sequence_runs_status_next_at", "sequence_runs", ["status", "next_at"])
    op.create_index(
        "uq_sequence_runs_active",
        "sequence_runs",
        ["enrollment_id", "sequence"],
        unique=True,
        sqlite_where=sa.text("status = 'active'"),
        postgresql_where=sa.text("status = 'active'"),
    )
    # SQLite adds a column in place; no table rebuild is needed for a nullable one.
    op.add_column("emails", sa.Column("sequence_run_id", ID, nullable=True))
    op.create_index("ix_emails_sequence_run_id", "emails", ["sequence_run_id"])


def downgrade() -> None:
    op.drop_index("ix_emails_sequence_run_id", "emails")
    with op.batch_alter_table("emails") as batch:
        batch.drop_column("sequence_run_id")
    op.drop_table("sequence_runs")
