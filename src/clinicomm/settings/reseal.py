"""Bring one clinic's stored patient data to its current data key and blind index.

`reseal_clinic` walks every table that holds a clinic's ciphertexts or addresses and rewrites,
in batches of one transaction each, the rows not yet in the current form:

| table | column | current form |
|---|---|---|
| messages | content, meta | `cc2` blob of the current key version; meta sealed |
| deliveries | recipient, recipient_index, fallback_address | ciphertexts, the blind index |
| suppressions | address, address_enc | blind index; ciphertext of the current version |
| inbound_contacts | address | blind index |
| delivery_events | recipient, recipient_enc | blind index; current ciphertext (no raw item) |
| idempotency_keys | response | sealed under the current version |

Two uses: `clinicomm migrate` (rows written before addresses were encrypted: clear addresses,
unversioned blobs, plain metadata) and `clinicomm keys rotate-data` (ciphertexts of an older
data key version). The predicate of each batch is "not in the current form", so a run that is
interrupted loses nothing and the next run continues where it stopped. Values erased by the
retention sweep stay erased.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import ColumnElement, and_, delete, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from clinicomm.crypto import INDEX_PREFIX, FieldCipher, is_ciphertext, is_index
from clinicomm.settings.keys import PLATFORM
from clinicomm.settings.sealed import is_sealed, open_json, seal_json
from clinicomm.store.db import Database
from clinicomm.store.models import (
    Delivery,
    DeliveryEventRecord,
    IdempotencyKey,
    InboundContact,
    Message,
    Suppression,
)

Progress = Callable[[str, int], None]


@dataclass
class ResealReport:
    """Rows rewritten per table."""

    rows: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def add(self, table: str, count: int) -> None:
        self.rows[table] = self.rows.get(table, 0) + count


def _clinic(column: Any, clinic_id: str) -> ColumnElement[bool]:
    where: ColumnElement[bool] = column.is_(None) if clinic_id == PLATFORM else column == clinic_id
    return where


def _current(cipher: FieldCipher) -> str:
    return f"cc1:{cipher.key_version}:%"


async def pending(db: Database, cipher: FieldCipher) -> dict[str, int]:
    """How many rows of each table are not yet in the current form (0 everywhere: done)."""
    clinic_id = cipher.clinic_id
    async with db.read() as session:
        counts: dict[str, int] = {}
        for name, model, where in _predicates(cipher):
            counts[name] = int(
                await session.scalar(select(func.count()).select_from(model).where(where)) or 0
            )
        rows = (
            await session.scalars(
                select(IdempotencyKey.response).where(IdempotencyKey.scope == clinic_id)
            )
        ).all()
        counts["idempotency_keys"] = sum(1 for r in rows if not _sealed_current(cipher, r))
    return counts


def _predicates(cipher: FieldCipher) -> list[tuple[str, Any, ColumnElement[bool]]]:
    clinic_id = cipher.clinic_id
    current = _current(cipher)
    header = b"cc2" + cipher.key_version.to_bytes(2, "big")
    return [
        (
            "messages",
            Message,
            and_(
                _clinic(Message.clinic_id, clinic_id),
                Message.content != b"",
                func.substr(Message.content, 1, 5) != header,
            ),
        ),
        (
            "deliveries",
            Delivery,
            and_(
                _clinic(Delivery.clinic_id, clinic_id),
                or_(
                    and_(
                        Delivery.recipient != "",
                        or_(
                            Delivery.recipient.not_like(current),
                            Delivery.recipient_index.is_(None),
                        ),
                    ),
                    and_(
                        Delivery.fallback_address.is_not(None),
                        Delivery.fallback_address.not_like(current),
                    ),
                ),
            ),
        ),
        (
            "suppressions",
            Suppression,
            and_(
                Suppression.clinic_id == clinic_id,
                or_(
                    Suppression.address.not_like(f"{INDEX_PREFIX}%"),
                    and_(
                        Suppression.address_enc.is_not(None),
                        Suppression.address_enc.not_like(current),
                    ),
                ),
            ),
        ),
        (
            "inbound_contacts",
            InboundContact,
            and_(
                InboundContact.clinic_id == clinic_id,
                InboundContact.address.not_like(f"{INDEX_PREFIX}%"),
            ),
        ),
        (
            "delivery_events",
            DeliveryEventRecord,
            and_(
                DeliveryEventRecord.clinic_id == clinic_id,
                DeliveryEventRecord.recipient.is_not(None),
                or_(
                    DeliveryEventRecord.recipient.not_like(f"{INDEX_PREFIX}%"),
                    and_(
                        DeliveryEventRecord.recipient_enc.is_not(None),
                        DeliveryEventRecord.recipient_enc.not_like(current),
                    ),
                ),
            ),
        ),
    ]


def _sealed_current(cipher: FieldCipher, stored: Any) -> bool:
    return is_sealed(stored) and cipher.is_current(stored["sealed"])


def _address(cipher: FieldCipher, stored: str | None) -> str | None:
    """The clear address of a stored value (a ciphertext of any version, or legacy clear)."""
    if not stored or is_index(stored):
        return None
    return cipher.decrypt_address(stored) if is_ciphertext(stored) else stored


async def reseal_clinic(
    db: Database,
    cipher: FieldCipher,
    *,
    batch_size: int = 500,
    progress: Progress | None = None,
) -> ResealReport:
    """Rewrite every row of the clinic of `cipher` not in the current form (see the module
    docstring); one transaction per batch. `progress(table, rows)` after each batch."""
    report = ResealReport()
    steps: list[tuple[str, Callable[[AsyncSession], Any]]] = [
        ("messages", lambda s: _messages(s, cipher, batch_size)),
        ("deliveries", lambda s: _deliveries(s, cipher, batch_size)),
        ("suppressions", lambda s: _suppressions(s, cipher, batch_size)),
        ("inbound_contacts", lambda s: _inbound(s, cipher, batch_size)),
        ("delivery_events", lambda s: _events(s, cipher, batch_size)),
    ]
    for name, step in steps:
        while True:
            async with db.session() as session:
                count = int(await step(session))
            if not count:
                break
            report.add(name, count)
            if progress:
                progress(name, count)
    after = ""
    while True:
        async with db.session() as session:
            count, after = await _idempotency(session, cipher, batch_size, after)
        if count:
            report.add("idempotency_keys", count)
            if progress:
                progress("idempotency_keys", count)
        if not after:
            break
    return report


def _where(cipher: FieldCipher, name: str) -> ColumnElement[bool]:
    return next(w for n, _, w in _predicates(cipher) if n == name)


async def _messages(session: AsyncSession, cipher: FieldCipher, limit: int) -> int:
    rows = (
        await session.scalars(
            select(Message).where(_where(cipher, "messages")).limit(limit).with_for_update()
        )
    ).all()
    for row in rows:
        context = f"message:{row.id}"
        row.content = cipher.encrypt_bytes(cipher.decrypt_bytes(row.content, context), context)
        meta = open_json(cipher, row.meta, f"meta:{row.id}")
        row.meta = seal_json(cipher, meta, f"meta:{row.id}") if meta else {}
    return len(rows)


async def _deliveries(session: AsyncSession, cipher: FieldCipher, limit: int) -> int:
    rows = (
        await session.scalars(
            select(Delivery).where(_where(cipher, "deliveries")).limit(limit).with_for_update()
        )
    ).all()
    changed = 0
    for row in rows:
        address = _address(cipher, row.recipient)
        if address is not None:
            row.recipient = cipher.encrypt_address(address)
            row.recipient_index = cipher.index(address)
            changed += 1
        fallback = _address(cipher, row.fallback_address)
        if fallback is not None:
            row.fallback_address = cipher.encrypt_address(fallback)
            changed += 1
    return changed


async def _suppressions(session: AsyncSession, cipher: FieldCipher, limit: int) -> int:
    rows = (
        await session.scalars(
            select(Suppression).where(_where(cipher, "suppressions")).limit(limit).with_for_update()
        )
    ).all()
    for row in rows:
        if is_index(row.address):  # only the ciphertext is of an older version
            address = _address(cipher, row.address_enc)
            row.address_enc = cipher.encrypt_address(address) if address else None
            continue
        index = cipher.index(row.address)
        sealed = cipher.encrypt_address(row.address)
        existing = await session.get(Suppression, (row.clinic_id, row.channel, index))
        if existing is not None:  # the same opt-out under another spelling: keep the first
            existing.address_enc = existing.address_enc or sealed
            await session.delete(row)
            continue
        session.add(
            Suppression(
                clinic_id=row.clinic_id,
                channel=row.channel,
                address=index,
                address_enc=sealed,
                reason=row.reason,
                source=row.source,
                created_at=row.created_at,
            )
        )
        await session.delete(row)
    return len(rows)


async def _inbound(session: AsyncSession, cipher: FieldCipher, limit: int) -> int:
    rows = (
        await session.scalars(
            select(InboundContact)
            .where(_where(cipher, "inbound_contacts"))
            .limit(limit)
            .with_for_update()
        )
    ).all()
    for row in rows:
        index = cipher.index(row.address)
        existing = await session.get(InboundContact, (row.clinic_id, row.channel, index))
        if existing is not None:
            existing.last_inbound_at = max(existing.last_inbound_at, row.last_inbound_at)
        else:
            session.add(
                InboundContact(
                    clinic_id=row.clinic_id,
                    channel=row.channel,
                    address=index,
                    last_inbound_at=row.last_inbound_at,
                )
            )
        await session.execute(
            delete(InboundContact).where(
                InboundContact.clinic_id == row.clinic_id,
                InboundContact.channel == row.channel,
                InboundContact.address == row.address,
            )
        )
    return len(rows)


async def _events(session: AsyncSession, cipher: FieldCipher, limit: int) -> int:
    rows = (
        await session.scalars(
            select(DeliveryEventRecord)
            .where(_where(cipher, "delivery_events"))
            .limit(limit)
            .with_for_update()
        )
    ).all()
    for row in rows:
        if row.recipient and not is_index(row.recipient):
            clear = row.recipient
            row.recipient = cipher.index(clear)
            row.recipient_enc = cipher.encrypt_address(clear)
            if row.event_type != "inbound":
                row.payload = {}  # the raw provider item carried the address
        else:
            address = _address(cipher, row.recipient_enc)
            row.recipient_enc = cipher.encrypt_address(address) if address else None
    return len(rows)


async def _idempotency(
    session: AsyncSession, cipher: FieldCipher, limit: int, after: str
) -> tuple[int, str]:
    """One page of the clinic's idempotency keys (by key, after `after`); the rows rewritten
    and the last key seen ("" when there are no more)."""
    scope = cipher.clinic_id
    rows = (
        await session.scalars(
            select(IdempotencyKey)
            .where(IdempotencyKey.scope == scope, IdempotencyKey.key > after)
            .order_by(IdempotencyKey.key)
            .limit(limit)
            .with_for_update()
        )
    ).all()
    count = 0
    for row in rows:
        if _sealed_current(cipher, row.response):
            continue
        context = f"idempotency:{scope}:{row.key}"
        value = open_json(cipher, row.response, context)
        row.response = seal_json(cipher, orjson.loads(orjson.dumps(value)), context)
        count += 1
    return count, (rows[-1].key if len(rows) == limit else "")
