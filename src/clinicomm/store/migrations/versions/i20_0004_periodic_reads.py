"""indexes for the periodic reads: ix_deliveries_sent, ix_delivery_events_retained and _unprocessed

Revision ID: i20_0004
Revises: i20_0003
Create Date: 2026-12-07 16:30:00

Three reads that serve and worker processes repeat scanned a whole table that only grows;
on SQLite they ran on the event loop's thread, so every request of the process waited.

- The bounce-rate alert counts, every `CLINICOMM_ALERT_INTERVAL_SECONDS` (60), the
  deliveries handed to a provider in the last 24 hours per clinic and provider
  (`delivery.bounces.bounce_counts`): 550-600 ms on SQLite at 300,000 deliveries (`POST` p99
  at 300 msg/s on SQLite ~100 ms in `make bench`). `ix_deliveries_sent (sent_at, clinic_id,
  provider, status) WHERE sent_at IS NOT NULL` holds every column it reads, so it reads the
  index alone, for the window only (136 ms when all 300,000 are inside it, 0.3 ms for an
  hour of them). A delivery gets its entry when it is handed over: the accept and the claim
  do not write it.
- The reaper's `purge_events` (every `reap_interval`, 5 s) looks for events whose address is
  still stored past the retention period: 67 ms on SQLite at 300,000 events.
  `ix_delivery_events_retained (received_at) WHERE recipient_enc IS NOT NULL` holds only
  those events, and an event leaves it when retention erases its address: 0.02 ms.
- The webhook sweep (`delivery.ingest.apply_stored`, every 5 s in every API process) looks
  for the last day's events not applied yet, in order: it read every event in id order
  (31 ms on SQLite at 300,000 applied events). `ix_delivery_events_unprocessed (received_at,
  id) WHERE processed_at IS NULL` holds only those not applied, which the sweep now reads in
  (received_at, id) order: 0.9 ms.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "i20_0004"
down_revision = "i20_0003"
branch_labels = None
depends_on = None

INDEXES = (
    ("ix_deliveries_sent", "deliveries", ["sent_at", "clinic_id", "provider", "status"],
     "sent_at IS NOT NULL"),
    ("ix_delivery_events_retained", "delivery_events", ["received_at"],
     "recipient_enc IS NOT NULL"),
    ("ix_delivery_events_unprocessed", "delivery_events", ["received_at", "id"],
     "processed_at IS NULL"),
)  # fmt: skip


def upgrade() -> None:
    with op.get_context().autocommit_block():
        for name, table, columns, where in INDEXES:
            op.create_index(
                name,
                table,
                columns,
                unique=False,
                postgresql_where=sa.text(where),
                sqlite_where=sa.text(where),
                postgresql_concurrently=True,
            )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name, table, _, _ in INDEXES:
            op.drop_index(name, table_name=table, postgresql_concurrently=True)
