"""`POST /api/v1/communications/batch`: per-item answers with paths, idempotency per item, one
transaction, permission and clinic scope per item, the body limit, and one provider call for a
batch of reminders."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select, text

from clinicomm.api.auth import Role
from clinicomm.delivery.batching import COALESCER
from clinicomm.delivery.worker import Worker, WorkerOptions
from clinicomm.providers.email.sendgrid import SendGridAdapter
from clinicomm.store.models import Delivery, IdempotencyKey, Message
from tests.api.conftest import Api, create_clinic
from tests.api.test_communications import body, sendgrid_settings
from tests.support.http_capture import CaptureServer, Scripted
from tests.support.specs import assert_valid

URL = "/api/v1/communications/batch"


@pytest.fixture
async def sink() -> Any:
    async with CaptureServer(Scripted(202, None, {"X-Message-Id": "sg-b"})) as server:
        yield server


@pytest.fixture
async def clinics(api: Api, sink: CaptureServer) -> None:
    await create_clinic(api, "clinic-a", sendgrid_settings(sink.url))
    await create_clinic(api, "clinic-b", sendgrid_settings(sink.url))


async def counts(api: Api) -> tuple[int, int, int]:
    async with api.runtime.db.read() as session:
        messages = await session.scalar(select(func.count()).select_from(Message))
        deliveries = await session.scalar(select(func.count()).select_from(Delivery))
        keys = await session.scalar(select(func.count()).select_from(IdempotencyKey))
    return int(messages or 0), int(deliveries or 0), int(keys or 0)


async def test_every_item_accepted_answers_202_with_ids(api: Api, clinics: None) -> None:
    items = [body(recipients=[{"email": f"p{i}@example.com"}]) for i in range(3)]
    answer = await api.client.post(URL, json={"items": items}, headers=api.auth(Role.SERVICE))
    assert answer.status_code == 202, answer.text
    data = answer.json()
    assert data["accepted"] == 3 and data["refused"] == 0
    assert [item["index"] for item in data["items"]] == [0, 1, 2]
    for item in data["items"]:
        assert item["status"] == 202 and item["id"]
        assert [d["status"] for d in item["deliveries"]] == ["queued"]
        status = await api.client.get(f"/api/v1/communications/{item['id']}", headers=api.admin)
        assert status.status_code == 200
    assert (await counts(api))[:2] == (3, 3)


async def test_invalid_items_are_refused_alone_with_their_paths(api: Api, clinics: None) -> None:
    items = [
        body(),
        body(recipients=[{"email": "not-an-email"}]),
        body(channels=["pigeon"]),
        "not an object",
        body("no-such-clinic"),
        body(recipients=[{"email": "ok@example.com", "phone": "4155552671"}], channels=["sms"]),
    ]
    answer = await api.client.post(URL, json={"items": items}, headers=api.admin)
    assert answer.status_code == 207, answer.text
    data = answer.json()
    assert (data["accepted"], data["refused"]) == (1, 5)
    by_index = {item["index"]: item for item in data["items"]}
    assert by_index[0]["status"] == 202
    paths = {i: [d["path"] for d in by_index[i]["error"]["details"]] for i in (1, 2, 3, 5)}
    assert paths == {
        1: ["items.1.recipients.0.email"],
        2: ["items.2.channels.0"],
        3: ["items.3"],
        5: ["items.5.recipients.0.phone"],
    }
    assert all(by_index[i]["status"] == 422 for i in (1, 2, 3, 5))
    assert by_index[4]["status"] == 404 and by_index[4]["error"]["code"] == "not_found"
    assert (await counts(api))[:2] == (1, 1)


async def test_the_batch_shape_itself_is_checked(api: Api, clinics: None) -> None:
    for payload, path in [
        ({}, "items"),
        ({"items": []}, "items"),
        ({"items": [body()] * 501}, "items"),
        ({"items": [body()], "other": 1}, "other"),
        ([body()], "items"),
    ]:
        answer = await api.client.post(URL, json=payload, headers=api.admin)
        assert answer.status_code == 422, (payload if len(str(payload)) < 200 else path)
        assert [d["path"] for d in answer.json()["error"]["details"]] == [path]
    assert (await counts(api))[:2] == (0, 0)


async def test_permission_and_clinic_scope_per_item(api: Api, clinics: None) -> None:
    items = [body("clinic-a"), body("clinic-b"), body(None), body("clinic-a")]
    headers = api.auth(Role.SERVICE, clinic_ids=["clinic-a"])
    answer = await api.client.post(URL, json={"items": items}, headers=headers)
    assert answer.status_code == 207
    statuses = [item["status"] for item in answer.json()["items"]]
    assert statuses == [202, 403, 403, 202]
    assert answer.json()["items"][1]["error"]["code"] == "forbidden"
    admin_a = await api.client.post(
        URL, json={"items": items}, headers=api.auth(Role.CLINIC_ADMIN, "clinic-a")
    )
    assert [item["status"] for item in admin_a.json()["items"]] == [202, 403, 403, 202]
    doctor = await api.client.post(
        URL, json={"items": items}, headers=api.auth(Role.DOCTOR, "clinic-a")
    )
    assert [item["status"] for item in doctor.json()["items"]] == [403] * 4
    assert (await api.client.post(URL, json={"items": items})).status_code == 401
    assert (await counts(api))[:2] == (4, 4)


async def test_idempotency_per_item(api: Api, clinics: None) -> None:
    headers = api.auth(Role.SERVICE)
    items = [
        {**body(recipients=[{"email": "a@example.com"}]), "idempotencyKey": "rem-1"},
        {**body(recipients=[{"email": "b@example.com"}]), "idempotencyKey": "rem-2"},
        body(recipients=[{"email": "c@example.com"}]),
    ]
    first = await api.client.post(URL, json={"items": items}, headers=headers)
    assert first.status_code == 202
    assert (await counts(api)) == (3, 3, 2)
    changed = {**items[1], "title": "Changed"}
    again = await api.client.post(
        URL, json={"items": [items[0], changed, items[2]]}, headers=headers
    )
    assert again.status_code == 207
    one, two, three = again.json()["items"]
    assert one == first.json()["items"][0]  # the first answer again, nothing written twice
    assert two["status"] == 409 and two["error"]["code"] == "idempotency_conflict"
    assert three["status"] == 202 and three["id"] != first.json()["items"][2]["id"]
    assert (await counts(api)) == (4, 4, 2)
    # The same key twice in one batch: one message, both items answer it.
    twice = [{**body(), "idempotencyKey": "rem-3"}] * 2
    both = await api.client.post(URL, json={"items": twice}, headers=headers)
    assert both.status_code == 202
    a, b = both.json()["items"]
    assert a["id"] == b["id"]
    # A single send with the same key and payload answers the batch's first answer.
    single = await api.client.post(
        "/api/v1/communications",
        json=body(recipients=[{"email": "a@example.com"}]),
        headers={**headers, "Idempotency-Key": "rem-1"},
    )
    assert single.status_code == 202 and single.json()["id"] == one["id"]
    assert (await counts(api)) == (5, 5, 3)


#: A trigger that fails the insert of the 11th delivery row: mid-batch, after messages, keys
#: and 10 deliveries were written. On PostgreSQL it fails as a lost connection does (SQLSTATE
#: 08006, answered 503); SQLite's RAISE is a constraint (409).
_FAIL_MID_BATCH = {
    "sqlite": [
        "CREATE TRIGGER fail_mid_batch BEFORE INSERT ON deliveries"
        " WHEN (SELECT count(*) FROM deliveries) >= 10"
        " BEGIN SELECT RAISE(ABORT, 'failed mid-batch'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION fail_mid_batch() RETURNS trigger LANGUAGE plpgsql VOLATILE AS $$"
        " BEGIN IF (SELECT count(*) FROM deliveries) >= 10 THEN"
        " RAISE EXCEPTION 'failed mid-batch' USING ERRCODE = 'connection_failure'; END IF;"
        " RETURN NEW; END $$",
        "CREATE TRIGGER fail_mid_batch BEFORE INSERT ON deliveries"
        " FOR EACH ROW EXECUTE FUNCTION fail_mid_batch()",
    ],
}
_DROP = {
    "sqlite": ["DROP TRIGGER IF EXISTS fail_mid_batch"],
    "postgresql": [
        "DROP TRIGGER IF EXISTS fail_mid_batch ON deliveries",
        "DROP FUNCTION IF EXISTS fail_mid_batch()",
    ],
}


async def _run(api: Api, statements: list[str]) -> None:
    async with api.runtime.db.session() as session:
        for statement in statements:
            await session.execute(text(statement))


async def test_one_transaction_a_failure_mid_batch_leaves_nothing(api: Api, clinics: None) -> None:
    dialect = api.runtime.db.engine.dialect.name
    items = [
        {**body(recipients=[{"email": f"p{i}@example.com"}]), "idempotencyKey": f"k{i}"}
        for i in range(20)
    ]
    await _run(api, _FAIL_MID_BATCH[dialect])
    try:
        answer = await api.client.post(URL, json={"items": items}, headers=api.admin)
    finally:
        await _run(api, _DROP[dialect])
    assert answer.status_code == (503 if dialect == "postgresql" else 409), answer.text
    assert await counts(api) == (0, 0, 0)
    retried = await api.client.post(URL, json={"items": items}, headers=api.admin)
    assert retried.status_code == 202
    assert await counts(api) == (20, 20, 20)


async def test_body_limit(api: Api, clinics: None) -> None:
    limit = api.settings.max_body_bytes
    text = "x" * 5000
    items = [body(body=text) for _ in range(limit // 5000 + 10)][:500]
    assert len(items) <= 500
    answer = await api.client.post(URL, json={"items": items}, headers=api.admin)
    assert answer.status_code == 413
    assert answer.json()["error"]["code"]
    assert (await counts(api))[:2] == (0, 0)


@pytest.fixture
def wide_window(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A long window, and the group goes out when its 500th delivery arrives: one call
    whatever the machine's load."""
    monkeypatch.setattr(SendGridAdapter, "max_batch", 500)
    window = COALESCER.window
    COALESCER.window = 60.0
    yield
    COALESCER.window = window


async def test_a_batch_of_500_reminders_is_one_sendgrid_call_with_each_ones_variables(
    api: Api, clinics: None, sink: CaptureServer, wide_window: None
) -> None:
    items = [
        {
            "category": "REMINDER",
            "recipients": [{"email": f"patient{i}@example.com"}],
            "channels": ["email"],
            "template": {"name": "d-reminder", "variables": {"time": f"{i % 24:02d}:30"}},
            "metadata": {"clinicId": "clinic-a", "appointmentId": f"appt-{i}"},
            "idempotencyKey": f"reminder-{i}",
        }
        for i in range(500)
    ]
    answer = await api.client.post(URL, json={"items": items}, headers=api.auth(Role.SERVICE))
    assert answer.status_code == 202, answer.text[:500]
    ids = [item["deliveries"][0]["id"] for item in answer.json()["items"]]
    stop = asyncio.Event()
    # Reminders are bulk: lift #18's bulk in-flight cap (50 % of concurrency), so the one
    # group of 500 is never split by it, whatever the default.
    options = WorkerOptions(
        poll_seconds=0.05, batch_size=500, concurrency=1000, bulk_concurrency_share=1.0
    )
    task = asyncio.create_task(Worker.for_runtime(api.runtime, options).run(stop))
    try:
        for _ in range(600):
            async with api.runtime.db.read() as session:
                sent = await session.scalar(
                    select(func.count()).select_from(Delivery).where(Delivery.status == "sent")
                )
            if sent == 500:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
    assert len(sink.requests) == 1
    request = sink.requests[0]
    assert_valid("sendgrid", request, host_url="https://api.sendgrid.com")
    sent_body = request.json()
    assert sent_body["template_id"] == "d-reminder"
    variables = {
        p["custom_args"]["ref"]: (p["to"][0]["email"], p["dynamic_template_data"])
        for p in sent_body["personalizations"]
    }
    assert set(variables) == set(ids)
    for i, delivery_id in enumerate(ids):
        assert variables[delivery_id] == (f"patient{i}@example.com", {"time": f"{i % 24:02d}:30"})
    status = await api.client.get(
        f"/api/v1/communications/{answer.json()['items'][7]['id']}", headers=api.admin
    )
    (delivery,) = status.json()["deliveries"]
    assert delivery["status"] == "sent" and delivery["providerMessageId"] == "sg-b"
    assert [a["outcome"] for a in delivery["attempts"]] == ["sent"]


async def test_a_number_beyond_64_bits_is_a_422_not_a_500(api: Api, clinics: None) -> None:
    huge = body(metadata={"clinicId": "clinic-a", "n": 2**70})
    answer = await api.client.post(URL, json={"items": [huge, body()]}, headers=api.admin)
    assert answer.status_code == 207
    first, second = answer.json()["items"]
    assert first["status"] == 422 and first["error"]["details"][0]["path"] == "items.0.metadata"
    assert second["status"] == 202
    single = await api.client.post("/api/v1/communications", json=huge, headers=api.admin)
    assert single.status_code == 422
