"""The outbox: enqueue, claim, lease, and a result written after the lease was lost."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from clinicomm.delivery.outbox import (
    claim,
    enqueue,
    flat,
    reap_expired,
    write_flat,
    write_results,
)
from clinicomm.delivery.records import Attempt, DeliveryStatus, NewDelivery, Outcome
from clinicomm.store.db import Database
from clinicomm.store.models import Delivery, DeliveryAttempt, Message, aware
from clinicomm.telemetry import metrics
from tests.conftest import BACKEND

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
LEASE = timedelta(seconds=60)


async def queued(db: Database, clinic: str) -> str:
    message_id = str(uuid.uuid4())
    delivery = NewDelivery(
        id=str(uuid.uuid4()),
        message_id=message_id,
        clinic_id=clinic,
        channel="sms",
        recipient="+14155552671",
        status=DeliveryStatus.QUEUED,
        fair_at=T0,
        created_at=T0,
    )
    async with db.session() as s:
        s.add(Message(id=message_id, clinic_id=clinic, category="GENERAL", content=b"x"))
        await s.flush()
        await enqueue(s, [delivery])
    return delivery.id


def lost_count() -> float:
    return sum(s.value for f in metrics.LEASE_LOST.collect() for s in f.samples
               if s.name.endswith("_total"))


async def test_an_outcome_after_a_lost_lease_is_counted_and_logged_not_written(
    db: Database, log_records: pytest.LogCaptureFixture
) -> None:
    clinic = f"c-{uuid.uuid4().hex[:8]}"
    delivery_id = await queued(db, clinic)
    async with db.session() as s:
        (mine,) = [c for c in await claim(s, owner="a", limit=100, now=T0, lease=LEASE)
                   if c.id == delivery_id]
    later = T0 + LEASE * 2  # worker a stalled past its lease; the reaper gave it to b
    async with db.session() as s:
        assert await reap_expired(s, later) >= 1
        taken = await claim(s, owner="b", limit=100, now=later, lease=LEASE)
        assert delivery_id in {c.id for c in taken}
    before = lost_count()
    attempt = Attempt.of(delivery_id, "clinic:twilio", 0.01, later, None)
    async with db.session() as s:
        written = await write_results(
            s, owner="a", now=later,
            outcomes=[mine.sent(provider="clinic:twilio", provider_message_id="SM1", at=later,
                                attempts=1, position=0, errors=[])],
            attempts=[attempt],
        )
    assert written.lease_lost == [delivery_id] and written.outcomes == 0
    assert lost_count() == before + 1
    (record,) = [r for r in log_records.records if getattr(r, "event", "") == "outcome_lease_lost"]
    assert record.levelno == logging.WARNING
    assert record.deliveryIds == [delivery_id]  # type: ignore[attr-defined]
    assert "+1415" not in str(record.__dict__)
    async with db.read() as s:
        row = await s.get(Delivery, delivery_id)
        assert row is not None and row.status == "sending" and row.lease_owner == "b"
        # The provider call happened: its attempt row is kept.
        attempts = await s.scalars(
            select(DeliveryAttempt).where(DeliveryAttempt.delivery_id == delivery_id)
        )
        assert len(list(attempts)) == 1
    async with db.session() as s:
        written = await write_results(
            s, owner="b", now=later,
            outcomes=[mine.requeue(later, "retrying")],
        )
    assert written.lease_lost == [] and written.outcomes == 1


async def test_a_claim_answers_its_rows_in_claim_order(db: Database) -> None:
    """Class first, then fair order, whatever order the table holds them in (RETURNING has
    none): rows written in reverse fair order come back in fair order."""
    clinic = f"c-{uuid.uuid4().hex[:8]}"
    message_id = str(uuid.uuid4())
    rows = [
        NewDelivery(
            id=f"d-{rank}-{second}",
            message_id=message_id,
            clinic_id=clinic,
            channel="sms",
            recipient="+14155552671",
            status=DeliveryStatus.QUEUED,
            fair_at=T0 + timedelta(seconds=second),
            created_at=T0,
            priority=rank,
        )
        for second in (5, 4, 3, 2, 1, 0)
        for rank in (2, 1, 0)
    ]
    async with db.session() as s:
        s.add(Message(id=message_id, clinic_id=clinic, category="GENERAL", content=b"x"))
        await s.flush()
        await enqueue(s, rows)
    async with db.session() as s:
        taken = await claim(
            s, owner="a", limit=100, now=T0 + timedelta(seconds=10), lease=LEASE, bulk_reserve=0
        )
    mine = [c.id for c in taken if c.clinic_id == clinic]
    assert mine == [f"d-{rank}-{second}" for rank in (0, 1, 2) for second in range(6)]


#: How the worker records results: in a transaction everywhere, and on PostgreSQL, when the
#: results are only outcomes and attempts, in one statement outside a transaction.
WRITERS = ["transaction"] + (["one statement"] if BACKEND == "postgres" else [])


@pytest.mark.parametrize("writer", WRITERS)
async def test_both_writers_record_the_same_rows(db: Database, writer: str) -> None:
    """Sent, failed and re-queued outcomes with their attempt rows; a delivery whose lease
    went to another worker keeps that worker's state (its attempt row is kept)."""
    clinic = f"c-{uuid.uuid4().hex[:8]}"
    ids = [await queued(db, clinic) for _ in range(4)]
    async with db.session() as s:
        mine = {c.id: c for c in await claim(s, owner="a", limit=100, now=T0, lease=LEASE)}
    lost = ids[3]
    async with db.session() as s:  # the last one's lease goes to b
        await s.execute(Delivery.__table__.update().where(Delivery.id == lost)
                        .values(lease_owner="b"))
    later = T0 + timedelta(seconds=5)
    retry_at = later + timedelta(minutes=2)
    error = {"reason": "provider said no", "errors": [{"provider": "clinic:twilio",
                                                       "code": "21211", "detail": "é ✓"}]}
    outcomes = [
        mine[ids[0]].sent(provider="clinic:twilio", provider_message_id="SM-1", at=later,
                          attempts=1, position=0, errors=[]),
        mine[ids[1]].fail("provider said no", errors=error["errors"], attempts=1,
                          provider="clinic:twilio"),
        mine[ids[2]].requeue(retry_at, "retrying", attempts=1, provider_attempts=1),
        mine[lost].sent(provider="clinic:twilio", provider_message_id="SM-4", at=later,
                        attempts=1, position=0, errors=[]),
    ]
    attempts = [Attempt(ids[0], "clinic:twilio", "sent", None, None, None, None, 12, later),
                Attempt(ids[1], "clinic:twilio", "failed", "permanent", 400, "21211", "é ✓",
                        30, later),
                Attempt(lost, "clinic:twilio", "sent", None, None, None, None, 9, later)]
    assert flat(outcomes, [], [], set(ids))
    if writer == "transaction":
        async with db.session() as s:
            written = await write_results(s, owner="a", now=later, outcomes=outcomes,
                                          attempts=attempts, no_callbacks=set(ids))
    else:
        written = await write_flat(db, owner="a", now=later, outcomes=outcomes,
                                   attempts=attempts)
    assert written.outcomes == 3 and written.lease_lost == [lost]
    async with db.read() as s:
        rows = {r.id: r for r in await s.scalars(select(Delivery).where(Delivery.id.in_(ids)))}
        found = sorted(
            (a.delivery_id, a.provider, a.outcome, a.error_class, a.status_code, a.error_code,
             a.detail, a.duration_ms, aware(a.at))
            for a in await s.scalars(
                select(DeliveryAttempt).where(DeliveryAttempt.delivery_id.in_(ids))))
    sent, failed, queued_again, theirs = (rows[i] for i in ids)
    assert (sent.status, sent.provider_message_id, sent.provider, sent.lease_owner,
            sent.lease_until, sent.error) == ("sent", "SM-1", "clinic:twilio", None, None, None)
    assert sent.sent_at is not None and sent.sent_at.replace(tzinfo=UTC) == later
    assert (failed.status, failed.error, failed.lease_owner) == ("failed", error, None)
    assert queued_again.status == "queued" and queued_again.attempts == 1
    assert queued_again.provider_attempts == 1
    assert queued_again.next_attempt_at.replace(tzinfo=UTC) == retry_at
    assert queued_again.fair_at.replace(tzinfo=UTC) == retry_at
    assert queued_again.error == {"reason": "retrying", "errors": []}
    assert (theirs.status, theirs.lease_owner) == ("sending", "b")
    assert found == sorted(
        (a.delivery_id, a.provider, a.outcome, a.error_class, a.status_code, a.error_code,
         a.detail, a.duration_ms, a.at) for a in attempts)


def test_results_with_more_than_outcomes_go_through_the_transaction() -> None:
    """A channel fallback, an opt-out or a status callback to queue needs the transaction."""
    outcome = Outcome("d-1", DeliveryStatus.SENT, 1)
    assert flat([outcome], [], [], {"d-1"})
    assert not flat([outcome], [], [], set())  # may have a callback target
    assert flat([Outcome("d-1", DeliveryStatus.QUEUED, 1)], [], [], set())  # no callback
    assert not flat([outcome], [object()], [], {"d-1"})  # type: ignore[list-item]
    assert not flat([outcome], [], [object()], {"d-1"})  # type: ignore[list-item]
