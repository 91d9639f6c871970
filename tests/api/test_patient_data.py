"""Patient data at rest: addresses encrypted beside a blind index, contents and metadata
encrypted, retention erasing what identifies a patient, data-key rotation, legacy rows.

The canary test sends messages whose addresses, title, body, metadata and template variables
are unique strings, through success, failure, webhooks (status report, STOP, inbound) and the
retention sweep; then scans the raw database (the SQLite file and its WAL; every PostgreSQL
table as text), every Redis value and every log line: none of those strings may be there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.engine import make_url

from clinicomm.delivery.retention import purge_contents
from clinicomm.delivery.webhooks import webhook_service
from clinicomm.delivery.worker import Worker, WorkerOptions
from clinicomm.settings import reseal
from clinicomm.settings.rotation import rotate_data
from clinicomm.store.models import (
    ClinicKey,
    Delivery,
    DeliveryEventRecord,
    InboundContact,
    Message,
    Suppression,
    utcnow,
)
from clinicomm.telemetry.logging import JsonFormatter
from tests.api.conftest import Api, create_clinic
from tests.api.test_webhooks import sign_twilio
from tests.conftest import canary
from tests.support.http_capture import CaptureServer, Scripted

SID = "SM" + "c" * 32


_USED: set[str] = set()


def phone() -> str:
    """A valid US number not used before in this session (its digits are the canary)."""
    while True:
        value = f"+1415555{secrets.randbelow(10_000):04d}"
        if value not in _USED and value not in ("+14155552671", "+14155550000"):
            _USED.add(value)
            return value


def clinic_doc(sendgrid: CaptureServer, twilio: CaptureServer, token: str) -> dict[str, Any]:
    return {
        "communicationSettings": {
            "email": {
                "primary": {
                    "provider": "sendgrid",
                    "credentials": {
                        "apiKey": canary("sg"),
                        "fromEmail": "desk@clinic.example",
                        "baseUrl": sendgrid.url,
                    },
                },
                "fallbackStrategy": {"enabled": False},
            },
            "sms": {
                "primary": {
                    "provider": "twilio",
                    "credentials": {
                        "accountSid": "AC" + "0" * 32,
                        "authToken": token,
                        "fromNumber": "+14155550000",
                        "baseUrl": twilio.url,
                    },
                },
                "fallbackStrategy": {"enabled": False},
            },
        }
    }


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def log_lines() -> Iterator[Lines]:
    handler = Lines()
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


@pytest.fixture
async def worker(api: Api) -> AsyncIterator[Worker]:
    stop = asyncio.Event()
    w = Worker.for_runtime(api.runtime, WorkerOptions(poll_seconds=0.05))
    task = asyncio.create_task(w.run(stop))
    yield w
    stop.set()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def until(api: Api, message_id: str, statuses: set[str]) -> list[Delivery]:
    for _ in range(200):
        async with api.runtime.db.read() as session:
            rows = list(
                (await session.scalars(select(Delivery).where(Delivery.message_id == message_id))).all()
            )
        if rows and all(r.status in statuses for r in rows):
            return rows
        await asyncio.sleep(0.05)
    raise AssertionError([r.status for r in rows])


async def post_twilio(api: Api, clinic: str, token: str, params: dict[str, str]) -> None:
    body = urllib.parse.urlencode(params).encode()
    url = f"http://api.test/api/v1/webhooks/twilio/{clinic}"
    answer = await api.client.post(
        f"/api/v1/webhooks/twilio/{clinic}", content=body, headers=sign_twilio(body, url, "", {"twilio": token})
    )
    assert answer.status_code == 200, answer.text
    await webhook_service(api.runtime).drain()


async def database_text(api: Api) -> bytes:
    """Every stored byte: the SQLite file and its WAL, or every PostgreSQL table as text."""
    url = make_url(api.settings.database_url)
    if url.get_backend_name() == "sqlite":
        path = Path(str(url.database))
        return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())
    chunks: list[bytes] = []
    async with api.runtime.db.read() as session:
        tables = (
            await session.execute(
                text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
            )
        ).scalars().all()
        for table in tables:
            rows = (await session.execute(text(f'SELECT t::text FROM "{table}" t'))).scalars().all()
            chunks.extend(r.encode() for r in rows)
    return b"\n".join(chunks)


async def rows_text(api: Api) -> str:
    """Every row of every table, as text (what the database holds now, not its free pages)."""
    from clinicomm.store.models import Base

    out: list[str] = []
    async with api.runtime.db.read() as session:
        for table in Base.metadata.sorted_tables:
            out.extend(str(tuple(r)) for r in (await session.execute(table.select())).all())
    return "\n".join(out)


def redis_text(api: Api) -> bytes:
    if not api.settings.redis_url:
        return b""
    import redis

    client = redis.Redis.from_url(api.settings.redis_url)
    out: list[bytes] = []
    try:
        for key in client.scan_iter(count=500):
            kind = client.type(key)
            if kind == b"string":
                out.append(client.get(key) or b"")
            elif kind == b"hash":
                out.extend(k + b"=" + v for k, v in client.hgetall(key).items())
            elif kind == b"zset":
                out.extend(m for m, _ in client.zrange(key, 0, -1, withscores=True))
            elif kind in (b"list", b"set"):
                out.extend(client.lrange(key, 0, -1) if kind == b"list" else client.smembers(key))
            out.append(key)
    finally:
        client.close()
    return b"\n".join(out)


async def test_no_patient_data_in_clear_in_the_database_redis_or_logs(
    api: Api, worker: Worker, log_lines: Lines
) -> None:
    token = canary("twilio-token")
    email = f"canary.{secrets.token_hex(6)}@patient.example"
    number, stopper = phone(), phone()
    title, body = f"TITLE-{secrets.token_hex(8)}", f"BODY-{secrets.token_hex(8)}"
    meta, variable = f"META-{secrets.token_hex(8)}", f"VAR-{secrets.token_hex(8)}"
    plain = [email, number, stopper, number[1:], stopper[1:], title, body, meta, variable]
    async with CaptureServer(Scripted(202, None, {"X-Message-Id": "sg-1"})) as sendgrid, CaptureServer(
        Scripted(201, {"sid": SID, "status": "queued"})
    ) as twilio:
        await create_clinic(api, "clinic-pii", clinic_doc(sendgrid, twilio, token))
        send = {
            "category": "APPOINTMENT",
            "title": title,
            "body": body,
            "recipients": [{"email": email, "phone": number}],
            "channels": ["email", "sms"],
            "metadata": {"clinicId": "clinic-pii", "note": meta},
        }
        answer = await api.client.post(
            "/api/v1/communications", json=send, headers={**api.admin, "Idempotency-Key": "k-pii"}
        )
        assert answer.status_code == 202, answer.text
        first = answer.json()["id"]
        await until(api, first, {"sent"})
        # Failure: a template message on WhatsApp, which the clinic has no provider for.
        failing = {
            "category": "APPOINTMENT",
            "template": {"name": "reminder", "variables": {"1": variable}},
            "recipients": [{"phone": number}],
            "channels": ["whatsapp"],
            "metadata": {"clinicId": "clinic-pii", "note": meta},
        }
        answer = await api.client.post("/api/v1/communications", json=failing, headers=api.admin)
        assert answer.status_code == 202, answer.text
        second = answer.json()["id"]
        await until(api, second, {"failed"})
        # Webhooks: a status report naming the number, a STOP from another patient, an inbound.
        await post_twilio(api, "clinic-pii", token, {
            "MessageSid": SID, "MessageStatus": "undelivered", "ErrorCode": "30003",
            "To": number, "From": "+14155550000", "AccountSid": "AC" + "0" * 32,
        })
        for sid, words in (("SM" + "d" * 32, "STOP"), ("SM" + "e" * 32, f"hello {body}")):
            await post_twilio(api, "clinic-pii", token, {
                "MessageSid": sid, "SmsSid": sid, "AccountSid": "AC" + "0" * 32,
                "From": stopper, "To": "+14155550000", "Body": words, "SmsStatus": "received",
            })
        # Readers still see the addresses and the metadata.
        got = (await api.client.get(f"/api/v1/communications/{first}", headers=api.admin)).json()
        assert {d["recipient"] for d in got["deliveries"]} == {email, number}
        assert got["metadata"]["note"] == meta
        listed = (await api.client.get("/api/v1/clinics/clinic-pii/suppressions", headers=api.admin)).json()
        assert stopper in {i["address"] for i in listed["items"]}
        again = await api.client.post(
            "/api/v1/communications", json=send, headers={**api.admin, "Idempotency-Key": "k-pii"}
        )
        assert again.json()["id"] == first and email in again.text
        # Retention: the first message is 31 days old and swept.
        async with api.runtime.db.session() as session:
            await session.execute(
                update(Message).where(Message.id == first).values(created_at=utcnow() - timedelta(days=31))
            )
        async with api.runtime.db.session() as session:
            assert await purge_contents(session, utcnow() - timedelta(days=30)) == 1
    stored = await database_text(api) + redis_text(api)
    logged = "\n".join(log_lines.lines)
    assert log_lines.lines
    for value in plain:
        assert value.encode() not in stored, f"{value} stored in clear"
        assert value.lower().encode() not in stored.lower(), f"{value} stored in clear"
        assert value not in logged, f"{value} logged"
    # Negative control: the scan does see what is stored in clear.
    async with api.runtime.db.session() as session:
        await session.execute(update(Message).where(Message.id == second).values(category=meta))
    assert meta.encode() in await database_text(api)


async def test_retention_erases_addresses_and_contents_and_stats_still_count(
    api: Api, worker: Worker
) -> None:
    token = canary("twilio-token")
    number = phone()
    async with CaptureServer(Scripted(202, None, {"X-Message-Id": "sg-2"})) as sendgrid, CaptureServer(
        Scripted(201, {"sid": SID, "status": "queued"})
    ) as twilio:
        await create_clinic(api, "clinic-ret", clinic_doc(sendgrid, twilio, token))
        ids = []
        for _ in range(2):
            answer = await api.client.post("/api/v1/communications", json={
                "body": "Your appointment is at 10:30.",
                "recipients": [{"phone": number}],
                "channels": ["sms"],
                "metadata": {"clinicId": "clinic-ret", "appointmentId": "a-1"},
            }, headers=api.admin)
            ids.append(answer.json()["id"])
            await until(api, ids[-1], {"sent"})
        await post_twilio(api, "clinic-ret", token, {
            "MessageSid": SID, "MessageStatus": "delivered", "To": number,
            "From": "+14155550000", "AccountSid": "AC" + "0" * 32,
        })
    old, new = ids
    async with api.runtime.db.session() as session:
        await session.execute(
            update(Message).where(Message.id == old).values(created_at=utcnow() - timedelta(days=31))
        )
        await session.execute(
            update(Delivery).where(Delivery.message_id == old).values(created_at=utcnow() - timedelta(hours=1))
        )
    async with api.runtime.db.session() as session:  # the clock moved forward past retention
        assert await purge_contents(session, utcnow() - timedelta(days=30)) == 1
    async with api.runtime.db.read() as session:
        message = await session.get(Message, old)
        kept = await session.get(Message, new)
        deliveries = {d.message_id: d for d in (await session.scalars(select(Delivery))).all()}
        events = (
            await session.scalars(
                select(DeliveryEventRecord).where(DeliveryEventRecord.delivery_id == deliveries[old].id)
            )
        ).all()
    assert message is not None and message.content == b"" and message.meta == {}
    assert deliveries[old].recipient == "" and deliveries[old].recipient_index  # index kept
    assert deliveries[old].status in {"sent", "delivered"} and deliveries[old].provider
    assert all(e.recipient_enc is None and e.payload == {} for e in events)
    assert kept is not None and kept.content and kept.meta and deliveries[new].recipient
    got = (await api.client.get(f"/api/v1/communications/{old}", headers=api.admin)).json()
    assert got["deliveries"][0]["recipient"] is None and got["metadata"] == {}
    stats = (await api.client.get("/api/v1/clinics/clinic-ret/communication/stats", headers=api.admin)).json()
    assert stats["total"] == 2


async def _old_version_left(api: Api, clinic_id: str, version: int) -> list[str]:
    """Every stored value of the clinic still under data key `version`."""
    old_text, old_blob = f"cc1:{version}:", b"cc2" + version.to_bytes(2, "big")
    found: list[str] = []
    async with api.runtime.db.read() as session:
        for m in (await session.scalars(select(Message).where(Message.clinic_id == clinic_id))).all():
            if m.content.startswith(old_blob) or old_text in str(m.meta):
                found.append(f"message {m.id}")
        for d in (await session.scalars(select(Delivery).where(Delivery.clinic_id == clinic_id))).all():
            if d.recipient.startswith(old_text):
                found.append(f"delivery {d.id}")
        for s in (await session.scalars(select(Suppression).where(Suppression.clinic_id == clinic_id))).all():
            if (s.address_enc or "").startswith(old_text):
                found.append(f"suppression {s.address}")
        row = await session.execute(text("SELECT settings FROM clinics WHERE id = :c"), {"c": clinic_id})
        if old_text in str(row.scalar_one()):
            found.append("settings")
    return found


async def test_rotate_data_reencrypts_everything_and_resumes_after_interruption(
    api: Api, worker: Worker
) -> None:
    token = canary("twilio-token")
    number, stopper = phone(), phone()
    async with CaptureServer(Scripted(202, None, {"X-Message-Id": "sg-3"})) as sendgrid, CaptureServer(
        Scripted(201, {"sid": SID, "status": "queued"})
    ) as twilio:
        await create_clinic(api, "clinic-rot", clinic_doc(sendgrid, twilio, token))
        ids = []
        for i in range(3):
            answer = await api.client.post("/api/v1/communications", json={
                "title": f"Visit {i}", "body": f"Body {i}",
                "recipients": [{"email": f"p{i}@patient.example", "phone": number}],
                "channels": ["email", "sms"],
                "metadata": {"clinicId": "clinic-rot", "ref": f"r-{i}"},
            }, headers={**api.admin, "Idempotency-Key": f"rot-{i}"})
            ids.append(answer.json()["id"])
            await until(api, ids[-1], {"sent"})
        added = await api.client.post(
            "/api/v1/clinics/clinic-rot/suppressions",
            json={"channel": "sms", "address": stopper, "reason": "manual"}, headers=api.admin,
        )
        assert added.status_code == 201, added.text
        rt = api.runtime
        assert await _old_version_left(api, "clinic-rot", 1)

        # Interrupted: the run stops after its first batch of rows.
        calls = 0

        def boom(_: str, __: int) -> None:
            nonlocal calls
            calls += 1
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            await rotate_data(rt.db, rt.keys, rt.config, "clinic-rot", batch_size=1, settle_seconds=0, progress=boom)
        async with rt.db.read() as session:
            versions = sorted((await session.scalars(select(ClinicKey.version).where(ClinicKey.clinic_id == "clinic-rot"))).all())
        assert versions == [1, 2]  # the old version still decrypts until the run completes
        got = (await api.client.get(f"/api/v1/communications/{ids[0]}", headers=api.admin)).json()
        assert got["metadata"]["ref"] == "r-0"

        report = await rotate_data(rt.db, rt.keys, rt.config, "clinic-rot", batch_size=2, settle_seconds=0)
        assert report.to_version == 2 and report.from_versions == [1]
        async with rt.db.read() as session:
            versions = sorted((await session.scalars(select(ClinicKey.version).where(ClinicKey.clinic_id == "clinic-rot"))).all())
        assert versions == [2]
        assert await _old_version_left(api, "clinic-rot", 1) == []
        # Everything still reads: messages, metadata, addresses, secrets, opt-outs, answers.
        rt.keys.forget()
        for i, message_id in enumerate(ids):
            got = (await api.client.get(f"/api/v1/communications/{message_id}", headers=api.admin)).json()
            assert got["metadata"]["ref"] == f"r-{i}"
            assert {d["recipient"] for d in got["deliveries"]} == {f"p{i}@patient.example", number}
        stored = await api.stored("clinic-rot")
        assert stored.settings["communicationSettings"]["sms"]["primary"]["credentials"]["authToken"] == token
        listed = (await api.client.get("/api/v1/clinics/clinic-rot/suppressions", headers=api.admin)).json()
        assert {i["address"] for i in listed["items"]} == {stopper}
        again = await api.client.post("/api/v1/communications", json={
            "title": "Visit 0", "body": "Body 0",
            "recipients": [{"email": "p0@patient.example", "phone": number}],
            "channels": ["email", "sms"], "metadata": {"clinicId": "clinic-rot", "ref": "r-0"},
        }, headers={**api.admin, "Idempotency-Key": "rot-0"})
        assert again.json()["id"] == ids[0]
        # The opt-out still holds (the blind index did not change) and new sends still go.
        answer = await api.client.post("/api/v1/communications", json={
            "body": "b", "recipients": [{"phone": stopper}, {"phone": number}], "channels": ["sms"],
            "metadata": {"clinicId": "clinic-rot"},
        }, headers=api.admin)
        rows = await until(api, answer.json()["id"], {"sent", "suppressed"})
        assert sorted(r.status for r in rows) == ["sent", "suppressed"]
        async with rt.db.read() as session:
            actions = (await session.execute(text(
                "SELECT action FROM audit_log WHERE clinic_id = 'clinic-rot' AND action LIKE 'key.%'"
            ))).scalars().all()
        assert set(actions) == {"key.rotate_data.start", "key.rotate_data"}


async def test_migrate_encrypts_rows_written_before_addresses_were(api: Api) -> None:
    number = phone()
    await create_clinic(api, "clinic-old")
    rt = api.runtime
    answer = await api.client.post("/api/v1/communications", json={
        "body": "b", "recipients": [{"phone": number}], "channels": ["sms"],
        "metadata": {"clinicId": "clinic-old", "ref": "legacy"},
    }, headers=api.admin)
    message_id = answer.json()["id"]
    cipher = await rt.keys.cipher_for(rt.db, "clinic-old")
    async with rt.db.session() as session:  # as a row of the previous release
        await session.execute(update(Delivery).where(Delivery.message_id == message_id).values(recipient=number, recipient_index=None))
        blob = (await session.get(Message, message_id)).content  # type: ignore[union-attr]
        await session.execute(
            update(Message)
            .where(Message.id == message_id)
            .values(meta={"clinicId": "clinic-old", "ref": "legacy"}, content=blob[5:])  # no header
        )
        session.add(Suppression(clinic_id="clinic-old", channel="sms", address=number, reason="stop", source="old"))
        session.add(InboundContact(clinic_id="clinic-old", channel="whatsapp", address=number, last_inbound_at=utcnow()))
    pending = await reseal.pending(rt.db, cipher)
    assert pending["deliveries"] == 1 and pending["suppressions"] == 1 and pending["inbound_contacts"] == 1
    assert pending["messages"] == 1
    report = await reseal.reseal_clinic(rt.db, cipher, batch_size=1)
    assert report.rows["deliveries"] == 1
    assert not any((await reseal.pending(rt.db, cipher)).values())
    stored = await rows_text(api)
    assert number not in stored and number[1:] not in stored
    assert "legacy" not in stored  # the metadata is sealed now
    async with rt.db.read() as session:
        suppression = (await session.scalars(select(Suppression).where(Suppression.clinic_id == "clinic-old"))).one()
        contact = (await session.scalars(select(InboundContact).where(InboundContact.clinic_id == "clinic-old"))).one()
    assert suppression.address == contact.address == cipher.index(number)
    assert cipher.decrypt_address(suppression.address_enc or "") == number
    got = (await api.client.get(f"/api/v1/communications/{message_id}", headers=api.admin)).json()
    assert got["deliveries"][0]["recipient"] == number and got["metadata"]["ref"] == "legacy"
