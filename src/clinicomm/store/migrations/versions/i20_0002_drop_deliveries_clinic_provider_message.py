"""drop ix_deliveries_clinic_provider_message: the provider-id index alone serves its lookups

Revision ID: i20_0002
Revises: i20_0001
Create Date: 2026-12-03 13:20:00

A webhook finds its delivery by `provider_message_id` within a clinic (`ingest._find_delivery`)
or among the global providers' deliveries (`WebhookService` routing). Provider ids are unique
per message (a batch call's id is shared by its deliveries only), so
`ix_deliveries_provider_message_id` narrows either lookup to the delivery's own rows and the
clinic is a filter on them: the (clinic_id, provider_message_id) index answered nothing the
other did not. It cost an index entry on every insert and on every non-HOT update of a
delivery (its claim and its flush change indexed columns), three per delivery.

On PostgreSQL the index is dropped CONCURRENTLY, so writes to `deliveries` go on meanwhile.
"""

from __future__ import annotations

from alembic import op

revision = "i20_0002"
down_revision = "i20_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_deliveries_clinic_provider_message",
            table_name="deliveries",
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_deliveries_clinic_provider_message",
            "deliveries",
            ["clinic_id", "provider_message_id"],
            unique=False,
            postgresql_concurrently=True,
        )
