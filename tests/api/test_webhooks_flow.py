"""End to end: send through a CaptureServer provider with a worker, then post signed webhooks.

Dedupe and forward-only status, STOP/START around sends, Twilio 21610 on send, the WhatsApp
24-hour window (template conversion or `template required`), the suppressions API, bounce rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.parse
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from clinicomm.delivery.bounces import bounce_rate
from clinicomm.delivery.webhooks import webhook_service
from clinicomm.delivery.window import record_inbound
from clinicomm.delivery.worker import Worker, WorkerOptions
from clinicomm.store.models import AuditEntry, Delivery
from tests.api.conftest import Api, create_clinic
from tests.api.test_webhooks import sign_meta, sign_twilio
from tests.conftest import canary
from tests.support.http_capture import CaptureServer, Scripted
from tests.support.webhooks import is_suppressed

PATIENT = "+14155552671"
SID = "SM" + "a" * 32


@pytest.fixture
async def worker(api: Api) -> AsyncIterator[Worker]:
    stop = asyncio.Event()
    w = Worker.for_runtime(api.runtime, WorkerOptions(poll_seconds=0.05))
    task = asyncio.create_task(w.run(stop))
    yield w
    stop.set()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def twilio_settings(server: CaptureServer, token: str) -> dict[str, Any]:
    return {
        "communicationSettings": {
            "sms": {
                "primary": {
                    "provider": "twilio",
                    "credentials": {
                        "accountSid": "AC" + "0" * 32,
                        "authToken": token,
                        "fromNumber": "+14155550000",
                        "baseUrl": server.url,
                    },
                },
                "fallbackStrategy": {"enabled": False},
            }
        }
    }


def meta_settings(server: CaptureServer, secret: str, **whatsapp: Any) -> dict[str, Any]:
    return {
        "communicationSettings": {
            "whatsapp": {
                "primary": {
                    "provider": "meta_business",
                    "credentials": {
                        "apiUrl": f"{server.url}/v23.0",
                        "apiKey": canary("meta-key"),
                        "phoneNumberId": "1234",
                        "appSecret": secret,
                        "templates": {"reminder": "appointment_reminder_v2"},
                    },
                },
                "fallbackStrategy": {"enabled": False},
                **whatsapp,
            }
        }
    }


async def send(api: Api, clinic: str, channel: str, **extra: Any) -> str:
    body = {
        "category": "APPOINTMENT",
        "body": "Your appointment is at 10:30.",
        "recipients": [{"phone": PATIENT}],
        "channels": [channel],
        "metadata": {"clinicId": clinic},
        **extra,
    }
    answer = await api.client.post("/api/v1/communications", json=body, headers=api.admin)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


async def delivery(api: Api, message_id: str, until: set[str], timeout: float = 10) -> Delivery:
    deadline = time.monotonic() + timeout
    while True:
        async with api.runtime.db.read() as session:
            row = await session.scalar(select(Delivery).where(Delivery.message_id == message_id))
        if row is not None and row.status in until:
            return row
        assert time.monotonic() < deadline, row.status if row else None
        await asyncio.sleep(0.05)


async def post_twilio(api: Api, clinic: str, token: str, params: dict[str, str]) -> None:
    body = urllib.parse.urlencode(params).encode()
    url = f"http://api.test/api/v1/webhooks/twilio/{clinic}"
    answer = await api.client.post(
        f"/api/v1/webhooks/twilio/{clinic}", content=body,
        headers=sign_twilio(body, url, "", {"twilio": token}),
    )
    assert answer.status_code == 200, answer.text
    await webhook_service(api.runtime).drain()


async def post_meta(api: Api, clinic: str, secret: str, value: dict[str, Any]) -> None:
    body = json.dumps(
        {"object": "whatsapp_business_account",
         "entry": [{"id": "1", "changes": [{"field": "messages", "value": value}]}]}
    ).encode()
    answer = await api.client.post(
        f"/api/v1/webhooks/meta_business/{clinic}", content=body,
        headers=sign_meta(body, "", "", {"meta": secret}),
    )
    assert answer.status_code == 200, answer.text
    await webhook_service(api.runtime).drain()


def inbound(text: str, sid: str) -> dict[str, str]:
    return {"MessageSid": sid, "SmsSid": sid, "AccountSid": "AC" + "0" * 32,
            "From": PATIENT, "To": "+14155550000", "Body": text, "SmsStatus": "received"}


async def test_same_event_twice_changes_once_and_read_is_not_regressed(
    api: Api, worker: Worker
) -> None:
    async with CaptureServer() as meta:
        meta.default = Scripted(200, {"messages": [{"id": "wamid.E2E"}]})
        secret = canary("meta-app")
        await create_clinic(api, "clinic-m", meta_settings(meta, secret))
        # The patient writes first (inbound WhatsApp opens the 24-hour window).
        now = int(time.time())
        await post_meta(api, "clinic-m", secret, {"messages": [
            {"from": PATIENT[1:], "id": "wamid.IN1", "timestamp": str(now - 60),
             "type": "text", "text": {"body": "hello"}}]})
        message_id = await send(api, "clinic-m", "whatsapp")
        sent = await delivery(api, message_id, {"sent"})
        assert sent.provider_message_id == "wamid.E2E"
        assert meta.requests[0].json()["type"] == "text"

        def status(kind: str, ts: int) -> dict[str, Any]:
            return {"statuses": [{"id": "wamid.E2E", "status": kind, "timestamp": str(ts),
                                  "recipient_id": PATIENT[1:]}]}

        await post_meta(api, "clinic-m", secret, status("read", now))
        row = await delivery(api, message_id, {"read"})
        first = (row.updated_at, row.read_at)
        await post_meta(api, "clinic-m", secret, status("read", now))  # the same event again
        await post_meta(api, "clinic-m", secret, status("delivered", now - 5))  # late
        row = await delivery(api, message_id, {"read"})
        assert (row.updated_at, row.read_at) == first
        assert row.delivered_at is not None


async def test_stop_then_send_is_suppressed_and_start_then_send_is_sent(
    api: Api, worker: Worker
) -> None:
    async with CaptureServer() as twilio:
        twilio.default = Scripted(201, {"sid": SID, "status": "queued"})
        token = canary("twilio-token")
        await create_clinic(api, "clinic-t", twilio_settings(twilio, token))
        await post_twilio(api, "clinic-t", token, inbound("Stop", "SM" + "1" * 32))
        suppressed = await delivery(api, await send(api, "clinic-t", "sms"), {"suppressed", "sent", "failed"})
        assert suppressed.status == "suppressed"
        assert twilio.requests == []
        await post_twilio(api, "clinic-t", token, inbound("START", "SM" + "2" * 32))
        sent = await delivery(api, await send(api, "clinic-t", "sms"), {"sent", "failed", "suppressed"})
        assert sent.status == "sent"
        assert len(twilio.requests) == 1


async def test_stop_after_accept_still_stops_the_queued_delivery(api: Api) -> None:
    """No worker runs while the STOP arrives; the claim-time check stops the send."""
    async with CaptureServer() as twilio:
        token = canary("twilio-token")
        await create_clinic(api, "clinic-q", twilio_settings(twilio, token))
        message_id = await send(api, "clinic-q", "sms")
        await post_twilio(api, "clinic-q", token, inbound("STOP", "SM" + "3" * 32))
        stop = asyncio.Event()
        task = asyncio.create_task(Worker.for_runtime(api.runtime, WorkerOptions(poll_seconds=0.05)).run(stop))
        try:
            row = await delivery(api, message_id, {"suppressed", "sent", "failed"})
        finally:
            stop.set()
            await task
        assert row.status == "suppressed" and twilio.requests == []


async def test_twilio_21610_on_send_creates_the_opt_out(api: Api, worker: Worker) -> None:
    async with CaptureServer() as twilio:
        twilio.default = Scripted(400, {"code": 21610, "message": "Attempt to send to unsubscribed recipient"})
        await create_clinic(api, "clinic-o", twilio_settings(twilio, canary("twilio-token")))
        row = await delivery(api, await send(api, "clinic-o", "sms"), {"failed", "sent"})
        assert row.status == "failed"
        index = await api.runtime.keys.index_for(api.runtime.db, "clinic-o", PATIENT)
        async with api.runtime.db.read() as session:
            assert await is_suppressed(session, "clinic-o", "sms", index)


@pytest.mark.parametrize("mapped", [True, False])
async def test_free_text_to_a_patient_silent_25_hours(api: Api, worker: Worker, mapped: bool) -> None:
    async with CaptureServer() as meta:
        meta.default = Scripted(200, {"messages": [{"id": "wamid.T"}]})
        extra = {"windowTemplates": {"APPOINTMENT": "reminder"}} if mapped else {}
        await create_clinic(api, "clinic-w", meta_settings(meta, canary("meta-app"), **extra))
        index = await api.runtime.keys.index_for(api.runtime.db, "clinic-w", PATIENT)
        async with api.runtime.db.session() as session:
            at = datetime.now(UTC) - timedelta(hours=25)
            await record_inbound(session, "clinic-w", "whatsapp", index, at)
        row = await delivery(api, await send(api, "clinic-w", "whatsapp"), {"sent", "failed"})
        if mapped:
            assert row.status == "sent"
            (request,) = meta.requests
            payload = request.json()
            assert payload["type"] == "template"
            assert payload["template"]["name"] == "appointment_reminder_v2"
            params = payload["template"]["components"][0]["parameters"]
            assert params == [{"type": "text", "text": "Your appointment is at 10:30."}]
        else:
            assert row.status == "failed"
            assert row.error is not None and row.error["reason"] == "template required"
            assert meta.requests == []


async def test_never_wrote_means_window_closed_but_templates_go(api: Api, worker: Worker) -> None:
    async with CaptureServer() as meta:
        meta.default = Scripted(200, {"messages": [{"id": "wamid.N"}]})
        await create_clinic(api, "clinic-n", meta_settings(meta, canary("meta-app")))
        free = await delivery(api, await send(api, "clinic-n", "whatsapp"), {"sent", "failed"})
        assert free.status == "failed" and meta.requests == []
        template = {"name": "reminder", "language": "en", "variables": {"1": "10:30"}}
        sent = await delivery(
            api, await send(api, "clinic-n", "whatsapp", template=template), {"sent", "failed"}
        )
        assert sent.status == "sent" and len(meta.requests) == 1


# ---- suppressions API ------------------------------------------------------------------------
async def test_suppressions_api_roles_audit_and_validation(api: Api, worker: Worker) -> None:
    async with CaptureServer() as twilio:
        twilio.default = Scripted(201, {"sid": SID, "status": "queued"})
        await create_clinic(api, "clinic-s", twilio_settings(twilio, canary("twilio-token")))
        url = "/api/v1/clinics/clinic-s/suppressions"
        admin = api.auth("ClinicAdmin", "clinic-s", sub="alice")
        item = {"channel": "sms", "address": "+1 (415) 555-2671", "reason": "manual"}
        for role in ("ClinicManager", "Service", "Doctor", "Patient"):
            headers = api.auth(role, "clinic-s")
            assert (await api.client.post(url, json=item, headers=headers)).status_code == 403
            assert (await api.client.get(url, headers=headers)).status_code == 403
            assert (await api.client.delete(url, params={"channel": "sms", "address": PATIENT},
                                            headers=headers)).status_code == 403
        assert (await api.client.get(url)).status_code == 401
        assert (await api.client.post(url, json=item, headers=api.auth("ClinicAdmin", "clinic-x"))).status_code == 403
        created = await api.client.post(url, json=item, headers=admin)
        assert created.status_code == 201, created.text
        assert created.json()["address"] == PATIENT
        assert (await api.client.post(url, json=item, headers=admin)).status_code == 200
        email = await api.client.post(
            url, json={"channel": "email", "address": "Jane.Doe@Example.COM"}, headers=admin
        )
        assert email.json()["address"] == "jane.doe@example.com"
        listed = await api.client.get(url, params={"channel": "sms"}, headers=admin)
        assert [i["address"] for i in listed.json()["items"]] == [PATIENT]
        for bad in ({"channel": "sms", "address": "4155552671"},
                    {"channel": "email", "address": "not-an-email"},
                    {"channel": "fax", "address": PATIENT}):
            assert (await api.client.post(url, json=bad, headers=admin)).status_code == 422
        # A send to the suppressed number: no provider call.
        row = await delivery(api, await send(api, "clinic-s", "sms"), {"suppressed", "sent"})
        assert row.status == "suppressed" and twilio.requests == []
        gone = await api.client.request(
            "DELETE", url, json={"channel": "sms", "address": PATIENT}, headers=admin
        )
        assert gone.status_code == 204
        again = await api.client.delete(url, params={"channel": "sms", "address": PATIENT}, headers=admin)
        assert again.status_code == 404
        async with api.runtime.db.read() as session:
            actions = [
                (e.action, e.actor, e.diff.get("channel"))
                for e in (await session.scalars(
                    select(AuditEntry).where(AuditEntry.action.like("suppression.%")).order_by(AuditEntry.id)
                )).all()
            ]
        assert actions == [
            ("suppression.add", "alice", "sms"),
            ("suppression.add", "alice", "email"),
            ("suppression.remove", "alice", "sms"),
        ]
        sent = await delivery(api, await send(api, "clinic-s", "sms"), {"sent", "suppressed"})
        assert sent.status == "sent"


async def test_bounce_rate_per_provider(api: Api, worker: Worker) -> None:
    async with CaptureServer() as twilio:
        twilio.default = Scripted(201, {"sid": SID, "status": "queued"})
        await create_clinic(api, "clinic-b", twilio_settings(twilio, canary("twilio-token")))
        ids = [await send(api, "clinic-b", "sms") for _ in range(4)]
        rows = [await delivery(api, m, {"sent"}) for m in ids]
        async with api.runtime.db.session() as session:
            row = await session.get(Delivery, rows[0].id)
            assert row is not None
            row.status = "bounced"
        async with api.runtime.db.read() as session:
            rates = await bounce_rate(session, "clinic-b", datetime.now(UTC) - timedelta(hours=1))
            assert rates == {"twilio": 0.25}
            assert await bounce_rate(session, "clinic-b", datetime.now(UTC) + timedelta(hours=1)) == {}


async def test_stats_api_gives_the_same_bounce_rate(api: Api, worker: Worker) -> None:
    async with CaptureServer() as twilio:
        twilio.default = Scripted(201, {"sid": SID, "status": "queued"})
        await create_clinic(api, "clinic-sb", twilio_settings(twilio, canary("twilio-token")))
        ids = [await send(api, "clinic-sb", "sms") for _ in range(4)]
        rows = [await delivery(api, m, {"sent"}) for m in ids]
        async with api.runtime.db.session() as session:
            row = await session.get(Delivery, rows[0].id)
            assert row is not None
            row.status = "bounced"
        got = await api.client.get(
            "/api/v1/clinics/clinic-sb/communication/stats", headers=api.admin
        )
        assert got.status_code == 200, got.text
        assert got.json()["bounceRate"] == {"twilio": 0.25}
        async with api.runtime.db.read() as session:
            since = datetime.now(UTC) - timedelta(hours=24)
            assert await bounce_rate(session, "clinic-sb", since) == got.json()["bounceRate"]
