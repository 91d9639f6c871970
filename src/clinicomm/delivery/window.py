"""The WhatsApp customer service window: when each patient last wrote (PROVIDER-FACTS §1.2).

Free-form WhatsApp text is allowed only within 24 hours of the patient's last inbound
message; outside it only a template may be sent (Meta 131047, Twilio 63016). Ingest records
inbound messages (`record_inbound`); admission reads a whole batch (`last_inbound_among`) and
decides with `is_open`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from clinicomm.providers.base import Channel
from clinicomm.store import upsert
from clinicomm.store.models import InboundContact, aware

WINDOW = timedelta(hours=24)


def is_open(last_inbound: datetime | None, now: datetime) -> bool:
    """True when the patient wrote within the last 24 hours (never wrote: closed)."""
    return last_inbound is not None and last_inbound > now - WINDOW


async def record_inbound(
    session: AsyncSession, clinic_id: str, channel: str, address: str, at: datetime
) -> None:
    """Note that `address` wrote to the clinic at `at` (keeps the latest time)."""
    stmt = upsert.insert(session, InboundContact).values(
        clinic_id=clinic_id, channel=str(channel), address=address, last_inbound_at=at
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["clinic_id", "channel", "address"],
        set_={"last_inbound_at": stmt.excluded.last_inbound_at},
        where=InboundContact.last_inbound_at < stmt.excluded.last_inbound_at,
    )
    await session.execute(stmt)


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
