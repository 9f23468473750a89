"""The initial schema: leads, the event inbox, enrollments and what they drive.

Revision ID: 0001
Revises:
Create Date: 2026-11-22

Written against the database, not against engine.db: the types are spelled out so
this revision stays what it is whatever schema.py becomes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

# engine.db.types.BigId: SQLite autoincrements only an INTEGER PRIMARY KEY.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# engine.db.types.Instant: integer microseconds since the epoch, UTC.
INSTANT = sa.BigInteger()

TABLES = (
    "api_keys",
    "emails",
    "secrets",
    "suppressions",
    "audience_members",
    "enrollments",
    "events",
    "goals",
    "identities",
    "journey_versions",
    "leads",
    "outbox",
    "timers",
    "transitions",
)


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("name", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("created_at", INSTANT, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_api_keys"),
    )
    op.create_table(
        "emails",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("idempotency_key", sa.String(160), nullable=False),
        sa.Column("lead_id", ID, nullable=False),
        sa.Column("enrollment_id", ID, nullable=True),
        sa.Column("journey_id", sa.String(64), nullable=False),
        sa.Column("stage", sa.String(64), nullable=True),
        sa.Column("template", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("due_at", INSTANT, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("to_address", sa.String(320), nullable=True),
        sa.Column("message_id", sa.String(256), nullable=True),
        sa.Column("lease_until", INSTANT, nullable=True),
        sa.Column("created_at", INSTANT, nullable=False),
        sa.Column("updated_at", INSTANT, nullable=False),
        sa.Column("sent_at", INSTANT, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_emails"),
        sa.UniqueConstraint("idempotency_key", name="uq_emails_idempotency_key"),
    )
    op.create_index("ix_emails_lead_id", "emails", ["lead_id"])
    op.create_index("ix_emails_status_due_at", "emails", ["status", "due_at"])
    op.create_table(
        "secrets",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("value", sa.String(128), nullable=False),
        sa.Column("created_at", INSTANT, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_secrets"),
    )
    op.create_table(
        "suppressions",
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("lead_id", ID, nullable=True),
        sa.Column("created_at", INSTANT, nullable=False),
        sa.PrimaryKeyConstraint("email", name="pk_suppressions"),
    )
    op.create_table(
        "audience_members",
        sa.Column("audience", sa.String(64), nullable=False),
        sa.Column("lead_id", ID, nullable=False),
        sa.Column("journey_id", sa.String(64), nullable=False),
        sa.Column("added_at", INSTANT, nullable=False),
        sa.Column("removed_at", INSTANT, nullable=True),
        sa.PrimaryKeyConstraint("audience", "lead_id", name="pk_audience_members"),
    )
    op.create_index("ix_audience_members_lead_id", "audience_members", ["lead_id"])

    op.create_table(
        "enrollments",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("lead_id", ID, nullable=False),
        sa.Column("journey_id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("entry_no", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("entered_at", INSTANT, nullable=False),
        sa.Column("stage_entered_at", INSTANT, nullable=False),
        sa.Column("ended_at", INSTANT, nullable=True),
        sa.Column("sequences", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_enrollments"),
    )
    op.create_index("ix_enrollments_journey_id_stage", "enrollments", ["journey_id", "stage"])
    op.create_index(
        "uq_enrollments_lead", "enrollments", ["lead_id", "journey_id", "entry_no"], unique=True
    )
    op.create_index(
        "uq_enrollments_active",
        "enrollments",
        ["lead_id", "journey_id"],
        unique=True,
        sqlite_where=sa.text("state = 'active'"),
        postgresql_where=sa.text("state = 'active'"),
    )

    op.create_table(
        "events",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("message_id", sa.String(256), nullable=False),
        sa.Column("lead_id", ID, nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("timestamp", INSTANT, nullable=False),
        sa.Column("received_at", INSTANT, nullable=False),
        sa.Column("user_id", sa.String(256), nullable=True),
        sa.Column("anonymous_id", sa.String(256), nullable=True),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("merge_lead_id", ID, nullable=True),
        sa.Column("processed_at", INSTANT, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
        sa.UniqueConstraint("message_id", name="uq_events_message_id"),
    )
    op.create_index("ix_events_lead_id_timestamp", "events", ["lead_id", "timestamp"])
    op.create_index(
        "ix_events_pending",
        "events",
        ["id"],
        sqlite_where=sa.text("processed_at IS NULL"),
        postgresql_where=sa.text("processed_at IS NULL"),
    )

    op.create_table(
        "goals",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("enrollment_id", ID, nullable=False),
        sa.Column("journey_id", sa.String(64), nullable=False),
        sa.Column("message_id", sa.String(256), nullable=False),
        sa.Column("at", INSTANT, nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_goals"),
    )
    op.create_index("ix_goals_enrollment_id", "goals", ["enrollment_id"])

    op.create_table(
        "identities",
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("value", sa.String(256), nullable=False),
        sa.Column("lead_id", ID, nullable=False),
        sa.Column("created_at", INSTANT, nullable=False),
        sa.PrimaryKeyConstraint("kind", "value", name="pk_identities"),
    )
    op.create_index("ix_identities_lead_id", "identities", ["lead_id"])

    op.create_table(
        "journey_versions",
        sa.Column("journey_id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("checksum", sa.String(64), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("loaded_at", INSTANT, nullable=False),
        sa.PrimaryKeyConstraint("journey_id", "version", name="pk_journey_versions"),
    )

    op.create_table(
        "leads",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("created_at", INSTANT, nullable=False),
        sa.Column("updated_at", INSTANT, nullable=False),
        sa.Column("traits", sa.JSON(), nullable=False),
        sa.Column("email", sa.String(320), nullable=True),
        sa.Column("watermark", INSTANT, nullable=True),
        sa.Column("merged_into", ID, nullable=True),
        sa.Column("merged_at", INSTANT, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_leads"),
    )
    op.create_index("ix_leads_email", "leads", ["email"])
    op.create_index("ix_leads_merged_into", "leads", ["merged_into"])

    op.create_table(
        "outbox",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("idempotency_key", sa.String(128), nullable=False),
        sa.Column("lead_id", ID, nullable=False),
        sa.Column("enrollment_id", ID, nullable=False),
        sa.Column("journey_id", sa.String(64), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("target", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", INSTANT, nullable=False),
        sa.Column("updated_at", INSTANT, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.UniqueConstraint("idempotency_key", name="uq_outbox_idempotency_key"),
    )
    op.create_index("ix_outbox_lead_id", "outbox", ["lead_id"])
    op.create_index("ix_outbox_status_created_at", "outbox", ["status", "created_at"])

    op.create_table(
        "timers",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("due_at", INSTANT, nullable=False),
        sa.Column("lead_id", ID, nullable=False),
        sa.Column("enrollment_id", ID, nullable=False),
        sa.Column("stage", sa.String(64), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("transition", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_timers"),
    )
    op.create_index("ix_timers_due_at", "timers", ["due_at"])
    op.create_index("ix_timers_enrollment_id", "timers", ["enrollment_id"])
    op.create_index("ix_timers_lead_id_due_at", "timers", ["lead_id", "due_at"])

    op.create_table(
        "transitions",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("enrollment_id", ID, nullable=False),
        sa.Column("journey_id", sa.String(64), nullable=False),
        sa.Column("from_stage", sa.String(64), nullable=True),
        sa.Column("to_stage", sa.String(64), nullable=True),
        sa.Column("at", INSTANT, nullable=False),
        sa.Column("cause", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_transitions"),
    )
    op.create_index("ix_transitions_enrollment_id", "transitions", ["enrollment_id"])
    op.create_index("ix_transitions_journey_id_at", "transitions", ["journey_id", "at"])


def downgrade() -> None:
    # Dropping a table drops its indexes and constraints with it.
    for table in reversed(TABLES):
        op.drop_table(table)
