"""Issue 5 end to end: each email error class, produced by a real server's reply, and what the
pipeline does about it (retry on the same provider, fail over, fail).

Real parts only: aiosmtpd servers for SMTP, local HTTP servers (CaptureServer) answering as
SendGrid, Mailgun, Postmark and SES would, the test database and the in-process worker. Every
assertion reads the delivery back through `client.get()` (its attempts: provider labels, error
classes, times). Backoff is shrunk with `retry_base_seconds` so a retry takes milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest

from clinicomm import SendRequest
from tests.support.http_capture import CaptureServer, Scripted
from tests.support.pipeline import create_clinic, wait_terminal
from tests.support.smtp_server import SmtpServer

FAST_RETRY = {"retry_base_seconds": 0.05}


def email_request(clinic_id: str, to: str = "patient@example.com") -> SendRequest:
    return SendRequest.model_validate(
        {
            "category": "APPOINTMENT",
            "title": "Appointment Confirmed",
            "body": "Your appointment is at 10:30.",
            "recipients": [{"email": to}],
            "channels": ["email"],
            "metadata": {"clinicId": clinic_id},
        }
    )


def attempts(delivery: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    return [(a["provider"], a["outcome"], a["errorClass"]) for a in delivery["attempts"]]


def times(delivery: dict[str, Any]) -> list[datetime]:
    return [datetime.fromisoformat(a["time"]) for a in delivery["attempts"]]


async def send_one(
    make_client: Callable[..., Any], clinic: str, email: dict[str, Any]
) -> dict[str, Any]:
    """A client with the clinic's email settings; sends one message, returns its delivery."""
    client = await make_client(**FAST_RETRY)
    await create_clinic(client, clinic, {"email": email})
    accepted = await client.send(email_request(clinic))
    status = await wait_terminal(client, accepted.id)
    (delivery,) = status["deliveries"]
    return delivery


# --- SMTP -------------------------------------------------------------------------------------


def smtp_slot(server: SmtpServer, **extra: Any) -> dict[str, Any]:
    return {
        "provider": "smtp",
        "credentials": {**server.credentials("Clinic <c@clinic.example>"), **extra},
    }


def smtp_chain(primary: SmtpServer, fallback: SmtpServer, **primary_extra: Any) -> dict[str, Any]:
    return {
        "primary": smtp_slot(primary, **primary_extra),
        "fallback": [smtp_slot(fallback)],
        "fallbackStrategy": {"retryAttempts": 1},
    }


@pytest.mark.parametrize(
    ("reply", "error_class"),
    [
        ("451 4.3.0 Temporary local problem, try later", "transient"),
        ("454 4.7.0 Too many messages, throttling in effect", "rate_limited"),
    ],
)
async def test_smtp_4xx_is_retried_on_the_same_server_then_sent(
    make_client: Callable[..., Any], reply: str, error_class: str
) -> None:
    with SmtpServer() as primary, SmtpServer() as fallback:
        primary.handler.replies.append(reply)
        delivery = await send_one(make_client, "clinic-s4", smtp_chain(primary, fallback))
        assert delivery["status"] == "sent" and delivery["provider"] == "clinic:smtp"
        assert attempts(delivery) == [
            ("clinic:smtp", "failed", error_class),
            ("clinic:smtp", "sent", None),
        ]
        assert delivery["attempts"][0]["statusCode"] == int(reply[:3])
        first, second = times(delivery)
        assert second > first
        assert len(primary.received) == 1 and len(primary.handler.data_times) == 2
        assert fallback.received == [] and fallback.handler.rcpt_count == 0


async def test_smtp_unknown_user_fails_without_failover(make_client: Callable[..., Any]) -> None:
    with SmtpServer() as primary, SmtpServer() as fallback:
        primary.handler.rcpt_reply = "550 5.1.1 Recipient address rejected: User unknown"
        delivery = await send_one(make_client, "clinic-s511", smtp_chain(primary, fallback))
        assert delivery["status"] == "failed"
        assert delivery["error"]["reason"] == "recipient"
        assert attempts(delivery) == [("clinic:smtp", "failed", "recipient")]
        assert delivery["attempts"][0]["errorCode"] == "5.1.1"
        assert primary.handler.rcpt_count == 1 and primary.received == []
        assert fallback.handler.rcpt_count == 0


async def test_smtp_daily_quota_fails_over_to_the_fallback(
    make_client: Callable[..., Any],
) -> None:
    with SmtpServer() as primary, SmtpServer() as fallback:
        primary.handler.reply = "550 5.4.5 Daily user sending quota exceeded"
        delivery = await send_one(make_client, "clinic-s545", smtp_chain(primary, fallback))
        assert delivery["status"] == "sent" and delivery["provider"] == "clinic:smtp#2"
        assert attempts(delivery) == [
            ("clinic:smtp", "failed", "provider_down"),
            ("clinic:smtp#2", "sent", None),
        ]
        assert len(primary.handler.data_times) == 1  # quota: not retried on the same server
        assert len(fallback.received) == 1


async def test_smtp_auth_refused_fails_over(make_client: Callable[..., Any]) -> None:
    with SmtpServer(refuse_auth=True) as primary, SmtpServer() as fallback:
        chain = smtp_chain(primary, fallback, user="clinic", password="wrong-password")
        delivery = await send_one(make_client, "clinic-s535", chain)
        assert delivery["status"] == "sent" and delivery["provider"] == "clinic:smtp#2"
        assert attempts(delivery) == [
            ("clinic:smtp", "failed", "configuration"),
            ("clinic:smtp#2", "sent", None),
        ]
        assert delivery["attempts"][0]["statusCode"] == 535
        assert primary.handler.rcpt_count == 0 and len(fallback.received) == 1


# --- HTTP email providers -------------------------------------------------------------------


@dataclass(frozen=True)
class HttpEmail:
    """How one HTTP email provider is configured and what its answers look like."""

    key: str
    slot: Callable[[CaptureServer], dict[str, Any]]
    ok: Scripted
    unauthorized: Scripted
    bad_recipient: Scripted


def _sendgrid(server: CaptureServer) -> dict[str, Any]:
    return {
        "apiKey": "SG.test",
        "fromEmail": "hello@clinic.example",
        "baseUrl": server.url,
    }


def _mailgun(server: CaptureServer) -> dict[str, Any]:
    return {
        "apiKey": "key-test",
        "domain": "mg.clinic.example",
        "fromEmail": "hello@clinic.example",
        "baseUrl": server.url,
    }


def _postmark(server: CaptureServer) -> dict[str, Any]:
    return {"serverToken": "pm-test", "fromEmail": "hello@clinic.example", "baseUrl": server.url}


def _ses(server: CaptureServer) -> dict[str, Any]:
    return {
        "region": "eu-west-1",
        "accessKeyId": "AKIDEXAMPLE",
        "secretAccessKey": "ses-test",
        "endpointUrl": server.url,
        "fromEmail": "hello@clinic.example",
    }


PROVIDERS = [
    HttpEmail(
        "sendgrid",
        _sendgrid,
        Scripted(202, None, {"X-Message-Id": "sg-1"}),
        Scripted(401, {"errors": [{"field": None, "message": "authorization required"}]}),
        Scripted(
            400,
            {
                "errors": [
                    {
                        "field": "personalizations.0.to.0.email",
                        "message": "Does not contain a valid address.",
                    }
                ]
            },
        ),
    ),
    HttpEmail(
        "mailgun",
        _mailgun,
        Scripted(200, {"id": "<1@mg.clinic.example>", "message": "Queued. Thank you."}),
        Scripted(401, "Forbidden"),
        Scripted(400, {"message": "to parameter is not a valid address. please check docs"}),
    ),
    HttpEmail(
        "postmark",
        _postmark,
        Scripted(
            200,
            {
                "To": "patient@example.com",
                "SubmittedAt": "2024-01-01T00:00:00Z",
                "MessageID": "pm-1",
                "ErrorCode": 0,
                "Message": "OK",
            },
        ),
        Scripted(401, {"ErrorCode": 10, "Message": "No Server API token was supplied"}),
        Scripted(
            422,
            {"ErrorCode": 406, "Message": "The recipient has been marked as inactive."},
        ),
    ),
    HttpEmail(
        "ses",
        _ses,
        Scripted(200, {"MessageId": "ses-1"}),
        Scripted(
            403,
            {"message": "The security token included in the request is invalid."},
            {"x-amzn-ErrorType": "UnrecognizedClientException"},
        ),
        Scripted(
            400,
            {"message": "Illegal address"},
            {"x-amzn-ErrorType": "BadRequestException"},
        ),
    ),
]


def http_chain(p: HttpEmail, primary: CaptureServer, fallback: CaptureServer) -> dict[str, Any]:
    return {
        "primary": {"provider": p.key, "credentials": p.slot(primary)},
        "fallback": [{"provider": p.key, "credentials": p.slot(fallback)}],
        "fallbackStrategy": {"retryAttempts": 1},
    }


by_key = pytest.mark.parametrize("p", PROVIDERS, ids=[p.key for p in PROVIDERS])


@by_key
async def test_429_retry_after_is_honoured_on_the_same_provider(
    make_client: Callable[..., Any], p: HttpEmail
) -> None:
    async with CaptureServer(p.ok) as primary, CaptureServer(p.ok) as fallback:
        primary.respond(429, {"message": "Too many requests"}, headers={"Retry-After": "1"})
        chain = http_chain(p, primary, fallback)
        delivery = await send_one(make_client, f"clinic-{p.key}-429", chain)
        label = f"clinic:{p.key}"
        assert delivery["status"] == "sent" and delivery["provider"] == label
        assert attempts(delivery) == [(label, "failed", "rate_limited"), (label, "sent", None)]
        assert delivery["attempts"][0]["statusCode"] == 429
        first, second = times(delivery)
        assert (second - first).total_seconds() >= 1.0  # never before Retry-After
        assert len(primary.requests) == 2 and fallback.requests == []


@by_key
async def test_5xx_is_retried_then_fails_over(
    make_client: Callable[..., Any], p: HttpEmail
) -> None:
    async with CaptureServer(Scripted(503, {"message": "unavailable"})) as primary, CaptureServer(
        p.ok
    ) as fallback:
        chain = http_chain(p, primary, fallback)
        delivery = await send_one(make_client, f"clinic-{p.key}-5xx", chain)
        label = f"clinic:{p.key}"
        assert delivery["status"] == "sent" and delivery["provider"] == f"{label}#2"
        assert attempts(delivery) == [
            (label, "failed", "transient"),
            (label, "failed", "transient"),
            (f"{label}#2", "sent", None),
        ]
        assert [a["statusCode"] for a in delivery["attempts"][:2]] == [503, 503]
        assert len(primary.requests) == 2 and len(fallback.requests) == 1


@by_key
async def test_401_fails_over_at_once(make_client: Callable[..., Any], p: HttpEmail) -> None:
    async with CaptureServer(p.unauthorized) as primary, CaptureServer(p.ok) as fallback:
        chain = http_chain(p, primary, fallback)
        delivery = await send_one(make_client, f"clinic-{p.key}-401", chain)
        label = f"clinic:{p.key}"
        assert delivery["status"] == "sent" and delivery["provider"] == f"{label}#2"
        assert attempts(delivery) == [
            (label, "failed", "configuration"),
            (f"{label}#2", "sent", None),
        ]
        assert len(primary.requests) == 1 and len(fallback.requests) == 1


@by_key
async def test_recipient_error_fails_without_failover(
    make_client: Callable[..., Any], p: HttpEmail
) -> None:
    async with CaptureServer(p.bad_recipient) as primary, CaptureServer(p.ok) as fallback:
        chain = http_chain(p, primary, fallback)
        delivery = await send_one(make_client, f"clinic-{p.key}-rcpt", chain)
        assert delivery["status"] == "failed" and delivery["error"]["reason"] == "recipient"
        assert attempts(delivery) == [(f"clinic:{p.key}", "failed", "recipient")]
        assert len(primary.requests) == 1 and fallback.requests == []
