"""deliveries and callback_events: autovacuum after 2 % of their rows are dead, not 20 %

Revision ID: i20_0003
Revises: i20_0002
Create Date: 2026-12-04 23:40:00

Every claim and every recorded outcome rewrites a delivery row, and `status` is in the claim
index, so no such update is HOT: each leaves a dead row and a dead index entry in the range the
next claim scans (`status = 'queued'`). With PostgreSQL's default (a vacuum once 20 % of the
table is dead), a table of 1 M deliveries carries up to 200,000 dead entries there; measured
on 265,000, each of the claim's three index scans read ~190 pages to find nothing (0.9 ms
against 0.04 ms after a VACUUM), and at low rates there is about one claim per message.
`callback_events` is claimed the same way. Vacuuming after 2 % (plus 1,000 rows) keeps those
scans short; ANALYZE follows at the same pace so the planner sees the queue's real size.

PostgreSQL only (table storage parameters); nothing on SQLite. A server with autovacuum off
ignores them: the worker warns at start (`delivery.worker`, event `autovacuum_off`).
"""

from __future__ import annotations

from alembic import op

revision = "i20_0003"
down_revision = "i20_0002"
branch_labels = None
depends_on = None

TABLES = ("deliveries", "callback_events")
PARAMETERS = {
    "autovacuum_vacuum_scale_factor": "0.02",
    "autovacuum_vacuum_threshold": "1000",
    "autovacuum_analyze_scale_factor": "0.02",
    "autovacuum_analyze_threshold": "1000",
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    settings = ", ".join(f"{name} = {value}" for name, value in PARAMETERS.items())
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} SET ({settings})")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} RESET ({', '.join(PARAMETERS)})")
