"""The whole path of a message: accept → store → worker → provider chain → status.

Real parts only: aiosmtpd servers for SMTP, a local HTTP server speaking SendGrid's API, the
test database (SQLite, or PostgreSQL + Redis in that leg).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from clinicomm import SendRequest
from clinicomm.messaging.service import IdempotencyConflictError, UnknownClinicError
from tests.support.http_capture import CaptureServer
from tests.support.pipeline import create_clinic, wait_terminal
from tests.support.smtp_server import SmtpServer, free_port


def email_request(clinic_id: str | None, to: str = "patient@example.com", **kw: Any) -> SendRequest:
    data: dict[str, Any] = {
        "category": "APPOINTMENT",
        "title": "Appointment Confirmed",
        "body": "Your appointment is at 10:30.",
        "recipients": [{"email": to}],
        "channels": ["email"],
        "metadata": {"clinicId": clinic_id, "appointmentId": "appt-456"},
    }
    data.update(kw)
    return SendRequest.model_validate(data)


def smtp_slot(server: SmtpServer, sender: str) -> dict[str, Any]:
    return {"provider": "smtp", "credentials": server.credentials(sender)}


def sendgrid_slot(server: CaptureServer) -> dict[str, Any]:
    return {
        "provider": "sendgrid",
        "credentials": {
            "apiKey": "SG.test",
            "fromEmail": "hello@clinic.example",
            "baseUrl": server.url,
        },
    }


async def test_each_clinic_uses_its_own_smtp_and_the_third_the_global(make_client) -> None:
    with SmtpServer() as smtp_a, SmtpServer() as smtp_b, SmtpServer() as smtp_global:
        env = {
            "EMAIL_HOST": "127.0.0.1",
            "EMAIL_PORT": str(smtp_global.port),
            "EMAIL_REQUIRE_TLS": "false",
            "EMAIL_FROM": "noreply@platform.example",
            "EMAIL_FROM_NAME": "Platform",
        }
        client = await make_client(env)
        await create_clinic(
            client,
            "clinic-a",
            {"email": {"primary": smtp_slot(smtp_a, "Clinic A <a@clinic-a.example>")}},
        )
        await create_clinic(
            client,
            "clinic-b",
            {
                "email": {
                    "primary": {
                        "provider": "smtp",
                        "credentials": {
                            "host": "127.0.0.1",
                            "port": smtp_b.port,
                            "requireTls": False,
                        },
                    },
                    "defaultFrom": "b@clinic-b.example",
                    "defaultFromName": "Clinic B",
                }
            },
        )
        await create_clinic(client, "clinic-c", {})
        ids = {}
        for clinic in ("clinic-a", "clinic-b", "clinic-c"):
            accepted = await client.send(email_request(clinic, to=f"p@{clinic}.example"))
            ids[clinic] = accepted.id
        for message_id in ids.values():
            status = await wait_terminal(client, message_id)
            assert [d["status"] for d in status["deliveries"]] == ["sent"], status
        assert [r.rcpt_tos for r in smtp_a.received] == [["p@clinic-a.example"]]
        assert smtp_a.received[0].message["From"] == "Clinic A <a@clinic-a.example>"
        assert [r.rcpt_tos for r in smtp_b.received] == [["p@clinic-b.example"]]
        assert smtp_b.received[0].message["From"] == "Clinic B <b@clinic-b.example>"
        assert [r.rcpt_tos for r in smtp_global.received] == [["p@clinic-c.example"]]
        assert "noreply@platform.example" in smtp_global.received[0].message["From"]
        status_c = await client.get(ids["clinic-c"])
        assert status_c is not None
        assert status_c["deliveries"][0]["provider"] == "global:smtp"


async def test_primary_refusing_connections_fails_over_to_the_fallback(make_client) -> None:
    async with CaptureServer() as sendgrid:
        sendgrid.respond(202, None, headers={"X-Message-Id": "sg-1"})
        client = await make_client()
        dead = {
            "provider": "smtp",
            "credentials": {
                "host": "127.0.0.1",
                "port": free_port(),
                "requireTls": False,
                "from": "a@x.example",
            },
        }
        await create_clinic(
            client, "clinic-f", {"email": {"primary": dead, "fallback": [sendgrid_slot(sendgrid)]}}
        )
        accepted = await client.send(email_request("clinic-f"))
        status = await wait_terminal(client, accepted.id)
        (delivery,) = status["deliveries"]
        assert delivery["status"] == "sent"
        assert delivery["provider"] == "clinic:sendgrid"
        assert delivery["providerMessageId"] == "sg-1"
        assert [(a["provider"], a["outcome"], a["errorClass"]) for a in delivery["attempts"]] == [
            ("clinic:smtp", "failed", "provider_down"),
            ("clinic:sendgrid", "sent", None),
        ]


async def test_primary_answering_500_fails_over_after_its_retries(make_client) -> None:
    async with CaptureServer() as primary, CaptureServer() as fallback:
        primary.default = primary.default.__class__(500, {"errors": [{"message": "boom"}]})
        fallback.respond(202, None, headers={"X-Message-Id": "sg-2"})
        client = await make_client()
        await create_clinic(
            client,
            "clinic-g",
            {
                "email": {
                    "primary": sendgrid_slot(primary),
                    "fallback": [sendgrid_slot(fallback)],
                    "fallbackStrategy": {"retryAttempts": 0},
                }
            },
        )
        accepted = await client.send(email_request("clinic-g"))
        status = await wait_terminal(client, accepted.id)
        (delivery,) = status["deliveries"]
        assert delivery["status"] == "sent"
        assert delivery["provider"] == "clinic:sendgrid#2"
        assert [(a["outcome"], a["statusCode"]) for a in delivery["attempts"]] == [
            ("failed", 500),
            ("sent", None),
        ]


async def test_every_provider_down_fails_with_every_reason(make_client) -> None:
    async with CaptureServer() as sendgrid:
        sendgrid.default = sendgrid.default.__class__(401, {"errors": [{"message": "bad key"}]})
        env = {
            "EMAIL_HOST": "127.0.0.1",
            "EMAIL_PORT": str(free_port()),
            "EMAIL_REQUIRE_TLS": "false",
            "EMAIL_FROM": "g@x.example",
        }
        client = await make_client(env)
        dead = {
            "provider": "smtp",
            "credentials": {
                "host": "127.0.0.1",
                "port": free_port(),
                "requireTls": False,
                "from": "a@x.example",
            },
        }
        await create_clinic(
            client, "clinic-d", {"email": {"primary": dead, "fallback": [sendgrid_slot(sendgrid)]}}
        )
        accepted = await client.send(email_request("clinic-d"))
        status = await wait_terminal(client, accepted.id)
        (delivery,) = status["deliveries"]
        assert delivery["status"] == "failed"
        assert delivery["error"]["reason"] == "every provider failed"
        assert [e["provider"] for e in delivery["error"]["errors"]] == [
            "clinic:smtp",
            "clinic:sendgrid",
            "global:smtp",
        ]
        assert [e["class"] for e in delivery["error"]["errors"]] == [
            "provider_down",
            "configuration",
            "provider_down",
        ]


async def test_recipient_error_fails_without_failover(make_client) -> None:
    with SmtpServer() as primary, SmtpServer() as fallback:
        primary.handler.reply = "550 5.1.1 <p@x.example>: mailbox unknown"
        client = await make_client()
        await create_clinic(
            client,
            "clinic-r",
            {
                "email": {
                    "primary": smtp_slot(primary, "a@x.example"),
                    "fallback": [smtp_slot(fallback, "a@x.example")],
                }
            },
        )
        accepted = await client.send(email_request("clinic-r"))
        status = await wait_terminal(client, accepted.id)
        (delivery,) = status["deliveries"]
        assert delivery["status"] == "failed"
        assert delivery["error"]["reason"] == "recipient"
        assert len(delivery["attempts"]) == 1
        assert fallback.received == []


async def test_transient_error_retries_the_same_provider_after_retry_after(make_client) -> None:
    async with CaptureServer() as sendgrid, CaptureServer() as fallback:
        sendgrid.respond(
            429, {"errors": [{"message": "too many requests"}]}, headers={"Retry-After": "1"}
        )
        sendgrid.respond(202, None, headers={"X-Message-Id": "sg-3"})
        client = await make_client()
        await create_clinic(
            client,
            "clinic-t",
            {"email": {"primary": sendgrid_slot(sendgrid), "fallback": [sendgrid_slot(fallback)]}},
        )
        accepted = await client.send(email_request("clinic-t"))
        status = await wait_terminal(client, accepted.id)
        (delivery,) = status["deliveries"]
        assert delivery["status"] == "sent"
        assert delivery["provider"] == "clinic:sendgrid"
        first, second = delivery["attempts"]
        assert first["errorClass"] == "rate_limited"
        from datetime import datetime

        gap = datetime.fromisoformat(second["time"]) - datetime.fromisoformat(first["time"])
        assert gap.total_seconds() >= 1.0
        assert fallback.requests == []


async def test_missing_address_is_recorded_failed_not_dropped(make_client) -> None:
    client = await make_client()
    await create_clinic(client, "clinic-m", {})
    request = email_request("clinic-m", channels=["email", "sms"])
    accepted = await client.send(request)
    by_channel = {d.channel.value: d for d in accepted.deliveries}
    assert by_channel["sms"].status == "failed"
    assert by_channel["sms"].error == {
        "reason": "recipient has no phone number for sms",
        "errors": [],
    }
    status = await wait_terminal(client, accepted.id)
    assert {d["channel"]: d["status"] for d in status["deliveries"]}["sms"] == "failed"


async def test_no_provider_anywhere_fails_with_a_reason(make_client) -> None:
    client = await make_client()
    await create_clinic(client, "clinic-n", {})
    accepted = await client.send(email_request("clinic-n"))
    status = await wait_terminal(client, accepted.id)
    (delivery,) = status["deliveries"]
    assert delivery["status"] == "failed"
    assert delivery["error"]["reason"].startswith("no email provider is configured")


async def test_idempotency_key(make_client) -> None:
    async with CaptureServer() as sendgrid:
        sendgrid.default = sendgrid.default.__class__(202, None, {"X-Message-Id": "sg"})
        client = await make_client()
        await create_clinic(client, "clinic-i", {"email": {"primary": sendgrid_slot(sendgrid)}})
        first = await client.send(email_request("clinic-i"), idempotency_key="key-1")
        again = await client.send(email_request("clinic-i"), idempotency_key="key-1")
        assert again == first
        with pytest.raises(IdempotencyConflictError):
            await client.send(
                email_request("clinic-i", to="other@example.com"), idempotency_key="key-1"
            )
        await wait_terminal(client, first.id)
        await asyncio.sleep(0.2)
        assert len(sendgrid.requests) == 1


async def test_unknown_clinic_is_refused(make_client) -> None:
    client = await make_client()
    with pytest.raises(UnknownClinicError):
        await client.send(email_request("no-such-clinic"))


async def test_message_body_is_encrypted_at_rest(make_client) -> None:
    from sqlalchemy import select

    from clinicomm.store.models import Message
    from tests.conftest import canary

    client = await make_client()
    await create_clinic(client, "clinic-e", {})
    secret_body = canary("body")
    accepted = await client.send(email_request("clinic-e", body=secret_body))
    async with client._rt().db.session() as session:
        blob = (
            await session.execute(select(Message.content).where(Message.id == accepted.id))
        ).scalar_one()
    assert secret_body.encode() not in blob


async def test_concurrent_requests_with_one_key_write_one_message(make_client) -> None:
    from sqlalchemy import func, select

    from clinicomm.store.models import Message

    client = await make_client()
    await create_clinic(client, "clinic-k", {})
    answers = await asyncio.gather(
        *(client.send(email_request("clinic-k"), idempotency_key="same") for _ in range(20))
    )
    assert len({a.id for a in answers}) == 1
    async with client._rt().db.read() as session:
        count = (await session.execute(select(func.count()).select_from(Message))).scalar_one()
    assert count == 1


async def test_expired_idempotency_key_is_a_new_request(make_client) -> None:
    from sqlalchemy import update

    from clinicomm.store.models import IdempotencyKey, utcnow

    client = await make_client()
    await create_clinic(client, "clinic-x", {})
    first = await client.send(email_request("clinic-x"), idempotency_key="k")
    async with client._rt().db.session() as session:
        await session.execute(update(IdempotencyKey).values(expires_at=utcnow()))
    again = await client.send(email_request("clinic-x", to="new@example.com"), idempotency_key="k")
    assert again.id != first.id
