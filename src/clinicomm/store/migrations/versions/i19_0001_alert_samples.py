"""alert samples (issue 19: cache-hit and fetch-latency alerts from every process's counts)

Revision ID: i19_0001
Revises: 0006_i14
Create Date: 2026-12-02 07:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "i19_0001"
down_revision = "0006_i14"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alert_samples",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True,
                  nullable=False),
        sa.Column("process", sa.String(length=120), nullable=False),
        sa.Column("metric", sa.String(length=40), nullable=False),
        sa.Column("sampled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_samples")),
    )
    op.create_index(
        "ix_alert_samples_metric_time", "alert_samples", ["metric", "sampled_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_alert_samples_metric_time", table_name="alert_samples")
    op.drop_table("alert_samples")
