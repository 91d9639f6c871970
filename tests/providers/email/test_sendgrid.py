"""SendGrid adapter: real requests checked against the official OpenAPI file; classified errors."""

from __future__ import annotations

import time

import pytest

from clinicomm.providers.base import AdapterContext, OutboundMessage
from clinicomm.providers.email.sendgrid import SendGridAdapter, SendGridCredentials
from clinicomm.providers.errors import (
    ConfigurationError,
    ProviderDownError,
    RateLimitedError,
    RecipientError,
    TransientError,
)
from tests.providers.email.conftest import CANARY, html_message, template_message, text_message
from tests.support.http_capture import CaptureServer
from tests.support.specs import assert_valid

HOST = "https://api.sendgrid.com"


def adapter(server: CaptureServer, context: AdapterContext, **kw: object) -> SendGridAdapter:
    creds = SendGridCredentials.model_validate(
        {"apiKey": CANARY, "baseUrl": server.url, **kw}
    )
    return SendGridAdapter(creds, context)


def assert_sendgrid_rules(body: dict[str, object]) -> None:
    """What the spec does not encode: content or template_id is required; text/plain first."""
    assert body.get("content") or body.get("template_id")
    content = body.get("content") or []
    types = [c["type"] for c in content]  # type: ignore[index, union-attr]
    assert types == sorted(types, key=lambda t: t != "text/plain")
    personalizations = body["personalizations"]
    assert isinstance(personalizations, list)
    assert personalizations[0]["custom_args"] == {"ref": "dlv_0001"}
    assert "custom_args" not in body


@pytest.mark.parametrize(
    "message",
    [text_message(), html_message(), template_message("d-0123456789abcdef")],
    ids=["text", "html", "template"],
)
async def test_request_matches_official_spec(
    server: CaptureServer, context: AdapterContext, message: OutboundMessage
) -> None:
    server.respond(202, None, headers={"X-Message-Id": "sg-abc"})
    result = await adapter(server, context).send(message)
    assert result.provider_message_id == "sg-abc"
    request = server.requests[0]
    assert request.method == "POST"
    assert request.path == "/v3/mail/send"
    assert request.headers["Authorization"] == f"Bearer {CANARY}"
    assert_valid("sendgrid", request, host_url=HOST)
    assert_sendgrid_rules(request.json())


async def test_payload_shape(server: CaptureServer, context: AdapterContext) -> None:
    server.respond(202, None, headers={"X-Message-Id": "x"})
    await adapter(server, context).send(html_message())
    body = server.requests[0].json()
    assert body["personalizations"] == [
        {"to": [{"email": "patient@example.com"}], "custom_args": {"ref": "dlv_0001"}}
    ]
    assert body["from"] == {"email": "clinic@clinic-a.example", "name": "Clinic A"}
    assert body["subject"] == "Appointment confirmed"
    assert [c["type"] for c in body["content"]] == ["text/plain", "text/html"]
    assert "template_id" not in body


async def test_template_uses_credentials_template_id_and_variables(
    server: CaptureServer, context: AdapterContext
) -> None:
    server.respond(202, None, headers={"X-Message-Id": "x"})
    sg = adapter(server, context, templateId="d-clinic-template", fromEmail="noreply@a.example")
    await sg.send(template_message())
    body = server.requests[0].json()
    assert body["template_id"] == "d-clinic-template"
    assert body["personalizations"][0]["dynamic_template_data"] == {
        "time": "10:30",
        "clinic": "Clinic A",
    }
    assert "content" not in body
    assert body["from"]["email"] == "noreply@a.example"
    assert_valid("sendgrid", server.requests[0], host_url=HOST)


async def test_template_without_id_is_configuration_error(
    server: CaptureServer, context: AdapterContext
) -> None:
    with pytest.raises(ConfigurationError):
        await adapter(server, context).send(template_message())
    assert server.requests == []


async def test_no_sender_is_configuration_error(
    server: CaptureServer, context: AdapterContext
) -> None:
    with pytest.raises(ConfigurationError):
        await adapter(server, context).send(text_message(from_email=None, from_name=None))
    assert server.requests == []


async def test_429_with_retry_after(server: CaptureServer, context: AdapterContext) -> None:
    server.respond(429, {"errors": [{"message": "too many"}]}, headers={"Retry-After": "7"})
    with pytest.raises(RateLimitedError) as info:
        await adapter(server, context).send(text_message())
    assert info.value.retry_after == 7


async def test_429_with_ratelimit_reset_epoch(
    server: CaptureServer, context: AdapterContext
) -> None:
    reset = int(time.time()) + 30
    server.respond(429, {"errors": []}, headers={"X-RateLimit-Reset": str(reset)})
    with pytest.raises(RateLimitedError) as info:
        await adapter(server, context).send(text_message())
    assert info.value.retry_after is not None
    assert 25 <= info.value.retry_after <= 31


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_failures_are_configuration_errors(
    server: CaptureServer, context: AdapterContext, status: int
) -> None:
    server.respond(status, {"errors": [{"message": "The provided authorization grant is invalid"}]})
    with pytest.raises(ConfigurationError) as info:
        await adapter(server, context).send(text_message())
    assert info.value.status_code == status
    assert CANARY not in str(info.value.to_dict())


async def test_400_invalid_recipient_is_recipient_error(
    server: CaptureServer, context: AdapterContext
) -> None:
    server.respond(
        400,
        {
            "errors": [
                {
                    "message": "Does not contain a valid address.",
                    "field": "personalizations.0.to.0.email",
                    "help": "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html",
                }
            ]
        },
    )
    with pytest.raises(RecipientError):
        await adapter(server, context).send(text_message())


async def test_400_other_is_configuration_error(
    server: CaptureServer, context: AdapterContext
) -> None:
    server.respond(
        400,
        {"errors": [{"message": "The from address does not match a verified Sender Identity.",
                     "field": "from", "help": None}]},
    )
    with pytest.raises(ConfigurationError):
        await adapter(server, context).send(text_message())


async def test_5xx_is_transient(server: CaptureServer, context: AdapterContext) -> None:
    server.respond(503, "upstream down")
    with pytest.raises(TransientError) as info:
        await adapter(server, context).send(text_message())
    assert type(info.value) is TransientError


async def test_timeout_is_transient(server: CaptureServer, http: object) -> None:
    import aiohttp

    assert isinstance(http, aiohttp.ClientSession)
    server.respond(202, None, delay=1.0)
    sg = adapter(server, AdapterContext(http=http, timeout=0.2))
    with pytest.raises(TransientError):
        await sg.send(text_message())


async def test_unreachable_is_provider_down(context: AdapterContext) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        creds = SendGridCredentials(api_key=CANARY, base_url=f"http://127.0.0.1:{port}")  # type: ignore[arg-type]
        with pytest.raises(ProviderDownError):
            await SendGridAdapter(creds, context).send(text_message())


async def test_probe_checks_mail_send_scope(
    server: CaptureServer, context: AdapterContext
) -> None:
    sg = adapter(server, context)
    server.respond(200, {"scopes": ["mail.send", "alerts.read"]})
    await sg.probe()
    assert server.requests[-1].method == "GET"
    assert server.requests[-1].path == "/v3/scopes"
    server.respond(200, {"scopes": ["alerts.read"]})
    with pytest.raises(ConfigurationError):
        await sg.probe()
    server.respond(401, {"errors": [{"message": "authorization required"}]})
    with pytest.raises(ConfigurationError):
        await sg.probe()
    assert all(r.path != "/v3/mail/send" for r in server.requests)


async def test_own_session_when_context_has_none(server: CaptureServer) -> None:
    sg = adapter(server, AdapterContext(http=None))
    server.respond(202, None, headers={"X-Message-Id": "x"}, times=2)
    await sg.send(text_message())
    await sg.send(text_message())
    await sg.close()
    await sg.close()
    assert len(server.requests) == 2


async def test_spec_check_is_live(server: CaptureServer, context: AdapterContext) -> None:
    """A body without personalizations fails the official spec: the check is real."""
    server.respond(202, None, headers={"X-Message-Id": "x"})
    await adapter(server, context).send(text_message())
    request = server.requests[0]
    request.body = request.body.replace(b'"personalizations"', b'"xpersonalizations"')
    with pytest.raises(Exception, match="personalizations"):
        assert_valid("sendgrid", request, host_url=HOST)
