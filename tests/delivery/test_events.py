"""Webhook events applied to the store: dedupe, forward-only status, suppressions, window.

Runs on SQLite by default and on PostgreSQL with CLINICOMM_TEST_DB=postgres.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from clinicomm.delivery.ingest import ApplyResult, apply_stored, store_events
from clinicomm.delivery.suppressions import SuppressionReason, suppress
from clinicomm.delivery.window import is_open, last_inbound_among
from clinicomm.providers.base import Channel
from clinicomm.providers.webhooks import (
    DeliveryEvent,
    EventType,
    InboundMessage,
    WebhookEvent,
    meta,
    postmark,
    ses,
    twilio,
)
from clinicomm.store.db import Database
from clinicomm.store.models import Delivery, DeliveryEventRecord, Message, Suppression, aware
from tests.support.webhooks import form_request, is_suppressed, json_request, raw

CLINIC = "clinic-a"
OTHER = "clinic-b"
WAMID = "wamid.HBgLMTY1MDM4Nzk0MzkVAgARGBJDQjZCMzlEQUE4OTJBMTE4RTUA"
PATIENT = "+16505551234"
T0 = datetime(2025, 6, 18, 16, 0, tzinfo=UTC)


async def make_delivery(
    db: Database, *, clinic: str = CLINIC, channel: str = "whatsapp", recipient: str = PATIENT,
    provider: str = "meta_business", pmid: str | None = WAMID, status: str = "sent",
) -> str:
    message_id, delivery_id = str(uuid.uuid4()), str(uuid.uuid4())
    async with db.session() as s:
        s.add(Message(id=message_id, clinic_id=clinic, category="APPOINTMENT", content=b"x"))
        await s.flush()
        s.add(Delivery(id=delivery_id, message_id=message_id, clinic_id=clinic, channel=channel,
                       recipient=recipient, status=status, provider=provider,
                       provider_message_id=pmid))
    return delivery_id


async def get(db: Database, delivery_id: str) -> Delivery:
    async with db.session() as s:
        d = await s.get(Delivery, delivery_id)
        assert d is not None
        return d


def status_event(kind: EventType, status: str, ts: int, provider_id: str = WAMID) -> DeliveryEvent:
    return DeliveryEvent(
        provider="meta_business", event_id=f"{provider_id}:{status}", provider_message_id=provider_id,
        event_type=kind, occurred_at=datetime.fromtimestamp(ts, UTC), recipient=PATIENT,
        channel=Channel.WHATSAPP,
    )


async def apply_events(
    s: AsyncSession, clinic: str, events: list[WebhookEvent], *, now: datetime
) -> ApplyResult:
    """What the webhook endpoint runs: store (before the answer), then apply those rows."""
    ids, duplicates = await store_events(s, clinic, events, now=now)
    result = await apply_stored(s, ids=ids, now=now)
    result.stored, result.duplicates = len(ids), duplicates
    return result


async def window_open(s: AsyncSession, clinic: str, address: str, now: datetime) -> bool:
    last = await last_inbound_among(s, [(clinic, address)])
    return is_open(last.get((clinic, address)), now)


async def test_same_event_twice_changes_status_once(db: Database) -> None:
    delivery_id = await make_delivery(db)
    body = raw("meta", "statuses.json")
    events = meta.parse(json_request("https://x/", body))
    async with db.session() as s:
        first = await apply_events(s, CLINIC, events, now=T0)
    async with db.session() as s:
        second = await apply_events(s, CLINIC, events, now=T0 + timedelta(minutes=1))
    assert first.stored == 4 and first.duplicates == 0
    assert first.status_changes == 1  # read (then delivered does not regress)
    assert second.stored == 0 and second.duplicates == 4 and second.status_changes == 0
    d = await get(db, delivery_id)
    assert d.status == "read"
    async with db.session() as s:
        count = await s.scalar(select(func.count()).select_from(DeliveryEventRecord))
    assert count == 4


async def test_read_without_delivered_sets_both(db: Database) -> None:
    delivery_id = await make_delivery(db)
    async with db.session() as s:
        await apply_events(s, CLINIC, [status_event(EventType.READ, "read", 1750263773)], now=T0)
    d = await get(db, delivery_id)
    assert d.status == "read"
    assert d.delivered_at is not None and d.read_at is not None
    assert aware(d.delivered_at) == aware(d.read_at) == datetime.fromtimestamp(1750263773, UTC)


async def test_delivered_or_sent_after_read_does_not_regress(db: Database) -> None:
    delivery_id = await make_delivery(db)
    async with db.session() as s:
        await apply_events(s, CLINIC, [status_event(EventType.READ, "read", 1000)], now=T0)
    async with db.session() as s:
        result = await apply_events(
            s, CLINIC,
            [status_event(EventType.DELIVERED, "delivered", 900),
             status_event(EventType.SENT, "sent", 800),
             status_event(EventType.FAILED, "failed", 1100)],
            now=T0,
        )
    assert result.status_changes == 0
    d = await get(db, delivery_id)
    assert d.status == "read"
    assert aware(d.read_at or T0) == datetime.fromtimestamp(1000, UTC)


async def test_bounced_is_final(db: Database) -> None:
    delivery_id = await make_delivery(db, channel="email", recipient="jane@example.com",
                                      provider="postmark", pmid="883953f4-6105-42a2-a16a-77a8eac79483")
    bounce = postmark.parse(json_request("https://x/", raw("postmark", "bounce.json")))
    delivered = postmark.parse(json_request("https://x/", raw("postmark", "delivery.json")))
    async with db.session() as s:
        await apply_events(s, CLINIC, bounce + delivered, now=T0)
    d = await get(db, delivery_id)
    assert d.status == "bounced"
    assert d.error is not None and d.error["provider"] == "postmark"


async def test_events_are_scoped_by_clinic(db: Database) -> None:
    mine = await make_delivery(db, clinic=CLINIC)
    theirs = await make_delivery(db, clinic=OTHER)
    async with db.session() as s:
        await apply_events(s, OTHER, [status_event(EventType.DELIVERED, "delivered", 10)], now=T0)
    assert (await get(db, mine)).status == "sent"
    assert (await get(db, theirs)).status == "delivered"


async def test_hard_bounce_creates_a_suppression(db: Database) -> None:
    ses_pmid = "00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa0680-000000"
    delivery_id = await make_delivery(db, channel="email", recipient="jane@example.com",
                                      provider="ses", pmid=ses_pmid)
    from tests.providers.webhooks.test_ses import req, sns_message

    events = ses.parse(req(sns_message("bounce.json")))
    async with db.session() as s:
        result = await apply_events(s, CLINIC, events, now=T0)
    assert result.suppressions_added == 1
    assert (await get(db, delivery_id)).status == "bounced"
    async with db.session() as s:
        assert await is_suppressed(s, CLINIC, "email", "jane@example.com")
        assert not await is_suppressed(s, OTHER, "email", "jane@example.com")
        row = await s.get(Suppression, (CLINIC, "email", "jane@example.com"))
        assert row is not None and row.reason == "bounce" and row.source == "webhook:ses"


async def test_soft_bounce_does_not_suppress(db: Database) -> None:
    event = DeliveryEvent(provider="ses", event_id="e1", provider_message_id="m1",
                          event_type=EventType.BOUNCED, occurred_at=T0, recipient="a@example.com",
                          channel=Channel.EMAIL, bounce_permanent=False)
    async with db.session() as s:
        result = await apply_events(s, CLINIC, [event], now=T0)
        assert result.suppressions_added == 0
        assert not await is_suppressed(s, CLINIC, "email", "a@example.com")


async def test_stop_then_start_suppression(db: Database) -> None:
    stop = twilio.parse(form_request("https://x/", raw("twilio", "inbound_stop.form")))
    async with db.session() as s:
        result = await apply_events(s, CLINIC, stop, now=T0)
        assert result.suppressions_added == 1
    async with db.session() as s:
        assert await is_suppressed(s, CLINIC, "sms", "+15558675310")
        assert not await is_suppressed(s, CLINIC, "whatsapp", "+15558675310")
        record = await s.scalar(select(DeliveryEventRecord))
        assert record is not None and record.event_type == "inbound"
        assert record.payload == {"keyword": "stop", "to": "+15017122661"}  # no body text kept
    start = InboundMessage(provider="twilio", event_id="SMstart", channel=Channel.SMS,
                           sender="+15558675310", to="+15017122661", text=" unstop ",
                           occurred_at=None)
    async with db.session() as s:
        result = await apply_events(s, CLINIC, [start], now=T0)
        assert result.suppressions_lifted == 1
    async with db.session() as s:
        assert not await is_suppressed(s, CLINIC, "sms", "+15558675310")


async def test_start_does_not_lift_a_bounce(db: Database) -> None:
    async with db.session() as s:
        await suppress(s, CLINIC, "email", "a@example.com", SuppressionReason.BOUNCE, "test")
        await suppress(s, CLINIC, "sms", PATIENT, SuppressionReason.MANUAL, "api:staff")
    start_sms = InboundMessage(provider="twilio", event_id="SM1", channel=Channel.SMS,
                               sender=PATIENT, to=None, text="START", occurred_at=None)
    async with db.session() as s:
        await apply_events(s, CLINIC, [start_sms], now=T0)
    async with db.session() as s:
        assert await is_suppressed(s, CLINIC, "email", "a@example.com")
        assert not await is_suppressed(s, CLINIC, "sms", PATIENT)


async def test_twilio_21610_creates_an_opt_out(db: Database) -> None:
    await make_delivery(db, channel="sms", recipient="+15558675310", provider="twilio",
                        pmid="SMYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYY")
    events = twilio.parse(form_request("https://x/", raw("twilio", "status_21610.form")))
    async with db.session() as s:
        await apply_events(s, CLINIC, events, now=T0)
    async with db.session() as s:
        row = await s.get(Suppression, (CLINIC, "sms", "+15558675310"))
        assert row is not None and row.reason == "provider_21610"


async def test_inbound_whatsapp_opens_the_window_for_24_hours(db: Database) -> None:
    events = meta.parse(json_request("https://x/", raw("meta", "inbound_text.json")))
    sent_at = datetime.fromtimestamp(1749416383, UTC)
    async with db.session() as s:
        assert not await window_open(s, CLINIC, PATIENT, sent_at)
        await apply_events(s, CLINIC, events, now=sent_at)
    async with db.session() as s:
        assert await window_open(s, CLINIC, PATIENT, sent_at + timedelta(hours=23, minutes=59))
        assert not await window_open(s, CLINIC, PATIENT, sent_at + timedelta(hours=24, seconds=1))
        assert not await window_open(s, OTHER, PATIENT, sent_at + timedelta(hours=1))
        # The fixture's text is "Stop": a WhatsApp opt-out for this clinic, not SMS.
        assert await is_suppressed(s, CLINIC, "whatsapp", PATIENT)
        assert not await is_suppressed(s, CLINIC, "sms", PATIENT)
    older = InboundMessage(provider="meta_business", event_id="wamid.old", channel=Channel.WHATSAPP,
                           sender=PATIENT, to=None, text="hi", occurred_at=sent_at - timedelta(days=3))
    async with db.session() as s:
        await apply_events(s, CLINIC, [older], now=sent_at)
    async with db.session() as s:  # an older message arriving late does not shorten the window
        assert await window_open(s, CLINIC, PATIENT, sent_at + timedelta(hours=23))


async def test_event_before_the_provider_id_is_recorded_is_applied_later(db: Database) -> None:
    delivery_id = await make_delivery(db, pmid=None, status="sending")
    async with db.session() as s:
        result = await apply_events(s, CLINIC, [status_event(EventType.DELIVERED, "delivered", 50)],
                                    now=T0)
        assert result.unmatched == 1
    async with db.session() as s:
        d = await s.get(Delivery, delivery_id)
        assert d is not None
        d.provider_message_id = WAMID
        d.status = "sent"
        pending = await apply_stored(s, now=T0)  # the sweep
    assert pending.status_changes == 1
    assert (await get(db, delivery_id)).status == "delivered"
    async with db.session() as s:
        record = await s.scalar(select(DeliveryEventRecord))
        assert record is not None and record.delivery_id == delivery_id
        assert record.processed_at is not None
