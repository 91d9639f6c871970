"""The periodic reads of every serve and worker process read indexes for what they need
(migration i20_0004): the bounce-rate alert's count `ix_deliveries_sent` for its period,
the retention pass `ix_delivery_events_retained`, the webhook sweep
`ix_delivery_events_unprocessed`; and long reads on a SQLite file
(`Database.report`) leave the event loop free."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert, text

from clinicomm.delivery.bounces import bounce_counts, bounce_query
from clinicomm.delivery.ingest import unapplied
from clinicomm.delivery.retention import events_to_erase, purge_events
from clinicomm.store.db import Database
from clinicomm.store.models import Delivery, DeliveryEventRecord, Message

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


async def _deliveries(db: Database, rows: list[dict[str, Any]]) -> None:
    async with db.session() as session:
        await session.execute(
            insert(Message),
            [{"id": "m-1", "clinic_id": "c-1", "category": "x", "content": b"x", "meta": {}}],
        )
        base = {"message_id": "m-1", "channel": "email", "recipient": "", "created_at": NOW}
        await session.execute(insert(Delivery), [{**base, **row} for row in rows])


_ids = itertools.count()


def _sent(n: int, *, clinic: str, provider: str, status: str, at: datetime) -> list[dict[str, Any]]:
    return [
        {
            "id": f"d-{next(_ids)}",
            "clinic_id": clinic,
            "provider": provider,
            "status": status,
            "sent_at": at,
        }
        for i in range(n)
    ]


async def _events(db: Database, rows: list[dict[str, Any]]) -> None:
    """Webhook event rows of clinic c-1 (a status report unless a row says otherwise)."""
    base = {"clinic_id": "c-1", "provider": "sendgrid", "event_type": "delivered"}
    async with db.session() as session:
        await session.execute(
            insert(DeliveryEventRecord),
            [{**base, "event_id": f"ev-{next(_ids)}", **row} for row in rows],
        )


async def test_counts_only_what_was_handed_over_in_the_period(db: Database) -> None:
    await _deliveries(
        db,
        _sent(3, clinic="c-1", provider="clinic:sendgrid", status="delivered", at=NOW)
        + _sent(1, clinic="c-1", provider="clinic:sendgrid", status="bounced", at=NOW)
        + _sent(2, clinic="c-2", provider="global:smtp", status="sent", at=NOW)
        # Before the period, and not handed over at all: not counted.
        + _sent(
            5,
            clinic="c-1",
            provider="clinic:sendgrid",
            status="bounced",
            at=NOW - timedelta(days=2),
        )
        + [{"id": "d-queued", "clinic_id": "c-1", "status": "queued"}],
    )
    async with db.report() as session:
        counts = await bounce_counts(session, NOW - timedelta(hours=1))
        one = await bounce_counts(session, NOW - timedelta(hours=1), clinic_id="c-2")
    found = sorted((c.clinic_id, c.provider, c.total, c.bounced) for c in counts)
    assert found == [("c-1", "clinic:sendgrid", 4, 1), ("c-2", "global:smtp", 2, 0)]
    assert [(c.clinic_id, c.total) for c in one] == [("c-2", 2)]


async def _plan(db: Database, query: Any) -> str:
    """The plan the database chooses for `query` (PostgreSQL: with sequential scans priced
    out, as a table of a few test rows would always be scanned)."""
    async with db.read() as session:
        connection = await session.connection()
        compiled = query.compile(dialect=connection.dialect)
        params = tuple(compiled.params[name] for name in compiled.positiontup or [])
        if connection.dialect.name == "sqlite":
            rows = await connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", params)
            return " ".join(str(r[-1]) for r in rows)
        await connection.exec_driver_sql("SET enable_seqscan = off")
        try:
            rows = await connection.exec_driver_sql(f"EXPLAIN {compiled}", params)
            return " ".join(r[0] for r in rows)
        finally:
            await connection.exec_driver_sql("RESET enable_seqscan")


async def test_the_alerts_count_reads_ix_deliveries_sent(db: Database) -> None:
    """Every clinic's count (the alert's): not a scan of every delivery ever sent, the
    partial index for the period."""
    earlier = NOW - timedelta(days=3)
    await _deliveries(
        db,
        _sent(50, clinic="c-1", provider="clinic:sendgrid", status="sent", at=NOW)
        + _sent(2000, clinic="c-2", provider="global:smtp", status="delivered", at=earlier),
    )
    if not db.is_sqlite:  # the planner's statistics of this table, not of earlier tests'
        async with db.session() as session:
            await session.execute(text("ANALYZE deliveries"))
    plan = await _plan(db, bounce_query(NOW - timedelta(hours=1), until=NOW))
    assert "ix_deliveries_sent" in plan, plan
    if db.is_sqlite:
        assert "COVERING INDEX ix_deliveries_sent" in plan, plan


async def test_the_retention_pass_reads_only_events_still_holding_an_address(
    db: Database,
) -> None:
    """`purge_events` (every reaper pass) by `ix_delivery_events_retained`; an erased event
    leaves it, so the pass does not read it again."""
    await _events(
        db,
        [
            {
                "event_type": "inbound",
                "recipient_enc": "sealed",
                "received_at": NOW - timedelta(days=40),
            }
            for _ in range(3)
        ],
    )
    plan = await _plan(db, events_to_erase(NOW - timedelta(days=30), 5000))
    assert "ix_delivery_events_retained" in plan, plan
    async with db.session() as session:
        assert await purge_events(session, NOW - timedelta(days=30)) == 3
    async with db.read() as session:
        assert (await session.scalars(events_to_erase(NOW - timedelta(days=30), 5000))).all() == []


async def test_the_webhook_sweep_reads_only_unapplied_events(db: Database) -> None:
    """The sweep (every 5 s) by `ix_delivery_events_unprocessed`, for its day only."""
    applied = {"processed_at": NOW, "received_at": NOW - timedelta(hours=1)}
    waiting = {"provider_message_id": "pm-unknown", "received_at": NOW - timedelta(minutes=5)}
    await _events(db, [{**applied, "provider_message_id": f"pm-{i}"} for i in range(2000)])
    await _events(db, [waiting])
    if not db.is_sqlite:
        async with db.session() as session:
            await session.execute(text("ANALYZE delivery_events"))
    plan = await _plan(db, unapplied(None, NOW - timedelta(days=1), 500))
    assert "ix_delivery_events_unprocessed" in plan, plan


#: A statement that keeps SQLite busy for a while (hundreds of milliseconds here).
_SLOW = text(
    "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 2000000) "
    "SELECT count(*) FROM n"
)


async def _ticks_during(db: Database, reader: str) -> int:
    """How many times another task ran while `_SLOW` ran in `db.<reader>()`."""
    ticks = 0
    running = True

    async def ticker() -> None:
        nonlocal ticks
        while running:
            await asyncio.sleep(0)
            ticks += 1

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    async with getattr(db, reader)() as session:
        before = ticks
        assert await session.scalar(_SLOW) == 2_000_000
        during = ticks - before
    running = False
    await task
    return during


async def test_report_reads_leave_the_loop_free(db: Database) -> None:
    """On a SQLite file `read` runs statements on the loop's thread (nothing else runs
    meanwhile) and `report` on its connection's thread; on PostgreSQL both wait on a socket."""
    if db.raw is not None:
        assert await _ticks_during(db, "read") <= 2
    assert await _ticks_during(db, "report") > 20
