"""One provider call for many deliveries, end to end through the worker (issue 20).

Real parts: the test database, the in-process worker, local HTTP servers answering as SendGrid
and Postmark. Each delivery must still end with its own status, provider message id and attempt
row. The grouping must not depend on the machine's load: the coalescing window is made long
and each test sets the provider's `max_batch` to its delivery count, so the group goes out the
moment its last delivery arrives, in one call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from clinicomm import SendRequest
from clinicomm.delivery.batching import COALESCER
from clinicomm.providers.email.postmark import PostmarkAdapter
from clinicomm.providers.email.sendgrid import SendGridAdapter
from tests.support.http_capture import CapturedRequest, CaptureServer, Scripted
from tests.support.pipeline import create_clinic, wait_terminal
from tests.support.specs import assert_valid

BIG = {"worker_batch_size": 500, "worker_concurrency": 1000}


@pytest.fixture(autouse=True)
def wide_window() -> Iterator[None]:
    window = COALESCER.window
    COALESCER.window = 60.0
    yield
    COALESCER.window = window


def many_recipients(clinic_id: str, count: int) -> SendRequest:
    return SendRequest.model_validate(
        {
            "category": "REMINDER",
            # Normal, not bulk: bulk in flight is capped at 25 % of the worker's concurrency
            # (#18), which would split the group; batching itself does not depend on priority.
            "priority": "normal",
            "title": "Your appointment tomorrow",
            "body": "See you tomorrow at 10:30.",
            "recipients": [{"email": f"patient{i}@example.com"} for i in range(count)],
            "channels": ["email"],
            "metadata": {"clinicId": clinic_id},
        }
    )


def sendgrid_slot(server: CaptureServer) -> dict[str, Any]:
    return {
        "primary": {
            "provider": "sendgrid",
            "credentials": {
                "apiKey": "SG.test",
                "fromEmail": "hello@clinic.example",
                "baseUrl": server.url,
            },
        }
    }


async def test_a_500_recipient_message_is_one_sendgrid_call_with_500_deliveries(
    make_client: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(SendGridAdapter, "max_batch", 500)
    async with CaptureServer(Scripted(202, None, {"X-Message-Id": "sg-one"})) as server:
        client = await make_client(**BIG)
        await create_clinic(client, "clinic-sg500", {"email": sendgrid_slot(server)})
        accepted = await client.send(many_recipients("clinic-sg500", 500))
        status = await wait_terminal(client, accepted.id, timeout=60)
    assert len(server.requests) == 1
    request = server.requests[0]
    assert_valid("sendgrid", request, host_url="https://api.sendgrid.com")
    personalizations = request.json()["personalizations"]
    assert len(personalizations) == 500
    refs = {p["custom_args"]["ref"] for p in personalizations}
    deliveries = status["deliveries"]
    assert refs == {d["id"] for d in deliveries}
    assert {p["to"][0]["email"] for p in personalizations} == {
        f"patient{i}@example.com" for i in range(500)
    }
    for delivery in deliveries:
        assert delivery["status"] == "sent"
        assert delivery["providerMessageId"] == "sg-one"
        assert [(a["provider"], a["outcome"]) for a in delivery["attempts"]] == [
            ("clinic:sendgrid", "sent")
        ]


async def test_a_postmark_batch_answer_with_two_failed_items_fails_those_two_only(
    make_client: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PostmarkAdapter, "max_batch", 10)
    bad = {"patient2@example.com", "patient7@example.com"}

    def answer(request: CapturedRequest) -> Scripted:
        body = request.json()
        items = body if isinstance(body, list) else [body]
        entries = []
        for n, item in enumerate(items):
            if item["To"] in bad:
                entries.append({"ErrorCode": 406, "Message": "Recipient marked as inactive."})
            else:
                entries.append(
                    {"To": item["To"], "MessageID": f"pm-{n}", "ErrorCode": 0, "Message": "OK"}
                )
        return Scripted(200, entries if isinstance(body, list) else entries[0])

    async with CaptureServer() as server:
        server.handler = answer
        client = await make_client(**BIG)
        slot = {
            "provider": "postmark",
            "credentials": {
                "serverToken": "pm-test",
                "fromEmail": "hello@clinic.example",
                "baseUrl": server.url,
            },
        }
        await create_clinic(client, "clinic-pm", {"email": {"primary": slot}})
        accepted = await client.send(many_recipients("clinic-pm", 10))
        status = await wait_terminal(client, accepted.id, timeout=30)
    assert [r.path for r in server.requests] == ["/email/batch"]
    assert_valid("postmark", server.requests[0], host_url="https://api.postmarkapp.com")
    assert len(server.requests[0].json()) == 10
    by_status: dict[str, int] = {}
    ids = set()
    for delivery in status["deliveries"]:
        by_status[delivery["status"]] = by_status.get(delivery["status"], 0) + 1
        assert len(delivery["attempts"]) == 1
        if delivery["status"] == "sent":
            ids.add(delivery["providerMessageId"])
        else:
            assert delivery["error"]["reason"] == "recipient"
            assert delivery["attempts"][0]["errorClass"] == "recipient"
    assert by_status == {"sent": 8, "failed": 2}
    assert len(ids) == 8  # each its own Postmark MessageID
