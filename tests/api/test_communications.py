"""The send and status endpoints: auth per role, 422 paths, 404, idempotency, status and list."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from clinicomm.api.auth import Role
from clinicomm.delivery.worker import Worker, WorkerOptions
from tests.api.conftest import Api, create_clinic
from tests.support.http_capture import CaptureServer, Scripted


def sendgrid_settings(url: str) -> dict[str, Any]:
    return {
        "communicationSettings": {
            "email": {
                "primary": {
                    "provider": "sendgrid",
                    "credentials": {"apiKey": "SG.k", "fromEmail": "a@x.example", "baseUrl": url},
                }
            }
        }
    }


def body(clinic: str | None = "clinic-a", **kw: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "category": "APPOINTMENT",
        "title": "Appointment Confirmed",
        "body": "Your appointment is confirmed.",
        "recipients": [{"email": "patient@example.com", "phone": "+14155552671"}],
        "channels": ["email"],
        "metadata": {"clinicId": clinic, "appointmentId": "appt-456"},
    }
    data.update(kw)
    return data


@pytest.fixture
async def sink() -> Any:
    async with CaptureServer(Scripted(202, None, {"X-Message-Id": "sg-1"})) as server:
        yield server


@pytest.fixture
async def clinics(api: Api, sink: CaptureServer) -> None:
    await create_clinic(api, "clinic-a", sendgrid_settings(sink.url))
    await create_clinic(api, "clinic-b", sendgrid_settings(sink.url))


SEND_CELLS = [
    (Role.SUPER_ADMIN, None, {}, 202),
    (Role.CLINIC_ADMIN, "clinic-a", {}, 202),
    (Role.CLINIC_ADMIN, "clinic-b", {}, 403),
    (Role.CLINIC_MANAGER, "clinic-a", {}, 403),
    (Role.SERVICE, None, {}, 202),
    (Role.SERVICE, None, {"clinic_ids": ["clinic-a"]}, 202),
    (Role.SERVICE, None, {"clinic_ids": ["clinic-b"]}, 403),
    (Role.DOCTOR, "clinic-a", {}, 403),
    (Role.PATIENT, "clinic-a", {}, 403),
]


@pytest.mark.parametrize(("role", "clinic", "extra", "status"), SEND_CELLS)
async def test_send_permission_per_role(
    api: Api, clinics: None, role: Role, clinic: str | None, extra: dict[str, Any], status: int
) -> None:
    answer = await api.client.post(
        "/api/v1/communications", json=body(), headers=api.auth(role, clinic, **extra)
    )
    assert answer.status_code == status, answer.text
    if status == 202:
        data = answer.json()
        assert data["status"] == "queued"
        assert [(d["channel"], d["status"]) for d in data["deliveries"]] == [("email", "queued")]


async def test_send_without_token_or_with_a_bad_one(api: Api, clinics: None) -> None:
    assert (await api.client.post("/api/v1/communications", json=body())).status_code == 401
    bad = {"Authorization": "Bearer not-a-jwt"}
    assert (
        await api.client.post("/api/v1/communications", json=body(), headers=bad)
    ).status_code == 401


async def test_send_then_worker_then_status(api: Api, clinics: None, sink: CaptureServer) -> None:
    headers = api.auth(Role.SERVICE)
    answer = await api.client.post("/api/v1/communications", json=body(), headers=headers)
    assert answer.status_code == 202
    message_id = answer.json()["id"]
    stop = asyncio.Event()
    worker = Worker.for_runtime(api.runtime, WorkerOptions(poll_seconds=0.05))
    task = asyncio.create_task(worker.run(stop))
    try:
        for _ in range(200):
            status = await api.client.get(f"/api/v1/communications/{message_id}", headers=headers)
            if status.json()["deliveries"][0]["status"] == "sent":
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
    data = status.json()
    assert data["clinicId"] == "clinic-a" and data["status"] == "sent"
    (delivery,) = data["deliveries"]
    assert delivery["provider"] == "clinic:sendgrid" and delivery["providerMessageId"] == "sg-1"
    assert delivery["attempts"][0]["outcome"] == "sent"
    assert len(sink.requests) == 1
    # A clinic manager of the clinic may read it (view); of another clinic, not.
    mine = await api.client.get(
        f"/api/v1/communications/{message_id}", headers=api.auth(Role.CLINIC_MANAGER, "clinic-a")
    )
    assert mine.status_code == 200
    other = await api.client.get(
        f"/api/v1/communications/{message_id}", headers=api.auth(Role.CLINIC_MANAGER, "clinic-b")
    )
    assert other.status_code == 403
    listed = await api.client.get(
        "/api/v1/communications",
        params={"clinicId": "clinic-a"},
        headers=api.auth(Role.CLINIC_ADMIN, "clinic-a"),
    )
    assert [item["messageId"] for item in listed.json()["items"]] == [message_id]
    denied = await api.client.get(
        "/api/v1/communications",
        params={"clinicId": "clinic-b"},
        headers=api.auth(Role.CLINIC_ADMIN, "clinic-a"),
    )
    assert denied.status_code == 403
    own_only = await api.client.get(
        "/api/v1/communications", headers=api.auth(Role.CLINIC_ADMIN, "clinic-b")
    )
    assert own_only.json()["items"] == []


async def test_invalid_send_names_every_path(api: Api, clinics: None) -> None:
    bad = body(
        recipients=[{"email": "not-an-email", "phone": "4155552671"}, {"email": "ok@example.com"}],
        channels=["email", "pigeon"],
    )
    answer = await api.client.post("/api/v1/communications", json=bad, headers=api.admin)
    assert answer.status_code == 422
    paths = {d["path"] for d in answer.json()["error"]["details"]}
    assert paths == {"channels.1"}
    bad["channels"] = ["email", "sms"]
    answer = await api.client.post("/api/v1/communications", json=bad, headers=api.admin)
    assert answer.status_code == 422
    assert {d["path"] for d in answer.json()["error"]["details"]} == {
        "recipients.0.email",
        "recipients.0.phone",
    }


async def test_unknown_clinic_is_404(api: Api, clinics: None) -> None:
    answer = await api.client.post(
        "/api/v1/communications", json=body("no-such"), headers=api.admin
    )
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"
    missing = await api.client.get("/api/v1/communications/0000", headers=api.admin)
    assert missing.status_code == 404


async def test_idempotency_key_header(api: Api, clinics: None) -> None:
    headers = {**api.auth(Role.SERVICE), "Idempotency-Key": "order-1"}
    first = await api.client.post("/api/v1/communications", json=body(), headers=headers)
    again = await api.client.post("/api/v1/communications", json=body(), headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    other = await api.client.post(
        "/api/v1/communications", json=body(title="Changed"), headers=headers
    )
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_conflict"
