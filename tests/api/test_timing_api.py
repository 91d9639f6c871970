"""The HTTP side of priority, expiry, scheduling and cancel: 422 paths, answers, permissions."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from clinicomm.api.auth import Role
from clinicomm.delivery.worker import Worker, WorkerOptions
from tests.api.conftest import Api, create_clinic
from tests.api.test_communications import body, sendgrid_settings
from tests.support.http_capture import CaptureServer, Scripted

URL = "/api/v1/communications"


@pytest.fixture
async def sink() -> Any:
    async with CaptureServer(Scripted(202, None, {"X-Message-Id": "sg-1"})) as server:
        yield server


@pytest.fixture
async def clinics(api: Api, sink: CaptureServer) -> None:
    await create_clinic(api, "clinic-a", sendgrid_settings(sink.url))
    await create_clinic(api, "clinic-b", sendgrid_settings(sink.url))


def ahead(**kw: float) -> str:
    return (datetime.now(UTC) + timedelta(**kw)).isoformat()


@pytest.mark.parametrize(
    ("extra", "path"),
    [
        ({"sendAt": ahead(minutes=-5)}, "sendAt"),
        ({"sendAt": ahead(days=91)}, "sendAt"),
        ({"sendAt": "2030-01-01T10:00:00"}, "sendAt"),  # no offset
        ({"sendAt": "tomorrow"}, "sendAt"),
        ({"expiresAt": ahead(minutes=-1)}, "expiresAt"),
        ({"expiresAt": ahead(minutes=5), "ttlSeconds": 60}, "ttlSeconds"),
        ({"ttlSeconds": 0}, "ttlSeconds"),
        ({"priority": "asap"}, "priority"),
        ({"sendAt": ahead(hours=2), "expiresAt": ahead(hours=1)}, "expiresAt"),
    ],
)
async def test_bad_times_are_422_with_the_path(
    api: Api, clinics: None, extra: dict[str, Any], path: str
) -> None:
    answer = await api.client.post(URL, json=body(**extra), headers=api.auth(Role.SERVICE))
    assert answer.status_code == 422, answer.text
    paths = [d["path"] for d in answer.json()["error"]["details"]]
    assert any(p == path or p.endswith(f".{path}") for p in paths), paths


async def test_the_answer_shows_priority_schedule_and_expiry(api: Api, clinics: None) -> None:
    send_at = ahead(hours=1)
    answer = await api.client.post(
        URL,
        json=body(category="OTP", sendAt=send_at, ttlSeconds=300),
        headers=api.auth(Role.SERVICE),
    )
    assert answer.status_code == 202, answer.text
    data = answer.json()
    assert data["priority"] == "urgent"
    assert datetime.fromisoformat(data["sendAt"]) == datetime.fromisoformat(send_at)
    assert datetime.fromisoformat(data["expiresAt"]) == datetime.fromisoformat(send_at) + timedelta(
        seconds=300
    )
    status = (await api.client.get(f"{URL}/{data['id']}", headers=api.auth(Role.SERVICE))).json()
    (delivery,) = status["deliveries"]
    assert delivery["status"] == "queued" and delivery["priority"] == "urgent"
    assert datetime.fromisoformat(delivery["notBefore"]) == datetime.fromisoformat(send_at)
    default = await api.client.post(
        URL, json=body(category="NEWSLETTER"), headers=api.auth(Role.SERVICE)
    )
    assert default.json()["priority"] == "bulk" and default.json()["expiresAt"] is None


@pytest.mark.parametrize("extra", [{"sendAt": ahead(hours=1), "ttlSeconds": 300}, {}])
async def test_the_answer_is_exactly_the_send_accepted_model(
    api: Api, clinics: None, extra: dict[str, Any]
) -> None:
    """The accept builds its answer as JSON data, not through the model: it is what
    `SendAccepted` dumps, for a scheduled message and one with a delivery that failed at
    accept (no phone number for sms), on the single send, the library call and the batch."""
    from clinicomm.messaging.models import SendAccepted, SendRequest

    request = body(
        channels=["email", "sms"], recipients=[{"email": "patient@example.com"}], **extra
    )
    answer = await api.client.post(URL, json=request, headers=api.auth(Role.SERVICE))
    assert answer.status_code == 202, answer.text
    data = answer.json()
    assert [d["status"] for d in data["deliveries"]] == ["queued", "failed"]
    assert SendAccepted.model_validate(data).model_dump(mode="json", by_alias=True) == data
    library = await api.runtime.messaging.accept(SendRequest.model_validate(request))
    assert set(library.model_dump(by_alias=True)) == set(data)
    batch = await api.client.post(
        f"{URL}/batch", json={"items": [request]}, headers=api.auth(Role.SERVICE)
    )
    (item,) = batch.json()["items"]
    assert set(item) == {"index", "status", "id", "deliveries"}
    assert [d["error"] for d in item["deliveries"]] == [d["error"] for d in data["deliveries"]]


async def test_cancel_needs_send_permission_and_reports_what_was_sent(
    api: Api, clinics: None, sink: CaptureServer
) -> None:
    service = api.auth(Role.SERVICE)
    now_one = (await api.client.post(URL, json=body(), headers=service)).json()
    stop = asyncio.Event()
    worker = Worker.for_runtime(api.runtime, WorkerOptions(poll_seconds=0.05))
    task = asyncio.create_task(worker.run(stop))
    try:
        for _ in range(200):
            got = (await api.client.get(f"{URL}/{now_one['id']}", headers=service)).json()
            if got["deliveries"][0]["status"] == "sent":
                break
            await asyncio.sleep(0.05)
        later = (
            await api.client.post(
                URL,
                json=body(
                    sendAt=ahead(seconds=2),
                    recipients=[{"email": "a@example.com"}, {"email": "b@example.com"}],
                ),
                headers=service,
            )
        ).json()
        # Who may cancel: the send permission for the message's clinic.
        for role, clinic, code in (
            (Role.CLINIC_MANAGER, "clinic-a", 403),  # view only
            (Role.DOCTOR, "clinic-a", 403),
            (Role.CLINIC_ADMIN, "clinic-b", 403),
        ):
            denied = await api.client.post(
                f"{URL}/{later['id']}/cancel", headers=api.auth(role, clinic)
            )
            assert denied.status_code == code, (role, denied.text)
        missing = await api.client.post(f"{URL}/nope/cancel", headers=service)
        assert missing.status_code == 404
        answer = await api.client.post(
            f"{URL}/{later['id']}/cancel", headers=api.auth(Role.CLINIC_ADMIN, "clinic-a")
        )
        assert answer.status_code == 200, answer.text
        data = answer.json()
        assert [d["status"] for d in data["deliveries"]] == ["cancelled", "cancelled"]
        assert data["status"] == "cancelled"
        assert data["deliveries"][0]["error"]["reason"].startswith("cancelled")
        # A message already sent: cancel changes nothing and says so.
        sent = await api.client.post(f"{URL}/{now_one['id']}/cancel", headers=service)
        assert sent.status_code == 200
        assert [d["status"] for d in sent.json()["deliveries"]] == ["sent"]
        await asyncio.sleep(2.5)  # past sendAt: nothing goes out
    finally:
        stop.set()
        await task
    assert len(sink.requests) == 1
    listed = await api.client.get(URL, params={"status": "cancelled"}, headers=service)
    assert len(listed.json()["items"]) == 2


async def test_quiet_hours_hold_non_urgent_sms_at_acceptance_and_urgent_passes(
    api: Api, sink: CaptureServer
) -> None:
    now = datetime.now(UTC)
    start, end = now - timedelta(hours=1), now + timedelta(hours=1)
    sms = {
        "primary": {
            "provider": "twilio",
            "credentials": {
                "accountSid": "AC" + "0" * 32,
                "authToken": "tok",
                "fromNumber": "+14155550000",
                "baseUrl": sink.url,
            },
        },
        "quietHours": {
            "start": start.strftime("%H:%M"),
            "end": end.strftime("%H:%M"),
            "timeZone": "UTC",
            "spreadMinutes": 10,
        },
    }
    await create_clinic(api, "clinic-q", {"communicationSettings": {"sms": sms}})
    service = api.auth(Role.SERVICE)
    reminder = await api.client.post(
        URL, json=body("clinic-q", category="MARKETING", channels=["sms"]), headers=service
    )
    assert reminder.status_code == 202, reminder.text
    (held,) = reminder.json()["deliveries"]
    until = datetime.fromisoformat(held["notBefore"])
    window_end = end.replace(second=0, microsecond=0)
    assert window_end <= until < window_end + timedelta(minutes=10)
    shown = (await api.client.get(f"{URL}/{reminder.json()['id']}", headers=service)).json()
    assert shown["deliveries"][0]["status"] == "queued"
    assert datetime.fromisoformat(shown["deliveries"][0]["notBefore"]) == until
    otp = await api.client.post(
        URL, json=body("clinic-q", category="OTP", channels=["sms"]), headers=service
    )
    assert otp.json()["deliveries"][0]["notBefore"] is None
    bad = dict(sms, quietHours={"start": "21:00", "end": "08:00", "timeZone": "Nowhere/City"})
    answer = await api.client.put(
        "/api/v1/clinics/clinic-q",
        json={"name": "clinic-q", "settings": {"communicationSettings": {"sms": bad}}},
        headers={**api.admin, "If-Match": '"1"'},
    )
    assert answer.status_code == 422, answer.text
    paths = [d["path"] for d in answer.json()["error"]["details"]]
    assert "settings.communicationSettings.sms.quietHours.timeZone" in paths, paths


async def test_a_replay_after_send_at_passed_answers_the_first_answer(
    api: Api, clinics: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clinicomm.messaging.service as service_module

    headers = {**api.auth(Role.SERVICE), "Idempotency-Key": "sched-1"}
    payload = body(sendAt=ahead(seconds=30))
    first = await api.client.post(URL, json=payload, headers=headers)
    assert first.status_code == 202
    later = datetime.now(UTC) + timedelta(minutes=5)  # sendAt is now in the past
    monkeypatch.setattr(service_module, "utcnow", lambda: later)
    replay = await api.client.post(URL, json=payload, headers=headers)
    assert replay.status_code == 202, replay.text
    assert replay.json()["id"] == first.json()["id"]
    fresh = await api.client.post(URL, json=payload, headers=api.auth(Role.SERVICE))
    assert fresh.status_code == 422  # without the key it is a new request, in the past
