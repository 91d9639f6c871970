"""Whose patient wrote to a global provider: `WebhookService.route_global` for inbound messages.

The owner is the clinic whose global delivery on that channel last reached the sender, found
by each clinic's blind index of the sender on `ix_deliveries_recipient_index` (no address is
compared in clear, and no scan of the deliveries table).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import count

import pytest

from clinicomm.delivery import webhooks
from clinicomm.delivery.webhooks import WebhookService, owner_query
from clinicomm.providers.base import Channel
from clinicomm.providers.webhooks.base import InboundMessage
from clinicomm.runtime import Runtime
from clinicomm.settings.keys import PLATFORM
from clinicomm.store.models import Clinic, Delivery, Message

PATIENT = "+14155550123"
OTHER = "+14155550999"
_ids = count(1)


async def clinics(runtime: Runtime, *names: str) -> None:
    async with runtime.db.session() as session:
        for name in names:
            session.add(Clinic(id=name, name=name))
            await session.flush()
            await runtime.keys.create(session, name)


async def delivered(
    runtime: Runtime,
    clinic: str,
    phone: str,
    *,
    provider: str = "global:twilio",
    channel: str = "sms",
    age: timedelta = timedelta(0),
) -> None:
    cipher = await runtime.keys.cipher_for(runtime.db, clinic)
    n = next(_ids)
    at = datetime.now(UTC) - age
    async with runtime.db.session() as session:
        session.add(Message(id=f"m-{n}", clinic_id=clinic, category="X", content=b"x"))
        await session.flush()
        session.add(Delivery(id=f"d-{n:06d}", message_id=f"m-{n}", clinic_id=clinic,
                             channel=channel, recipient=cipher.encrypt_address(phone),
                             recipient_index=cipher.index(phone), status="sent",
                             provider=provider, created_at=at))


def inbound(sender: str = PATIENT, channel: Channel = Channel.SMS) -> InboundMessage:
    return InboundMessage(provider="twilio", event_id=f"in-{next(_ids)}", channel=channel,
                          sender=sender, to="+15550000", text="STOP", occurred_at=None)


async def owner(runtime: Runtime, event: InboundMessage, provider: str = "twilio") -> str | None:
    routed, dropped = await WebhookService(runtime).route_global(provider, [event])
    assert dropped == (0 if routed else 1)
    (clinic,) = routed or [None]
    return clinic


async def test_the_clinic_that_wrote_last_owns_the_answer(runtime: Runtime) -> None:
    await clinics(runtime, "c-a", "c-b", "c-c")
    await delivered(runtime, "c-a", PATIENT, age=timedelta(days=2))
    await delivered(runtime, "c-b", PATIENT, provider="global:twilio#2", age=timedelta(days=1))
    await delivered(runtime, "c-c", OTHER)  # newer, but another patient
    await delivered(runtime, "c-c", PATIENT, provider="twilio")  # the clinic's own Twilio
    await delivered(runtime, "c-c", PATIENT, channel="whatsapp")  # another channel
    assert await owner(runtime, inbound()) == "c-b"
    assert await owner(runtime, inbound(OTHER)) == "c-c"
    assert await owner(runtime, inbound("+14155550777")) is None


async def test_only_deliveries_within_owner_days_count(runtime: Runtime) -> None:
    await clinics(runtime, "c-old")
    await delivered(runtime, "c-old", PATIENT, age=timedelta(days=400))
    assert await owner(runtime, inbound()) is None


async def test_every_chunk_of_clinics_is_searched(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With more clinics than one query takes, the newest match of any chunk wins."""
    monkeypatch.setattr(webhooks, "OWNER_CHUNK", 2)
    monkeypatch.setattr(type(runtime.keys), "LOAD_CHUNK", 2)
    names = [f"c-{n}" for n in range(7)]
    await clinics(runtime, *names)
    await delivered(runtime, "c-1", PATIENT, age=timedelta(hours=3))
    await delivered(runtime, "c-6", PATIENT, age=timedelta(hours=1))
    await delivered(runtime, "c-4", PATIENT, age=timedelta(hours=2))
    runtime.keys.forget()  # loaded by indexes_of, two clinics per query
    assert await owner(runtime, inbound()) == "c-6"


async def test_indexes_of_every_clinic_match_each_clinics_cipher(runtime: Runtime) -> None:
    """Loaded in chunks or from the cache, old or fresh: the index each clinic's cipher gives;
    the platform's own key is not a clinic."""
    await clinics(runtime, "c-x", "c-y")
    await runtime.keys.cipher_for(runtime.db, PLATFORM)
    expected = {c: (await runtime.keys.cipher_for(runtime.db, c)).index(PATIENT)
                for c in ("c-x", "c-y")}
    runtime.keys.forget()
    assert await runtime.keys.indexes_of(runtime.db, PATIENT) == expected
    runtime.keys.refresh_seconds = 0.0  # every cached cipher is past its refresh time
    assert await runtime.keys.indexes_of(runtime.db, PATIENT) == expected
    assert expected["c-x"] != expected["c-y"]


async def test_the_lookup_is_served_by_the_recipient_index(runtime: Runtime) -> None:
    """The plan of the owner query, as the service sends it, reads
    `ix_deliveries_recipient_index` (on PostgreSQL with sequential scans priced out, since a
    test table is too small for the planner to prefer an index by itself)."""
    await clinics(runtime, "c-plan", "c-plan2")
    for n in range(50):
        await delivered(runtime, "c-plan", f"+1415555{n:04d}")
    indexes = await runtime.keys.indexes_of(runtime.db, PATIENT)
    query = owner_query(list(indexes.items()), "global:twilio%", "sms",
                        datetime.now(UTC) - timedelta(days=365))
    async with runtime.db.read() as session:
        connection = await session.connection()
        compiled = query.compile(dialect=connection.dialect,
                                 compile_kwargs={"render_postcompile": True})
        params = tuple(compiled.params[name] for name in compiled.positiontup or [])
        if connection.dialect.name == "sqlite":
            rows = await connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", params)
            plan = " ".join(str(r[-1]) for r in rows)
        else:
            await connection.exec_driver_sql("SET enable_seqscan = off")
            try:
                rows = await connection.exec_driver_sql(f"EXPLAIN {compiled}", params)
                plan = " ".join(r[0] for r in rows)
            finally:
                await connection.exec_driver_sql("RESET enable_seqscan")
    assert "ix_deliveries_recipient_index" in plan, plan
