"""deliveries by recipient_index: the owner of an inbound message to a global provider

Revision ID: i20_0001
Revises: i18_0001
Create Date: 2026-12-02 20:40:00

`WebhookService._inbound_owner` finds the clinic that last messaged a patient through a
global provider by each clinic's blind index of the sender. Without this index that was a
scan of a year of deliveries per inbound message.

On PostgreSQL the index is built CONCURRENTLY (outside the migration's transaction), so
acceptance and the worker keep writing to `deliveries` while it builds.
"""

from __future__ import annotations

from alembic import op

revision = "i20_0001"
down_revision = "i18_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_deliveries_recipient_index",
            "deliveries",
            ["recipient_index"],
            unique=False,
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_deliveries_recipient_index", table_name="deliveries", postgresql_concurrently=True
        )
