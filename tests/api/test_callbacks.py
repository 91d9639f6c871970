"""Status callbacks end to end: a real HTTP receiver (aiohttp on 127.0.0.1), a worker sending
through a CaptureServer provider, signed provider webhooks moving the delivery on, and the
callback sender POSTing each status change.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, select

from clinicomm.callbacks import queue as cbqueue
from clinicomm.callbacks.sender import CallbackSender
from clinicomm.callbacks.signing import HEADER, sign, verify_signature
from clinicomm.delivery.worker import Worker, WorkerOptions
from clinicomm.store.models import CallbackEvent, Delivery, utcnow
from clinicomm.telemetry import metrics
from tests.api.conftest import Api, create_clinic
from tests.api.test_webhooks_flow import PATIENT, meta_settings, post_meta
from tests.conftest import canary
from tests.support.http_capture import CaptureServer, Scripted


@pytest.fixture
async def worker(api: Api) -> AsyncIterator[Worker]:
    stop = asyncio.Event()
    w = Worker.for_runtime(api.runtime, WorkerOptions(poll_seconds=0.05))
    task = asyncio.create_task(w.run(stop))
    yield w
    stop.set()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@pytest.fixture
async def sender(api: Api) -> AsyncIterator[CallbackSender]:
    assert api.runtime.messaging.targets is not None
    s = CallbackSender(api.runtime.db, api.runtime.messaging.targets, retry_base=0.05, poll=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(s.run(stop))
    yield s
    stop.set()
    await task


def with_callbacks(settings: dict[str, Any], url: str, secret: str, **extra: Any) -> dict[str, Any]:
    settings["communicationSettings"]["callbacks"] = {"url": url, "secret": secret, **extra}
    return settings


async def until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_callbacks_arrive_signed_in_order_and_survive_a_receiver_outage(
    api: Api, worker: Worker, sender: CallbackSender
) -> None:
    async with CaptureServer() as meta, CaptureServer() as receiver:
        meta.default = Scripted(200, {"messages": [{"id": "wamid.CB1"}]})
        receiver.respond(503, times=3)  # the receiver is down for its first three requests
        app_secret, cb_secret = canary("meta-app"), canary("callback-secret")
        settings = with_callbacks(meta_settings(meta, app_secret), f"{receiver.url}/hook", cb_secret)
        await create_clinic(api, "clinic-cb", settings)
        now = int(time.time())
        await post_meta(api, "clinic-cb", app_secret, {"messages": [
            {"from": PATIENT[1:], "id": "wamid.IN1", "timestamp": str(now - 60),
             "type": "text", "text": {"body": "hello"}}]})
        answer = await api.client.post(
            "/api/v1/communications",
            json={"body": "Your appointment is at 10:30.", "recipients": [{"phone": PATIENT}],
                  "channels": ["whatsapp"],
                  "metadata": {"clinicId": "clinic-cb", "appointmentId": "appt-9"}},
            headers=api.admin,
        )
        assert answer.status_code == 202, answer.text
        message_id = answer.json()["id"]
        deadline = time.monotonic() + 10
        while True:
            async with api.runtime.db.read() as session:
                row = await session.scalar(select(Delivery).where(Delivery.message_id == message_id))
            if row is not None and row.status == "sent":
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)

        def status(kind: str, ts: int) -> dict[str, Any]:
            return {"statuses": [{"id": "wamid.CB1", "status": kind, "timestamp": str(ts),
                                  "recipient_id": PATIENT[1:]}]}

        await post_meta(api, "clinic-cb", app_secret, status("delivered", now))
        await post_meta(api, "clinic-cb", app_secret, status("read", now + 1))

        def accepted() -> list[dict[str, Any]]:
            return [r.json() for r in receiver.requests[3:]]

        await until(lambda: len(accepted()) >= 3)
        await asyncio.sleep(0.2)  # nothing more may arrive
        # Every request is signed with the clinic's secret and carries the stable event id.
        for request in receiver.requests:
            assert request.path == "/hook"
            assert verify_signature(cb_secret, request.body, request.headers[HEADER])
            assert not verify_signature("the-wrong-secret-0000", request.body, request.headers[HEADER])
            assert request.headers["Clinicomm-Event-Id"] == request.json()["id"]
        # The outage: the first event was retried with the same id; nothing was lost and,
        # once answered, nothing was sent again.
        first_ids = [r.json()["id"] for r in receiver.requests[:4]]
        assert len(set(first_ids)) == 1
        delivered = accepted()
        assert [e["status"] for e in delivered] == ["sent", "delivered", "read"]
        assert len({e["id"] for e in delivered}) == 3
        event = delivered[0]
        assert event["messageId"] == message_id and event["clinicId"] == "clinic-cb"
        assert event["channel"] == "whatsapp" and event["provider"] == "clinic:meta_business"
        assert event["metadata"] == {"clinicId": "clinic-cb", "appointmentId": "appt-9"}
        assert PATIENT not in receiver.requests[0].body.decode()
        # The message's GET shows each callback's delivery.
        got = (await api.client.get(f"/api/v1/communications/{message_id}", headers=api.admin)).json()
        callbacks = got["deliveries"][0]["callbacks"]
        assert [(c["status"], c["state"]) for c in callbacks] == [
            ("sent", "sent"), ("delivered", "sent"), ("read", "sent")]
        assert callbacks[0]["attempts"] == 4
        async with api.runtime.db.read() as session:
            assert await cbqueue.backlog(session) == 0
        # The secret is masked like every credential.
        clinic = (await api.client.get("/api/v1/clinics/clinic-cb", headers=api.admin)).json()
        assert clinic["settings"]["communicationSettings"]["callbacks"]["secret"] == "********"


async def test_callback_url_must_be_on_the_allow_list(api: Api) -> None:
    async with CaptureServer() as meta:
        secret = canary("callback-secret")
        settings = with_callbacks(
            meta_settings(meta, canary("meta-app")), "https://appointments.example/cb", secret,
            allowedUrls=["https://appointments.example/other"], events=["failed", "bounced"],
        )
        await create_clinic(api, "clinic-al", settings)
        body = {"body": "x", "recipients": [{"phone": PATIENT}], "channels": ["whatsapp"],
                "metadata": {"clinicId": "clinic-al"}}
        refused = await api.client.post(
            "/api/v1/communications", headers=api.admin,
            json={**body, "callbackUrl": "https://evil.example/steal"})
        assert refused.status_code == 422, refused.text
        paths = [d["path"] for d in refused.json()["error"]["details"]]
        assert any(p.endswith("callbackUrl") for p in paths), paths
        allowed = await api.client.post(
            "/api/v1/communications", headers=api.admin,
            json={**body, "callbackUrl": "https://appointments.example/other"})
        assert allowed.status_code == 202, allowed.text


async def test_a_later_status_is_never_followed_by_an_earlier_one(api: Api) -> None:
    """Events committed out of order (read before sent): the late earlier one is dropped."""
    async with CaptureServer() as receiver:
        secret = canary("callback-secret")
        settings = with_callbacks({"communicationSettings": {}}, f"{receiver.url}/cb", secret)
        await create_clinic(api, "clinic-or", settings)
        answer = await api.client.post(
            "/api/v1/communications", headers=api.admin,
            json={"body": "x", "recipients": [{"email": "p@example.com"}], "channels": ["email"],
                  "metadata": {"clinicId": "clinic-or"}})
        assert answer.status_code == 202, answer.text
        delivery_id = answer.json()["deliveries"][0]["id"]
        now = utcnow()
        async with api.runtime.db.session() as session:
            row = await session.get(Delivery, delivery_id)
            assert row is not None
            row.status = "read"
            await session.flush()
            assert await cbqueue.enqueue(session, [delivery_id], now) == 1
        assert api.runtime.messaging.targets is not None
        s = CallbackSender(api.runtime.db, api.runtime.messaging.targets, retry_base=0.05)
        assert await s.run_once() == 1
        async with api.runtime.db.session() as session:
            row = await session.get(Delivery, delivery_id)
            assert row is not None
            row.status = "sent"
            await session.flush()
            assert await cbqueue.enqueue(session, [delivery_id], now - timedelta(seconds=1)) == 1
        before = metrics.CALLBACKS.labels("superseded")._value.get()
        assert await s.run_once() == 1
        await s.close()
        assert [r.json()["status"] for r in receiver.requests] == ["read"]
        assert metrics.CALLBACKS.labels("superseded")._value.get() == before + 1
        async with api.runtime.db.read() as session:
            states = (await session.scalars(
                select(CallbackEvent.state).order_by(CallbackEvent.id))).all()
        assert list(states) == ["sent", "superseded"]


def test_signature_scheme_matches_the_documented_formula() -> None:
    import hashlib
    import hmac

    header = sign("s3cret-s3cret-s3cret", b'{"a":1}', timestamp=1700000000)
    mac = hmac.new(b"s3cret-s3cret-s3cret", b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={mac}"
    assert verify_signature("s3cret-s3cret-s3cret", b'{"a":1}', header, now=1700000100)
    assert not verify_signature("s3cret-s3cret-s3cret", b'{"a":1}', header, now=1700001000)
    assert not verify_signature("s3cret-s3cret-s3cret", b'{"a":2}', header, now=1700000100)
    assert not verify_signature("s3cret-s3cret-s3cret", b'{"a":1}', "garbage", now=1700000100)


async def test_a_delivery_failed_at_accept_is_called_back(api: Api) -> None:
    async with CaptureServer() as receiver:
        secret = canary("callback-secret")
        await create_clinic(api, "clinic-fa", with_callbacks(
            {"communicationSettings": {}}, f"{receiver.url}/cb", secret))
        answer = await api.client.post(
            "/api/v1/communications", headers=api.admin,
            json={"body": "x", "recipients": [{"phone": PATIENT}], "channels": ["email"],
                  "metadata": {"clinicId": "clinic-fa"}})
        assert answer.status_code == 202, answer.text
        assert answer.json()["deliveries"][0]["status"] == "failed"
        assert api.runtime.messaging.targets is not None
        s = CallbackSender(api.runtime.db, api.runtime.messaging.targets)
        assert await s.run_once() == 1
        await s.close()
        [event] = [r.json() for r in receiver.requests]
        assert event["status"] == "failed" and event["channel"] == "email"
        assert verify_signature(secret, receiver.requests[0].body,
                                receiver.requests[0].headers[HEADER])
        assert PATIENT not in receiver.requests[0].body.decode()


async def test_outcomes_of_messages_without_a_target_are_not_looked_up(
    api: Api, worker: Worker
) -> None:
    """The worker reads whether a message has a callback target with its content: the flush
    of a message without one makes no callback lookup; one with a target is still queued."""
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    engine = api.runtime.db.engine.sync_engine
    async with CaptureServer() as meta, CaptureServer() as receiver:
        meta.default = Scripted(200, {"messages": [{"id": "wamid.NT1"}]})
        await create_clinic(api, "clinic-nt", meta_settings(meta, canary("meta-app")))
        await create_clinic(api, "clinic-wt", with_callbacks(
            meta_settings(meta, canary("meta-app")), f"{receiver.url}/hook", canary("cb-secret")))
        event.listen(engine, "before_cursor_execute", record)
        try:
            ids = {}
            for clinic in ("clinic-nt", "clinic-wt"):
                answer = await api.client.post("/api/v1/communications", headers=api.admin, json={
                    "template": {"name": "appointment_reminder", "language": "en",
                                 "variables": {"1": "10:30"}},
                    "recipients": [{"phone": PATIENT}], "channels": ["whatsapp"],
                    "metadata": {"clinicId": clinic}})
                assert answer.status_code == 202, answer.text
                ids[clinic] = answer.json()["deliveries"][0]["id"]

                async def sent(delivery_id: str = ids[clinic]) -> bool:
                    async with api.runtime.db.read() as session:
                        row = await session.get(Delivery, delivery_id)
                    return row is not None and row.status == "sent"

                deadline = time.monotonic() + 10
                while not await sent():
                    assert time.monotonic() < deadline, "not sent"
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.1)  # the flush that wrote it has committed its callbacks
        finally:
            event.remove(engine, "before_cursor_execute", record)
    lookups = [s for s in statements if "callback_url IS NOT NULL" in s]
    assert len(lookups) == 1, lookups  # the flush of clinic-wt's delivery only
    async with api.runtime.db.read() as session:
        queued = (await session.scalars(select(CallbackEvent.delivery_id))).all()
    assert list(queued) == [ids["clinic-wt"]]
