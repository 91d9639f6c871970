"""Issue 6, channel fallback over HTTP: WhatsApp fails for provider reasons, the same number gets
an SMS, and `GET /api/v1/communications/{id}` shows both deliveries, the link and the reasons.

The clinic is created through the API, the message sent through the API, and an in-process
worker (`Worker.for_runtime`) sends it to local servers speaking Meta's and Twilio's APIs.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from clinicomm.api.auth import Role
from clinicomm.delivery.window import record_inbound
from clinicomm.delivery.worker import Worker, WorkerOptions
from tests.api.conftest import Api, create_clinic
from tests.conftest import canary
from tests.support.http_capture import CaptureServer, Scripted
from tests.support.pipeline import TERMINAL

PATIENT = "+14155552671"


def settings(meta: CaptureServer, twilio: CaptureServer) -> dict[str, Any]:
    return {
        "communicationSettings": {
            "whatsapp": {
                "primary": {
                    "provider": "meta_business",
                    "credentials": {
                        "apiUrl": f"{meta.url}/v23.0",
                        "apiKey": canary("meta-token"),
                        "phoneNumberId": "1234",
                    },
                },
                "fallbackStrategy": {"fallbackProvider": "sms", "retryAttempts": 0},
            },
            "sms": {
                "primary": {
                    "provider": "twilio",
                    "credentials": {
                        "accountSid": "AC" + "0" * 32,
                        "authToken": canary("twilio-token"),
                        "fromNumber": "+14155550000",
                        "baseUrl": twilio.url,
                    },
                }
            },
        }
    }


async def test_get_shows_both_deliveries_the_link_and_why(api: Api) -> None:
    async with CaptureServer(
        Scripted(503, {"error": {"code": 2, "message": "Service temporarily unavailable"}})
    ) as meta, CaptureServer(Scripted(201, {"sid": "SM" + "1" * 32, "status": "queued"})) as twilio:
        await create_clinic(api, "clinic-fb", settings(meta, twilio))
        # The patient wrote a minute ago: free-form WhatsApp text is allowed (24-hour window).
        index = await api.runtime.keys.index_for(api.runtime.db, "clinic-fb", PATIENT)
        async with api.runtime.db.session() as session:
            await record_inbound(
                session, "clinic-fb", "whatsapp", index, datetime.now(UTC) - timedelta(minutes=1)
            )
        headers = api.auth(Role.SERVICE)
        answer = await api.client.post(
            "/api/v1/communications",
            json={
                "category": "APPOINTMENT",
                "body": "Your appointment is at 10:30.",
                "recipients": [{"phone": PATIENT}],
                "channels": ["whatsapp"],
                "metadata": {"clinicId": "clinic-fb"},
            },
            headers=headers,
        )
        assert answer.status_code == 202, answer.text
        message_id = answer.json()["id"]
        stop = asyncio.Event()
        worker = Worker.for_runtime(api.runtime, WorkerOptions(poll_seconds=0.05))
        task = asyncio.create_task(worker.run(stop))
        try:
            for _ in range(300):
                got = await api.client.get(f"/api/v1/communications/{message_id}", headers=headers)
                deliveries = got.json()["deliveries"]
                if len(deliveries) == 2 and all(d["status"] in TERMINAL for d in deliveries):
                    break
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await task
    assert got.status_code == 200
    data = got.json()
    # One delivery failed and one was sent: the message as a whole is partial.
    assert data["status"] == "partial"
    wa, sms = sorted(data["deliveries"], key=lambda d: d["channel"] != "whatsapp")
    assert wa["channel"] == "whatsapp" and wa["status"] == "failed"
    assert wa["parentId"] is None
    assert wa["error"]["reason"] == "every provider failed; falling back to sms"
    assert wa["error"]["fallbackId"] == sms["id"]
    (why,) = wa["error"]["errors"]
    assert why["provider"] == "clinic:meta_business" and why["class"] == "transient"
    assert why["statusCode"] == 503 and why["code"] == "2"
    assert [(a["provider"], a["outcome"], a["errorClass"]) for a in wa["attempts"]] == [
        ("clinic:meta_business", "failed", "transient")
    ]
    assert sms["channel"] == "sms" and sms["status"] == "sent"
    assert sms["parentId"] == wa["id"] and sms["recipient"] == PATIENT
    assert sms["provider"] == "clinic:twilio" and sms["providerMessageId"] == "SM" + "1" * 32
    assert [(a["provider"], a["outcome"]) for a in sms["attempts"]] == [("clinic:twilio", "sent")]
    assert len(meta.requests) == 1 and len(twilio.requests) == 1
    # The listing shows both as well, each with its message id.
    listed = await api.client.get(
        "/api/v1/communications", params={"clinicId": "clinic-fb"}, headers=headers
    )
    assert {(i["channel"], i["parentId"]) for i in listed.json()["items"]} == {
        ("whatsapp", None),
        ("sms", wa["id"]),
    }

async def _send_and_wait(api: Api, clinic: str) -> dict[str, Any]:
    headers = api.auth(Role.SERVICE)
    answer = await api.client.post(
        "/api/v1/communications",
        json={
            "category": "APPOINTMENT",
            "body": "Your appointment is at 10:30.",
            "recipients": [{"phone": PATIENT}],
            "channels": ["whatsapp"],
            "metadata": {"clinicId": clinic},
        },
        headers=headers,
    )
    assert answer.status_code == 202, answer.text
    stop = asyncio.Event()
    task = asyncio.create_task(
        Worker.for_runtime(api.runtime, WorkerOptions(poll_seconds=0.05)).run(stop)
    )
    try:
        for _ in range(300):
            got = await api.client.get(
                f"/api/v1/communications/{answer.json()['id']}", headers=headers
            )
            data: dict[str, Any] = got.json()
            if len(data["deliveries"]) == 2 and all(
                d["status"] in TERMINAL for d in data["deliveries"]
            ):
                return data
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
    raise AssertionError(f"not terminal: {data}")


async def test_get_shows_why_not_on_whatsapp_became_an_sms(api: Api) -> None:
    async with (
        CaptureServer(
            Scripted(400, {"error": {"code": 131026, "message": "Message undeliverable"}})
        ) as meta,
        CaptureServer(Scripted(201, {"sid": "SM" + "9" * 32, "status": "queued"})) as twilio,
    ):
        await create_clinic(api, "clinic-nw", settings(meta, twilio))
        index = await api.runtime.keys.index_for(api.runtime.db, "clinic-nw", PATIENT)
        async with api.runtime.db.session() as session:
            at = datetime.now(UTC) - timedelta(minutes=1)
            await record_inbound(session, "clinic-nw", "whatsapp", index, at)
        data = await _send_and_wait(api, "clinic-nw")
    wa, sms = sorted(data["deliveries"], key=lambda d: d["channel"] != "whatsapp")
    assert wa["status"] == "failed" and wa["provider"] == "clinic:meta_business"
    assert wa["error"]["fallbackReason"] == "not_on_channel"
    assert wa["error"]["reason"] == (
        "the recipient cannot be reached on this channel; falling back to sms"
    )
    (why,) = wa["error"]["errors"]
    assert why["class"] == "recipient" and why["code"] == "131026"
    assert sms["status"] == "sent" and sms["parentId"] == wa["id"]


async def test_get_shows_why_a_closed_window_became_an_sms(api: Api) -> None:
    async with (
        CaptureServer() as meta,
        CaptureServer(Scripted(201, {"sid": "SM" + "8" * 32, "status": "queued"})) as twilio,
    ):
        await create_clinic(api, "clinic-cw", settings(meta, twilio))
        data = await _send_and_wait(api, "clinic-cw")  # the patient never wrote: closed
    wa, sms = sorted(data["deliveries"], key=lambda d: d["channel"] != "whatsapp")
    assert wa["error"]["fallbackReason"] == "template_required"
    assert wa["error"]["reason"] == "template required; falling back to sms"
    assert wa["attempts"] == [] and meta.requests == []
    assert sms["status"] == "sent" and sms["parentId"] == wa["id"]
