"""Webhook events: store them, then apply them (the delivery status machine).

The webhook endpoint stores verified, parsed events with `store_events` (fast, before its
answer); `apply_stored` applies them afterwards (by ids, or as a sweep). Applying an event:

1. it was stored in `delivery_events` once: a second copy of the same (provider, clinic,
   event id) is ignored (INSERT … ON CONFLICT DO NOTHING), so a redelivered webhook changes
   nothing;
2. for a status report, the clinic's delivery is found by `provider_message_id` and its
   status moves forward only (`advance`): queued/sending < sent < delivered < read; `bounced`
   and `failed` are final. A `read` (or an email open/click) with no `delivered` before it
   sets both `delivered_at` and `read_at` (Meta sends no `delivered` when both happen
   together). A `failed` after `delivered` is ignored (WhatsApp multi-device reports,
   PROVIDER-FACTS §1.5); a `bounced` after `delivered` applies (mail servers bounce after
   accepting);
3. suppressions are recorded (`delivery.suppressions`): a hard bounce, a complaint, an
   unsubscribe, a provider's opt-out code (its webhook module's `OPT_OUT_CODES`), an opt-out
   the provider states outright (`DeliveryEvent.opt_out`: SendGrid's `dropped` "Bounced
   Address", Postmark's SubscriptionChange, Twilio 30005/30006), an inbound STOP keyword (or
   Twilio's `OptOutType=STOP`); an inbound START/YES/UNSTOP lifts an opt-out (not a bounce
   or a complaint), a provider's resubscribe lifts an unsubscribe; Meta's marketing
   preference is recorded on `MARKETING_SCOPE` (marketing messages only);
4. an inbound WhatsApp message refreshes the 24-hour window (`delivery.window`); a
   preference change that is not a message (`opens_window=False`) does not.

A status event whose delivery is not found yet (the webhook beat the worker's commit of the
provider message id) stays with `processed_at` NULL; the sweep applies it once the delivery
has that id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, and_, exists, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from clinicomm.callbacks import queue as callbacks
from clinicomm.crypto import FieldCipher, is_index
from clinicomm.delivery.records import DeliveryStatus
from clinicomm.delivery.suppressions import (
    MARKETING_SCOPE,
    RESUBSCRIBE_LIFTS,
    SuppressionReason,
    apply_keyword,
    canonical_key,
    suppress,
    unsuppress,
)
from clinicomm.delivery.window import record_inbound
from clinicomm.providers.base import Channel
from clinicomm.providers.webhooks import HANDLERS
from clinicomm.providers.webhooks.base import (
    DeliveryEvent,
    EventType,
    InboundMessage,
    OptOut,
    WebhookEvent,
)
from clinicomm.providers.webhooks.keywords import classify_keyword
from clinicomm.store import upsert
from clinicomm.store.models import Delivery, DeliveryEventRecord, aware
from clinicomm.telemetry.outcomes import log_delivery_end

INBOUND = "inbound"  # event_type of a stored inbound message
#: `delivery_events.clinic_id` of a global provider's status event whose delivery was not
#: found when it arrived (no clinic id can start with `_`). Such a row keeps no address
#: (there is no clinic key to index it with); the sweep applies it to the delivery a global
#: hop sent with that provider message id, in that delivery's clinic.
GLOBAL_SCOPE = "_global"


def global_label_prefix(provider: str) -> str:
    """The `deliveries.provider` prefix of a delivery sent by a global provider (`global:
    sendgrid`, `global:sendgrid#2`)."""
    return f"global:{provider}"


_RANK = {
    DeliveryStatus.QUEUED: 0,
    DeliveryStatus.SENDING: 1,
    DeliveryStatus.SENT: 2,
    DeliveryStatus.DELIVERED: 3,
    DeliveryStatus.READ: 4,
}
_FINAL = frozenset(
    {
        DeliveryStatus.BOUNCED,
        DeliveryStatus.FAILED,
        DeliveryStatus.SUPPRESSED,
        DeliveryStatus.EXPIRED,
        DeliveryStatus.CANCELLED,
    }
)
_READ_LIKE = frozenset({EventType.READ, EventType.OPENED, EventType.CLICKED})


@dataclass(slots=True)
class ApplyResult:
    """What `apply_stored` did, for logs and metrics (counts, never addresses)."""

    stored: int = 0
    duplicates: int = 0
    status_changes: int = 0
    unmatched: int = 0
    suppressions_added: int = 0
    suppressions_lifted: int = 0
    inbound: int = 0
    changed_deliveries: list[str] = field(default_factory=list)


def _utcnow() -> datetime:
    return datetime.now(UTC)


async def store_events(
    session: AsyncSession,
    clinic_id: str,
    events: Iterable[WebhookEvent],
    *,
    now: datetime | None = None,
    cipher: FieldCipher | None = None,
) -> tuple[list[int], int]:
    """Store verified, parsed events unprocessed (the fast part of a webhook request).

    Returns the new rows' ids (to hand to `apply_stored` after the answer) and the number
    of duplicates ignored. Never commits; the caller's transaction makes them durable.
    """
    received = now or _utcnow()
    ids: list[int] = []
    duplicates = 0
    for event in events:
        row_id = await _store(session, clinic_id, event, received, cipher)
        if row_id is None:
            duplicates += 1
        else:
            ids.append(row_id)
    return ids, duplicates


async def _store(
    session: AsyncSession,
    clinic_id: str,
    event: WebhookEvent,
    received: datetime,
    cipher: FieldCipher | None = None,
) -> int | None:
    """Insert the event row; None when this (provider, clinic, event id) is already stored.

    With the clinic's `cipher` (the webhook endpoint), the address is stored as its blind
    index beside its ciphertext, and a status event keeps none of the provider's raw item
    (every field the status machine needs has its own column)."""
    values: dict[str, Any] = {
        "clinic_id": clinic_id,
        "provider": event.provider,
        "event_id": event.event_id[:255],
        "occurred_at": event.occurred_at,
        "channel": event.channel.value if event.channel else None,
        "received_at": received,
    }
    if isinstance(event, InboundMessage):
        # The patient's words are PHI: keep only what was decided from them.
        keyword = event.keyword or classify_keyword(event.text)
        payload: dict[str, Any] = {
            "keyword": None if keyword == "none" else keyword,
            "to": event.to,
        }
        if not event.opens_window:
            payload["window"] = False
        if event.opt_out is not None:
            payload["optOut"] = event.opt_out.value
        values.update(event_type=INBOUND, recipient=event.sender, payload=payload)
    else:
        values.update(
            event_type=event.event_type.value,
            provider_message_id=event.provider_message_id,
            bounce_permanent=event.bounce_permanent,
            error=event.error,
            # Without a clinic cipher (older callers, tests) the raw item is kept; a global
            # event not yet matched to its clinic keeps nothing (it may name the patient).
            payload=event.raw if cipher is None and clinic_id != GLOBAL_SCOPE else {},
            recipient=None if clinic_id == GLOBAL_SCOPE else event.recipient,
        )
        if event.opt_out is not None:
            values["payload"] = {**values["payload"], "optOut": event.opt_out.value}
    if cipher is not None and values.get("recipient"):
        address = canonical_key(values["channel"] or "", values["recipient"])
        values.update(
            recipient=cipher.index(address), recipient_enc=cipher.encrypt_address(address)
        )
    stmt = (
        upsert.insert(session, DeliveryEventRecord)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["provider", "clinic_id", "event_id"])
        .returning(DeliveryEventRecord.id)
    )
    row = (await session.execute(stmt)).first()
    return None if row is None else int(row[0])


async def apply_stored(
    session: AsyncSession,
    *,
    ids: Iterable[int] | None = None,
    since: datetime | None = None,
    limit: int = 500,
    now: datetime | None = None,
) -> ApplyResult:
    """Apply stored, unprocessed events (never commits).

    With `ids`: those rows (what a webhook request just stored). Without: a sweep of every
    unprocessed inbound message and every unprocessed status event whose delivery now
    exists (a process that stopped before applying, or a webhook that beat the worker's
    commit of the provider message id), received after `since` when given; unmatched events
    are left for later. Rows are locked with SKIP LOCKED on PostgreSQL, so two processes
    sweeping at once take different rows.
    """
    result = ApplyResult()
    when = now or _utcnow()
    wanted = None if ids is None else list(ids)
    if wanted is not None and not wanted:
        return result
    query = unapplied(wanted, since, limit)
    records = (await session.scalars(query)).all()
    for record in records:
        if record.event_type == INBOUND:
            await _apply_inbound(session, record, when, result)
            record.processed_at = when
            continue
        delivery_id = await _apply_to_delivery(
            session, record.clinic_id, _event_of(record), when, result
        )
        if delivery_id is None:
            continue
        record.delivery_id = delivery_id
        record.processed_at = when
    return result


def unapplied(
    ids: list[int] | None, since: datetime | None, limit: int
) -> Select[DeliveryEventRecord]:
    """`apply_stored`'s rows, locked: `ids` among the unprocessed, or the sweep's (every
    unprocessed inbound message and status event whose delivery exists, received after
    `since`), read from `ix_delivery_events_unprocessed` in (received_at, id) order."""
    query = select(DeliveryEventRecord).where(DeliveryEventRecord.processed_at.is_(None))
    if ids is not None:
        query = query.where(DeliveryEventRecord.id.in_(ids)).order_by(DeliveryEventRecord.id)
    else:
        has_delivery = exists().where(
            or_(
                Delivery.clinic_id == DeliveryEventRecord.clinic_id,
                and_(
                    DeliveryEventRecord.clinic_id == GLOBAL_SCOPE,
                    Delivery.provider.like("global:%"),
                ),
            ),
            Delivery.provider_message_id == DeliveryEventRecord.provider_message_id,
        )
        query = query.where(or_(DeliveryEventRecord.event_type == INBOUND, has_delivery))
        if since is not None:
            query = query.where(DeliveryEventRecord.received_at >= since)
        query = query.order_by(DeliveryEventRecord.received_at, DeliveryEventRecord.id)
    return query.limit(limit).with_for_update(skip_locked=True, of=DeliveryEventRecord)


async def _find_delivery(
    session: AsyncSession, clinic_id: str, event: DeliveryEvent
) -> Delivery | None:
    if not event.provider_message_id:
        return None
    scope = (
        Delivery.provider.like(global_label_prefix(event.provider) + "%")
        if clinic_id == GLOBAL_SCOPE
        else Delivery.clinic_id == clinic_id
    )
    rows = list(
        (
            await session.scalars(
                select(Delivery)
                .where(scope, Delivery.provider_message_id == event.provider_message_id)
                .with_for_update()
            )
        ).all()
    )
    if len(rows) > 1 and event.recipient:  # one provider id for several recipients
        rows = [d for d in rows if event.recipient in (d.recipient_index, d.recipient)] or rows
    return rows[0] if rows else None


def advance(delivery: Delivery, event: DeliveryEvent, when: datetime) -> bool:
    """Move `delivery` forward for `event`; True when its status changed. Never goes back."""
    status = DeliveryStatus(delivery.status)
    if status in _FINAL:
        return False
    at = event.occurred_at or when
    rank = _RANK[status]
    kind = event.event_type
    new: DeliveryStatus | None = None
    if kind is EventType.SENT and rank < _RANK[DeliveryStatus.SENT]:
        new = DeliveryStatus.SENT
    elif kind is EventType.DELIVERED:
        delivery.delivered_at = delivery.delivered_at or at
        if rank < _RANK[DeliveryStatus.DELIVERED]:
            new = DeliveryStatus.DELIVERED
    elif kind in _READ_LIKE:
        delivery.delivered_at = delivery.delivered_at or at
        delivery.read_at = delivery.read_at or at
        if rank < _RANK[DeliveryStatus.READ]:
            new = DeliveryStatus.READ
    elif kind is EventType.BOUNCED and rank <= _RANK[DeliveryStatus.DELIVERED]:
        new = DeliveryStatus.BOUNCED
    elif kind is EventType.FAILED and rank < _RANK[DeliveryStatus.DELIVERED]:
        new = DeliveryStatus.FAILED
    if new in (DeliveryStatus.BOUNCED, DeliveryStatus.FAILED) and event.error:
        delivery.error = {"reason": new.value, "provider": event.provider, **event.error}
    if new is None:
        return False
    delivery.sent_at = delivery.sent_at or at
    delivery.status = new.value
    delivery.updated_at = when
    return True


async def _apply_to_delivery(
    session: AsyncSession,
    clinic_id: str,
    event: DeliveryEvent,
    when: datetime,
    result: ApplyResult,
) -> str | None:
    """Move the event's delivery forward and record the suppression it implies; the
    delivery's id, or None when no delivery of the clinic matches (yet)."""
    delivery = await _find_delivery(session, clinic_id, event)
    if delivery is None:
        result.unmatched += 1
        # Suppressions do not need the delivery when the event names the address.
        if clinic_id != GLOBAL_SCOPE:
            await _suppress_for(session, clinic_id, event, None, when, result)
        return None
    if advance(delivery, event, when):
        result.status_changes += 1
        result.changed_deliveries.append(delivery.id)
        await _status_changed(session, delivery, when)
    # A global provider's event counts for the clinic whose delivery it is.
    if delivery.clinic_id is not None:
        await _suppress_for(session, delivery.clinic_id, event, delivery, when, result)
    return delivery.id


async def _status_changed(session: AsyncSession, delivery: Delivery, when: datetime) -> None:
    """A webhook moved the delivery on: queue its status callback and log a bounce or
    failure (`telemetry.outcomes`)."""
    await callbacks.enqueue(session, [delivery.id], when)
    log_delivery_end(
        delivery_id=delivery.id,
        message_id=delivery.message_id,
        clinic_id=delivery.clinic_id,
        channel=delivery.channel,
        status=delivery.status,
        provider=delivery.provider,
        error=delivery.error,
    )


_OPT_OUT_REASONS = {
    OptOut.BOUNCE: SuppressionReason.BOUNCE,
    OptOut.COMPLAINT: SuppressionReason.COMPLAINT,
    OptOut.UNSUBSCRIBE: SuppressionReason.UNSUBSCRIBE,
}


def suppression_reason(event: DeliveryEvent) -> SuppressionReason | None:
    """The opt-out a status event proves, if any."""
    if event.opt_out in _OPT_OUT_REASONS:
        return _OPT_OUT_REASONS[event.opt_out]
    if event.event_type is EventType.BOUNCED and event.bounce_permanent:
        return SuppressionReason.BOUNCE
    if event.event_type is EventType.COMPLAINED:
        return SuppressionReason.COMPLAINT
    if event.event_type is EventType.UNSUBSCRIBED:
        return SuppressionReason.UNSUBSCRIBE
    handler = HANDLERS.get(event.provider)
    code = (event.error or {}).get("code")
    if handler is not None and code is not None and code in handler.opt_out_codes:
        return SuppressionReason.PROVIDER_OPT_OUT
    return None


async def _suppress_for(
    session: AsyncSession,
    clinic_id: str,
    event: DeliveryEvent,
    delivery: Delivery | None,
    when: datetime,
    result: ApplyResult,
) -> None:
    reason = suppression_reason(event)
    if event.opt_out is OptOut.MARKETING_STOP:
        reason = SuppressionReason.MARKETING
    if reason is None and event.opt_out is not OptOut.RESUBSCRIBE:
        return
    # The event's address (a blind index once stored), else the delivery's; the opt-out
    # keeps the delivery's ciphertext of the address (`FieldCipher.encrypt_address`).
    known = (delivery.recipient_index or delivery.recipient) if delivery is not None else None
    address = event.recipient or known
    channel = event.channel.value if event.channel else (delivery.channel if delivery else None)
    if not address or not channel:
        return
    sealed = delivery.recipient if delivery is not None and is_index(address) else None
    if reason is None:  # a resubscribe: lift what the provider's unsubscribe recorded
        result.suppressions_lifted += await unsuppress(
            session, clinic_id, channel, address, reasons=RESUBSCRIBE_LIFTS
        )
        return
    if reason is SuppressionReason.MARKETING:
        channel = MARKETING_SCOPE  # marketing messages only (admission)
    if await suppress(
        session,
        clinic_id,
        channel,
        address,
        reason,
        f"webhook:{event.provider}",
        now=when,
        address_enc=sealed or None,
    ):
        result.suppressions_added += 1


async def _apply_inbound(
    session: AsyncSession, record: DeliveryEventRecord, when: datetime, result: ApplyResult
) -> None:
    """An inbound message from its stored row (the keyword was decided when stored)."""
    if not record.recipient or not record.channel:
        return
    result.inbound += 1
    payload = record.payload or {}
    opt_out = payload.get("optOut")
    if opt_out == OptOut.MARKETING_STOP.value:
        stopped = await suppress(
            session,
            record.clinic_id,
            MARKETING_SCOPE,
            record.recipient,
            SuppressionReason.MARKETING,
            f"inbound:{record.provider}",
            now=when,
            address_enc=record.recipient_enc,
        )
        result.suppressions_added += int(stopped)
    elif opt_out == OptOut.MARKETING_RESUME.value:
        result.suppressions_lifted += await unsuppress(
            session, record.clinic_id, MARKETING_SCOPE, record.recipient
        )
    added, lifted = await apply_keyword(
        session,
        record.clinic_id,
        record.channel,
        record.recipient,
        (record.payload or {}).get("keyword"),
        f"inbound:{record.provider}",
        when,
        address_enc=record.recipient_enc,
    )
    result.suppressions_added += added
    result.suppressions_lifted += lifted
    if record.channel == Channel.WHATSAPP.value and payload.get("window", True):
        at = aware(record.occurred_at) if record.occurred_at else when
        await record_inbound(session, record.clinic_id, record.channel, record.recipient, at)


def _event_of(record: DeliveryEventRecord) -> DeliveryEvent:
    """The status event a stored row records (for applying it later)."""
    return DeliveryEvent(
        provider=record.provider,
        event_id=record.event_id,
        provider_message_id=record.provider_message_id,
        event_type=EventType(record.event_type)
        if record.event_type in EventType._value2member_map_
        else EventType.UNKNOWN,
        occurred_at=aware(record.occurred_at) if record.occurred_at else None,
        recipient=record.recipient,
        channel=Channel(record.channel) if record.channel else None,
        error=record.error,
        bounce_permanent=record.bounce_permanent,
        opt_out=_opt_out_of(record.payload),
    )


def _opt_out_of(payload: dict[str, Any] | None) -> OptOut | None:
    value = (payload or {}).get("optOut")
    return OptOut(value) if isinstance(value, str) and value in OptOut._value2member_map_ else None
