"""Webhook events → delivery status, suppressions and the WhatsApp 24-hour window.

The webhook endpoint stores events with `store_events` (fast, before its answer) and applies
them afterwards with `apply_stored`; `apply_events` does both at once in the caller's
transaction (it never commits). Applying an event:

1. stores it in `delivery_events`; a second copy of the same (provider, clinic, event id)
   is ignored there (INSERT … ON CONFLICT DO NOTHING, on SQLite and PostgreSQL alike), so a
   redelivered webhook changes nothing;
2. for a status report, finds the clinic's delivery by `provider_message_id` and moves its
   status forward only: queued/sending < sent < delivered < read. `bounced` and `failed` are
   final. A `read` (or an email open/click) with no `delivered` before it sets both
   `delivered_at` and `read_at` (Meta sends no `delivered` when both happen together). A
   `failed` after `delivered` is ignored (WhatsApp multi-device reports, PROVIDER-FACTS
   §1.5); a `bounced` after `delivered` applies (mail servers bounce after accepting);
3. records suppressions: a hard bounce, a complaint, an unsubscribe, a Twilio 21610, and an
   inbound STOP keyword; an inbound START/YES/UNSTOP lifts an opt-out (not a bounce or a
   complaint);
4. for an inbound WhatsApp message, refreshes `inbound_contacts.last_inbound_at`.

An event whose delivery is not found yet (the webhook beat the worker's commit of the
provider message id) is kept with `processed_at` NULL; the endpoint's sweep (`apply_stored`
without ids) or `apply_pending` applies it once the delivery has that id.

`is_suppressed` and `window_open` are what the sender asks before any provider call.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import and_, case, delete, exists, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from clinicomm.crypto import FieldCipher, is_index
from clinicomm.messaging.models import DeliveryStatus
from clinicomm.providers.base import Channel
from clinicomm.providers.webhooks.base import (
    DeliveryEvent,
    EventType,
    InboundMessage,
    WebhookEvent,
)
from clinicomm.providers.webhooks.keywords import classify_keyword
from clinicomm.store.models import (
    Delivery,
    DeliveryEventRecord,
    InboundContact,
    Suppression,
    aware,
)

#: The WhatsApp customer service window (PROVIDER-FACTS §1.2).
WINDOW = timedelta(hours=24)
INBOUND = "inbound"  # event_type of a stored inbound message


class SuppressionReason(StrEnum):
    """Why an address is suppressed for a clinic and channel."""

    STOP = "stop"  # the patient texted STOP (or an equivalent keyword)
    BOUNCE = "bounce"  # a hard (permanent) bounce
    COMPLAINT = "complaint"  # the patient marked an email as spam
    UNSUBSCRIBE = "unsubscribe"  # the patient used the email provider's unsubscribe link
    PROVIDER_21610 = "provider_21610"  # Twilio refused: the number opted out at Twilio
    MANUAL = "manual"  # recorded by the clinic (the patient phoned, wrote, asked in person)


#: Reasons a START/YES/UNSTOP from the patient lifts; bounces and complaints stay.
OPT_IN_LIFTS = frozenset(
    {SuppressionReason.STOP, SuppressionReason.PROVIDER_21610, SuppressionReason.MANUAL}
)

_RANK = {
    DeliveryStatus.QUEUED: 0,
    DeliveryStatus.SENDING: 1,
    DeliveryStatus.SENT: 2,
    DeliveryStatus.DELIVERED: 3,
    DeliveryStatus.READ: 4,
}
_FINAL = frozenset({DeliveryStatus.BOUNCED, DeliveryStatus.FAILED, DeliveryStatus.SUPPRESSED})
_READ_LIKE = frozenset({EventType.READ, EventType.OPENED, EventType.CLICKED})


@dataclass(slots=True)
class ApplyResult:
    """What `apply_events` did, for logs and metrics (counts, never addresses)."""

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


def _insert(session: AsyncSession, model: Any) -> Any:
    """The dialect's INSERT that supports ON CONFLICT (SQLite and PostgreSQL)."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(model)
    return sqlite.insert(model)


async def apply_events(
    session: AsyncSession,
    clinic_id: str,
    events: Iterable[WebhookEvent],
    *,
    now: datetime | None = None,
) -> ApplyResult:
    """Store and apply verified, parsed webhook events for one clinic (never commits)."""
    result = ApplyResult()
    received = now or _utcnow()
    for event in events:
        row_id = await _store(session, clinic_id, event, received)
        if row_id is None:
            result.duplicates += 1
            continue
        result.stored += 1
        if isinstance(event, InboundMessage):
            await _apply_inbound(session, clinic_id, event, received, result)
            await _mark(session, row_id, None, received)
        else:
            await _apply_status(session, clinic_id, event, row_id, received, result)
    return result


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
        values.update(
            event_type=INBOUND,
            recipient=event.sender,
            payload={"keyword": classify_keyword(event.text), "to": event.to},
        )
    else:
        values.update(
            event_type=event.event_type.value,
            provider_message_id=event.provider_message_id,
            recipient=event.recipient,
            bounce_permanent=event.bounce_permanent,
            error=event.error,
            payload=event.raw if cipher is None else {},
        )
    if cipher is not None and values.get("recipient"):
        address = canonical_key(values["channel"] or "", values["recipient"])
        values.update(
            recipient=cipher.index(address), recipient_enc=cipher.encrypt_address(address)
        )
    stmt = (
        _insert(session, DeliveryEventRecord)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["provider", "clinic_id", "event_id"])
        .returning(DeliveryEventRecord.id)
    )
    row = (await session.execute(stmt)).first()
    return None if row is None else int(row[0])


async def _mark(
    session: AsyncSession, row_id: int, delivery_id: str | None, when: datetime
) -> None:
    record = await session.get(DeliveryEventRecord, row_id)
    if record is not None:
        record.delivery_id = delivery_id
        record.processed_at = when


async def _find_delivery(
    session: AsyncSession, clinic_id: str, event: DeliveryEvent
) -> Delivery | None:
    if not event.provider_message_id:
        return None
    rows = list(
        (
            await session.scalars(
                select(Delivery)
                .where(
                    Delivery.clinic_id == clinic_id,
                    Delivery.provider_message_id == event.provider_message_id,
                )
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


async def _apply_status(
    session: AsyncSession,
    clinic_id: str,
    event: DeliveryEvent,
    row_id: int,
    when: datetime,
    result: ApplyResult,
) -> None:
    delivery_id = await _apply_to_delivery(session, clinic_id, event, when, result)
    if delivery_id is not None:
        await _mark(session, row_id, delivery_id, when)


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
        await _suppress_for(session, clinic_id, event, None, when, result)
        return None
    if advance(delivery, event, when):
        result.status_changes += 1
        result.changed_deliveries.append(delivery.id)
    await _suppress_for(session, clinic_id, event, delivery, when, result)
    return delivery.id


def _reason_for(event: DeliveryEvent) -> SuppressionReason | None:
    if event.event_type is EventType.BOUNCED and event.bounce_permanent:
        return SuppressionReason.BOUNCE
    if event.event_type is EventType.COMPLAINED:
        return SuppressionReason.COMPLAINT
    if event.event_type is EventType.UNSUBSCRIBED:
        return SuppressionReason.UNSUBSCRIBE
    if event.provider == "twilio" and (event.error or {}).get("code") == "21610":
        return SuppressionReason.PROVIDER_21610
    return None


async def _suppress_for(
    session: AsyncSession,
    clinic_id: str,
    event: DeliveryEvent,
    delivery: Delivery | None,
    when: datetime,
    result: ApplyResult,
) -> None:
    reason = _reason_for(event)
    if reason is None:
        return
    # The event's address (a blind index once stored), else the delivery's; the opt-out
    # keeps the delivery's ciphertext of the address (`FieldCipher.encrypt_address`).
    known = (delivery.recipient_index or delivery.recipient) if delivery is not None else None
    address = event.recipient or known
    channel = event.channel.value if event.channel else (delivery.channel if delivery else None)
    if not address or not channel:
        return
    sealed = delivery.recipient if delivery is not None and is_index(address) else None
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
    session: AsyncSession,
    clinic_id: str,
    event: InboundMessage,
    when: datetime,
    result: ApplyResult,
) -> None:
    result.inbound += 1
    keyword = classify_keyword(event.text)
    source = f"inbound:{event.provider}"
    if keyword == "stop":
        if await suppress(
            session,
            clinic_id,
            event.channel,
            event.sender,
            SuppressionReason.STOP,
            source,
            now=when,
        ):
            result.suppressions_added += 1
    elif keyword == "start":
        result.suppressions_lifted += await unsuppress(
            session, clinic_id, event.channel, event.sender, reasons=OPT_IN_LIFTS
        )
    if event.channel is Channel.WHATSAPP:
        at = event.occurred_at or when
        await record_inbound(session, clinic_id, event.channel, event.sender, at)


async def suppress(
    session: AsyncSession,
    clinic_id: str,
    channel: str,
    address: str,
    reason: SuppressionReason,
    source: str,
    *,
    now: datetime | None = None,
    address_enc: str | None = None,
) -> bool:
    """Record that `address` must not get messages on `channel`; False if it already was.

    `address` is the blind index of the address (`FieldCipher.index`; a clear address only
    from rows written before addresses were encrypted), `address_enc` its ciphertext.

    The first reason is kept (a later complaint does not overwrite a STOP). Also the entry
    point for a manual opt-out (API) and for a Twilio 21610 seen by the worker on send.
    """
    stmt = (
        _insert(session, Suppression)
        .values(
            clinic_id=clinic_id,
            channel=str(channel),
            address=canonical_key(channel, address),
            address_enc=address_enc,
            reason=reason.value,
            source=source[:120],
            created_at=now or _utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["clinic_id", "channel", "address"])
        .returning(Suppression.address)
    )
    return (await session.execute(stmt)).first() is not None


async def unsuppress(
    session: AsyncSession,
    clinic_id: str,
    channel: str,
    address: str,
    *,
    reasons: Iterable[SuppressionReason] | None = None,
) -> int:
    """Lift the suppression of `address` on `channel` (only for `reasons` when given)."""
    cond = and_(
        Suppression.clinic_id == clinic_id,
        Suppression.channel == str(channel),
        Suppression.address == canonical_key(channel, address),
    )
    if reasons is not None:
        cond = and_(cond, Suppression.reason.in_([r.value for r in reasons]))
    res = await session.execute(delete(Suppression).where(cond))
    return int(getattr(res, "rowcount", 0) or 0)


async def is_suppressed(session: AsyncSession, clinic_id: str, channel: str, address: str) -> bool:
    """True when the clinic must not send to `address` on `channel` (ask before any send)."""
    row = await session.scalar(
        select(Suppression.reason).where(
            Suppression.clinic_id == clinic_id,
            Suppression.channel == str(channel),
            Suppression.address == canonical_key(channel, address),
        )
    )
    return row is not None


async def record_inbound(
    session: AsyncSession, clinic_id: str, channel: str, address: str, at: datetime
) -> None:
    """Note that `address` wrote to the clinic at `at` (keeps the latest time)."""
    stmt = _insert(session, InboundContact).values(
        clinic_id=clinic_id, channel=str(channel), address=address, last_inbound_at=at
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["clinic_id", "channel", "address"],
        set_={"last_inbound_at": stmt.excluded.last_inbound_at},
        where=InboundContact.last_inbound_at < stmt.excluded.last_inbound_at,
    )
    await session.execute(stmt)


async def window_open(
    session: AsyncSession,
    clinic_id: str,
    address: str,
    now: datetime | None = None,
    *,
    channel: str = Channel.WHATSAPP,
) -> bool:
    """True when the patient wrote on WhatsApp within the last 24 hours (free-form allowed).

    Outside the window only a template may be sent (Meta 131047, Twilio 63016).
    """
    last = await session.scalar(
        select(InboundContact.last_inbound_at).where(
            InboundContact.clinic_id == clinic_id,
            InboundContact.channel == str(channel),
            InboundContact.address == address,
        )
    )
    if last is None:
        return False
    return aware(last) > (now or _utcnow()) - WINDOW


async def apply_pending(
    session: AsyncSession,
    clinic_id: str,
    provider_message_id: str,
    *,
    now: datetime | None = None,
) -> ApplyResult:
    """Apply stored events that arrived before the delivery had `provider_message_id`.

    The worker calls this in the transaction that records the provider message id.
    """
    result = ApplyResult()
    when = now or _utcnow()
    records = (
        await session.scalars(
            select(DeliveryEventRecord)
            .where(
                DeliveryEventRecord.clinic_id == clinic_id,
                DeliveryEventRecord.provider_message_id == provider_message_id,
                DeliveryEventRecord.processed_at.is_(None),
            )
            .order_by(DeliveryEventRecord.id)
        )
    ).all()
    for record in records:
        event = _event_of(record)
        delivery = await _find_delivery(session, clinic_id, event)
        if delivery is None:
            result.unmatched += 1
            continue
        if advance(delivery, event, when):
            result.status_changes += 1
            result.changed_deliveries.append(delivery.id)
        await _suppress_for(session, clinic_id, event, delivery, when, result)
        record.delivery_id = delivery.id
        record.processed_at = when
    return result


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
    )


def canonical_key(channel: str, address: str) -> str:
    """The form an address is compared in for suppressions: email addresses lower-cased
    whole (mailbox providers treat the local part case-insensitively in practice, and a
    missed opt-out costs more than a shared one); phone numbers are already E.164."""
    if str(channel) == Channel.EMAIL.value:
        return address.strip().lower()
    return address.strip()


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
    query = select(DeliveryEventRecord).where(DeliveryEventRecord.processed_at.is_(None))
    if ids is not None:
        wanted = list(ids)
        if not wanted:
            return result
        query = query.where(DeliveryEventRecord.id.in_(wanted))
    else:
        has_delivery = exists().where(
            Delivery.clinic_id == DeliveryEventRecord.clinic_id,
            Delivery.provider_message_id == DeliveryEventRecord.provider_message_id,
        )
        query = query.where(or_(DeliveryEventRecord.event_type == INBOUND, has_delivery))
        if since is not None:
            query = query.where(DeliveryEventRecord.received_at >= since)
    query = query.order_by(DeliveryEventRecord.id).limit(limit)
    query = query.with_for_update(skip_locked=True, of=DeliveryEventRecord)
    records = (await session.scalars(query)).all()
    for record in records:
        clinic_id = record.clinic_id
        if record.event_type == INBOUND:
            await _apply_stored_inbound(session, record, when, result)
            record.processed_at = when
            continue
        delivery_id = await _apply_to_delivery(
            session, clinic_id, _event_of(record), when, result
        )
        if delivery_id is None:
            continue
        record.delivery_id = delivery_id
        record.processed_at = when
    return result


async def _apply_stored_inbound(
    session: AsyncSession, record: DeliveryEventRecord, when: datetime, result: ApplyResult
) -> None:
    """An inbound message from its stored row (the keyword was decided when stored)."""
    if not record.recipient or not record.channel:
        return
    result.inbound += 1
    keyword = (record.payload or {}).get("keyword")
    source = f"inbound:{record.provider}"
    if keyword == "stop":
        if await suppress(
            session,
            record.clinic_id,
            record.channel,
            record.recipient,
            SuppressionReason.STOP,
            source,
            now=when,
            address_enc=record.recipient_enc,
        ):
            result.suppressions_added += 1
    elif keyword == "start":
        result.suppressions_lifted += await unsuppress(
            session, record.clinic_id, record.channel, record.recipient, reasons=OPT_IN_LIFTS
        )
    if record.channel == Channel.WHATSAPP.value:
        at = aware(record.occurred_at) if record.occurred_at else when
        await record_inbound(session, record.clinic_id, record.channel, record.recipient, at)


async def suppressed_among(
    session: AsyncSession, keys: Iterable[tuple[str, str, str]]
) -> set[tuple[str, str, str]]:
    """Which (clinic id, channel, address) triples are suppressed, in one query.

    Addresses are compared in `canonical_key` form; the answer holds the triples as given.
    """
    wanted = {(c, ch, canonical_key(ch, a)): (c, ch, a) for c, ch, a in keys}
    if not wanted:
        return set()
    rows = (
        await session.execute(
            select(Suppression.clinic_id, Suppression.channel, Suppression.address).where(
                Suppression.clinic_id.in_({k[0] for k in wanted}),
                Suppression.address.in_({k[2] for k in wanted}),
            )
        )
    ).all()
    return {wanted[(r[0], r[1], r[2])] for r in rows if (r[0], r[1], r[2]) in wanted}


async def last_inbound_among(
    session: AsyncSession, keys: Iterable[tuple[str, str]], *, channel: str = Channel.WHATSAPP
) -> dict[tuple[str, str], datetime]:
    """When each (clinic id, address) last wrote on `channel`, in one query (absent: never)."""
    wanted = set(keys)
    if not wanted:
        return {}
    rows = (
        await session.execute(
            select(
                InboundContact.clinic_id, InboundContact.address, InboundContact.last_inbound_at
            ).where(
                InboundContact.channel == str(channel),
                InboundContact.clinic_id.in_({k[0] for k in wanted}),
                InboundContact.address.in_({k[1] for k in wanted}),
            )
        )
    ).all()
    return {(r[0], r[1]): aware(r[2]) for r in rows if (r[0], r[1]) in wanted}


async def bounce_rate(
    session: AsyncSession, clinic_id: str, since: datetime
) -> dict[str, float]:
    """Per provider key, the share of the clinic's deliveries handed to it since `since`
    (by `sent_at`) that ended `bounced`: `{"sendgrid": 0.02}`. Providers that sent nothing
    in the period are absent. Clinic-scoped and global hops of one key are counted apart
    (`"sendgrid"` for the clinic's own, `"global:smtp"` for the platform's)."""
    bounced = func.sum(case((Delivery.status == DeliveryStatus.BOUNCED.value, 1), else_=0))
    rows = (
        await session.execute(
            select(Delivery.provider, func.count(), bounced)
            .where(
                Delivery.clinic_id == clinic_id,
                Delivery.sent_at >= since,
                Delivery.provider.is_not(None),
            )
            .group_by(Delivery.provider)
        )
    ).all()
    totals: dict[str, list[int]] = {}
    for label, total, bounces in rows:
        key = _provider_of(str(label))
        entry = totals.setdefault(key, [0, 0])
        entry[0] += int(total)
        entry[1] += int(bounces or 0)
    return {key: (b / t if t else 0.0) for key, (t, b) in totals.items()}


def _provider_of(label: str) -> str:
    """`clinic:sendgrid#2` → `sendgrid`; `global:smtp` stays `global:smtp`."""
    scope, _, key = label.partition(":")
    if not key:
        return label
    key = key.split("#", 1)[0]
    return key if scope == "clinic" else f"{scope}:{key}"
