"""Reading messages and deliveries back: the status API's queries, scoped by clinic.

Every query takes the set of clinics the caller may see (`None` = all), the one place where
tenant filtering of messages happens.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from clinicomm.callbacks import queue as callbacks
from clinicomm.crypto import CryptoError
from clinicomm.delivery.records import Priority
from clinicomm.settings.keys import PLATFORM, KeyStore
from clinicomm.settings.sealed import open_json
from clinicomm.store.db import Database
from clinicomm.store.models import Delivery, DeliveryAttempt, Message, aware, utcnow

#: A scope: None (every clinic) or the clinic ids visible to the caller.
Scope = Collection[str] | None
#: The clinic id under which messages without a clinic (global providers) are listed.
GLOBAL = "global"


def _visible(column: Any, scope: Scope) -> Any:
    if scope is None:
        return True
    ids = [c for c in scope if c != GLOBAL]
    clauses = [column.in_(ids)] if ids else []
    if GLOBAL in scope:
        clauses.append(column.is_(None))
    return or_(*clauses) if clauses else False


def _iso(value: datetime | None) -> str | None:
    return aware(value).isoformat() if value is not None else None


#: Statuses that end a delivery without it reaching the patient.
_UNSENT = ("failed", "bounced", "suppressed", "expired", "cancelled")


def delivery_json(
    d: Delivery, attempts: list[DeliveryAttempt], now: datetime | None = None
) -> dict[str, Any]:
    error = d.error or None
    now = now or utcnow()
    due = aware(d.next_attempt_at) if d.next_attempt_at is not None else None
    return {
        "id": d.id,
        "channel": d.channel,
        "recipient": d.recipient,
        "status": d.status,
        "provider": d.provider,
        "providerMessageId": d.provider_message_id,
        "parentId": d.parent_id,
        "attempts": [
            {
                "provider": a.provider,
                "outcome": a.outcome,
                "errorClass": a.error_class,
                "statusCode": a.status_code,
                "errorCode": a.error_code,
                "detail": a.detail,
                "durationMs": a.duration_ms,
                "time": _iso(a.at),
            }
            for a in attempts
        ],
        "error": error if d.status in _UNSENT or error else None,
        "createdAt": _iso(d.created_at),
        "updatedAt": _iso(d.updated_at),
        "sentAt": _iso(d.sent_at),
        "nextAttemptAt": _iso(d.next_attempt_at) if d.status == "queued" else None,
        # Held (sendAt, quiet hours, a retry or a limit): not claimed before then.
        "notBefore": _iso(due) if d.status == "queued" and due is not None and due > now else None,
        "priority": Priority.of_rank(d.priority if d.priority is not None else 1).value,
        "expiresAt": _iso(d.expires_at),
    }


def _overall(statuses: list[str]) -> str:
    if any(s in ("queued", "sending") for s in statuses):
        return "pending"
    for only in ("cancelled", "expired"):
        if statuses and all(s == only for s in statuses):
            return only
    if all(s in ("failed", "expired", "cancelled") for s in statuses):
        return "failed"
    if any(s in _UNSENT for s in statuses):
        return "partial"
    return "sent"


async def get_message(
    session: AsyncSession, message_id: str, scope: Scope
) -> dict[str, Any] | None:
    """The message with each delivery and its attempts, or None if absent or not visible."""
    message = (
        await session.execute(
            select(Message).where(Message.id == message_id, _visible(Message.clinic_id, scope))
        )
    ).scalar_one_or_none()
    if message is None:
        return None
    deliveries = (
        (
            await session.execute(
                select(Delivery).where(Delivery.message_id == message_id).order_by(Delivery.id)
            )
        )
        .scalars()
        .all()
    )
    ids = [d.id for d in deliveries]
    attempts: dict[str, list[DeliveryAttempt]] = {i: [] for i in ids}
    if ids:
        rows = (
            (
                await session.execute(
                    select(DeliveryAttempt)
                    .where(DeliveryAttempt.delivery_id.in_(ids))
                    .order_by(DeliveryAttempt.id)
                )
            )
            .scalars()
            .all()
        )
        for row in rows:
            attempts[row.delivery_id].append(row)
    sent_callbacks = await callbacks.for_deliveries(session, ids)
    items = [
        {**delivery_json(d, attempts[d.id]), "callbacks": sent_callbacks[d.id]} for d in deliveries
    ]
    return {
        "id": message.id,
        "clinicId": message.clinic_id,
        "category": message.category,
        "metadata": message.meta,
        "status": _overall([d["status"] for d in items]),
        "createdAt": _iso(message.created_at),
        "deliveries": items,
    }


async def list_messages(
    session: AsyncSession,
    scope: Scope,
    *,
    clinic_id: str | None = None,
    status: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> dict[str, Any]:
    """Deliveries newest first (with their message id), filtered; `nextCursor` pages on."""
    query = select(Delivery).where(_visible(Delivery.clinic_id, scope))
    if clinic_id is not None:
        query = query.where(
            Delivery.clinic_id.is_(None) if clinic_id == GLOBAL else Delivery.clinic_id == clinic_id
        )
    if status is not None:
        query = query.where(Delivery.status == status)
    if cursor:
        query = query.where(and_(Delivery.id < cursor))
    rows = (
        (await session.execute(query.order_by(Delivery.id.desc()).limit(limit + 1))).scalars().all()
    )
    page = rows[:limit]
    return {
        "items": [
            {"messageId": d.message_id, "clinicId": d.clinic_id, **delivery_json(d, [])}
            for d in page
        ],
        "nextCursor": page[-1].id if len(rows) > limit and page else None,
    }


async def reveal(answer: dict[str, Any], keys: KeyStore, db: Database) -> dict[str, Any]:
    """Decrypt, in an answer of `get_message` or `list_messages` the caller may read, the
    addresses and the metadata (stored encrypted with the clinic's data key). An erased
    address (retention), or one under a key this process cannot unwrap, is answered null."""

    async def address(clinic_id: str | None, stored: str) -> str | None:
        if not stored:
            return None
        try:
            cipher = await keys.cipher_for(db, clinic_id or PLATFORM)
            return cipher.decrypt_address(stored)
        except CryptoError:  # a key this process cannot unwrap: the status still answers
            return None

    if "deliveries" in answer:
        clinic_id = answer["clinicId"]
        try:
            cipher = await keys.cipher_for(db, clinic_id or PLATFORM)
            answer["metadata"] = open_json(cipher, answer["metadata"], f"meta:{answer['id']}")
        except CryptoError:
            answer["metadata"] = {}
        for item in answer["deliveries"]:
            item["recipient"] = await address(clinic_id, item["recipient"])
    for item in answer.get("items", []):
        item["recipient"] = await address(item["clinicId"], item["recipient"])
    return answer
