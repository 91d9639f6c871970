"""deliveries.priority and deliveries.expires_at; the claim index by class

Revision ID: i18_0001
Revises: i19_0001
Create Date: 2026-12-02 07:10:00

`priority` is the claim class (0 urgent, 1 normal, 2 bulk; existing rows are normal),
`expires_at` the instant after which a delivery is never handed to a provider (it ends
`expired`). `ix_deliveries_claim (status, priority, fair_at)` replaces `ix_deliveries_due
(status, fair_at)`: the claim reads queued rows of one class in fair order from it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "i18_0001"
down_revision = "i19_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.drop_index("ix_deliveries_due")
        batch_op.create_index(
            "ix_deliveries_claim", ["status", "priority", "fair_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_deliveries_claim")
        batch_op.create_index("ix_deliveries_due", ["status", "fair_at"], unique=False)
        batch_op.drop_column("expires_at")
        batch_op.drop_column("priority")
