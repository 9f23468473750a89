"""KPI roll-ups: per-journey figures kept up to date as leads move, and what feeds them
(a lead's first-touch source; an email's first open, click and unsubscribe).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None

# As in 0001: engine.db.types.BigId and Instant, spelled out.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
INSTANT = sa.BigInteger()


def _counters(name: str, keys: list[sa.Column[Any]], counts: list[sa.Column[Any]]) -> None:
    """A roll-up table: journey, day, its own keys and a shard, then the counts."""
    op.create_table(
        name,
        sa.Column("journey_id", sa.String(64), nullable=False),
        sa.Column("day", sa.Integer(), nullable=False),
        *keys,
        sa.Column("shard", sa.Integer(), nullable=False),
        *counts,
        sa.PrimaryKeyConstraint(
            "journey_id", "day", *(key.name for key in keys), "shard", name=f"pk_{name}"
        ),
    )


def _ints(*names: str) -> list[sa.Column[Any]]:
    return [sa.Column(name, sa.Integer(), nullable=False) for name in names]


def upgrade() -> None:
    op.add_column("leads", sa.Column("first_source", sa.String(200), nullable=True))
    op.add_column("leads", sa.Column("first_source_at", INSTANT, nullable=True))
    for column in ("opened_at", "clicked_at", "unsubscribed_at"):
        op.add_column("emails", sa.Column(column, INSTANT, nullable=True))
    op.create_table(
        "kpi_leads",
        sa.Column("journey_id", sa.String(64), nullable=False),
        sa.Column("lead_id", ID, nullable=False),
        sa.Column("day", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(200), nullable=False),
        sa.Column("goals", sa.Integer(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("journey_id", "lead_id", name="pk_kpi_leads"),
    )
    op.create_index("ix_kpi_leads_lead_id", "kpi_leads", ["lead_id"])
    _counters(
        "kpi_cohorts",
        [sa.Column("source", sa.String(200), nullable=False)],
        [*_ints("leads", "customers", "goals"), sa.Column("value", sa.Float(), nullable=False)],
    )
    _counters(
        "kpi_moves",
        [
            sa.Column("from_stage", sa.String(64), nullable=False),
            sa.Column("to_stage", sa.String(64), nullable=False),
        ],
        _ints("leads"),
    )
    _counters(
        "kpi_stage_times",
        [
            sa.Column("stage", sa.String(64), nullable=False),
            sa.Column("bucket", sa.Integer(), nullable=False),
        ],
        [*_ints("leads"), sa.Column("seconds", sa.Float(), nullable=False)],
    )
    _counters(
        "kpi_emails",
        [sa.Column("template", sa.String(64), nullable=False)],
        _ints("sent", "opened", "clicked", "unsubscribed", "bounced"),
    )
    _counters(
        "kpi_offers",
        [sa.Column("offer", sa.String(64), nullable=False)],
        _ints("granted", "redeemed", "expired", "refused"),
    )


def downgrade() -> None:
    for name in ("kpi_offers", "kpi_emails", "kpi_stage_times", "kpi_moves", "kpi_cohorts"):
        op.drop_table(name)
    op.drop_index("ix_kpi_leads_lead_id", table_name="kpi_leads")
    op.drop_table("kpi_leads")
    with op.batch_alter_table("emails") as batch:
        for column in ("unsubscribed_at", "clicked_at", "opened_at"):
            batch.drop_column(column)
    with op.batch_alter_table("leads") as batch:
        batch.drop_column("first_source_at")
        batch.drop_column("first_source")
