"""status callbacks: the callback_events queue, the callback target of a message, and the
re-queue generation of a delivery

Revision ID: 0006_i16
Revises: i15_0001
Create Date: 2026-12-01 22:15:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_i16"
down_revision = "i15_0001"
branch_labels = None
depends_on = None

BigIntPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "callback_events",
        sa.Column("id", BigIntPK, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("delivery_id", sa.String(36), nullable=False),
        sa.Column("message_id", sa.String(36), nullable=False),
        sa.Column("clinic_id", sa.String(64), nullable=True),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("url", sa.String(2000), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("last_error", sa.String(300), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_callback_events")),
        sa.UniqueConstraint("event_id", name=op.f("uq_callback_events_event_id")),
    )
    op.create_index(
        "ix_callback_events_due", "callback_events", ["state", "next_attempt_at"], unique=False
    )
    op.create_index(
        "ix_callback_events_delivery", "callback_events", ["delivery_id", "state", "seq"]
    )
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("callback_url", sa.String(2000), nullable=True))
        batch_op.add_column(sa.Column("callback_opts", sa.JSON(), nullable=True))
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("requeues", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("requeues")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("callback_opts")
        batch_op.drop_column("callback_url")
    op.drop_index("ix_callback_events_delivery", table_name="callback_events")
    op.drop_index("ix_callback_events_due", table_name="callback_events")
    op.drop_table("callback_events")
