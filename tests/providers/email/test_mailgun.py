"""Mailgun adapter: real requests checked against Mailgun's official OpenAPI; classified errors."""

from __future__ import annotations

import base64
import json

import pytest

from clinicomm.providers.base import AdapterContext, OutboundMessage
from clinicomm.providers.email.mailgun import MailgunAdapter, MailgunCredentials
from clinicomm.providers.errors import (
    ConfigurationError,
    RateLimitedError,
    RecipientError,
    TransientError,
)
from tests.providers.email.conftest import CANARY, html_message, template_message, text_message
from tests.support.http_capture import CaptureServer
from tests.support.specs import assert_valid

HOST = "https://api.mailgun.net"
OK = {"id": "<20240101.abc@mg.clinic-a.example>", "message": "Queued. Thank you."}


def adapter(server: CaptureServer, context: AdapterContext, **kw: object) -> MailgunAdapter:
    creds = MailgunCredentials.model_validate(
        {"apiKey": CANARY, "domain": "mg.clinic-a.example", "baseUrl": server.url, **kw}
    )
    return MailgunAdapter(creds, context)


@pytest.mark.parametrize(
    "message",
    [text_message(), html_message(), template_message()],
    ids=["text", "html", "template"],
)
async def test_request_matches_official_spec(
    server: CaptureServer, context: AdapterContext, message: OutboundMessage
) -> None:
    server.respond(200, OK)
    result = await adapter(server, context).send(message)
    assert result.provider_message_id == OK["id"]
    request = server.requests[0]
    assert request.method == "POST"
    assert request.path == "/v3/mg.clinic-a.example/messages"
    assert request.content_type == "multipart/form-data"
    expected = base64.b64encode(f"api:{CANARY}".encode()).decode()
    assert request.headers["Authorization"] == f"Basic {expected}"
    assert_valid("mailgun", request, host_url=HOST)
    # What the spec marks required but a form cannot enforce by schema alone: non-empty values.
    form = request.form()
    for name in ("from", "to", "subject"):
        assert form.getall(name), name
    assert form["v:ref"] == "dlv_0001"


async def test_fields(server: CaptureServer, context: AdapterContext) -> None:
    server.respond(200, OK)
    await adapter(server, context).send(html_message())
    form = server.requests[0].form()
    assert form["from"] == "Clinic A <clinic@clinic-a.example>"
    assert form["to"] == "patient@example.com"
    assert form["subject"] == "Appointment confirmed"
    assert form["text"] == "See you at 10:30."
    assert form["html"].startswith("<p>")
    assert "template" not in form


async def test_template_fields(server: CaptureServer, context: AdapterContext) -> None:
    server.respond(200, OK)
    await adapter(server, context, fromEmail="noreply@mg.clinic-a.example").send(
        template_message()
    )
    form = server.requests[0].form()
    assert form["template"] == "appointment-confirmed"
    assert json.loads(form["t:variables"]) == {"time": "10:30", "clinic": "Clinic A"}
    assert form["from"] == "Clinic A <noreply@mg.clinic-a.example>"
    assert "text" not in form


def test_region_hosts(context: AdapterContext) -> None:
    us = MailgunCredentials(api_key=CANARY, domain="d.example")  # type: ignore[arg-type]
    eu = MailgunCredentials(api_key=CANARY, domain="d.example", region="eu")  # type: ignore[arg-type]
    assert MailgunAdapter(us, context).base_url == "https://api.mailgun.net"
    assert MailgunAdapter(eu, context).base_url == "https://api.eu.mailgun.net"


async def test_spec_check_is_live_but_misses_to(
    server: CaptureServer, context: AdapterContext
) -> None:
    """A form without `from` fails the official spec, so the check is real. A form without `to`
    passes it: openapi-core reads a missing multipart array field as `[]`, so `required: [to]`
    is never enforced. That is why `from`, `to`, `subject` are asserted separately above."""
    server.respond(200, OK)
    await adapter(server, context).send(text_message())
    request = server.requests[0]
    original = request.body
    request.body = original.replace(b'name="from"', b'name="xfrom"')
    with pytest.raises(Exception, match="from"):
        assert_valid("mailgun", request, host_url=HOST)
    request.body = original.replace(b'name="to"', b'name="xto"')
    assert_valid("mailgun", request, host_url=HOST)  # the gap: no error
    assert not request.form().getall("to", [])


async def test_429_is_rate_limited(server: CaptureServer, context: AdapterContext) -> None:
    server.respond(429, {"message": "Too many requests"}, headers={"Retry-After": "3"})
    with pytest.raises(RateLimitedError) as info:
        await adapter(server, context).send(text_message())
    assert info.value.retry_after == 3


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_auth_and_domain_failures(
    server: CaptureServer, context: AdapterContext, status: int
) -> None:
    server.respond(status, "Forbidden")
    with pytest.raises(ConfigurationError):
        await adapter(server, context).send(text_message())


async def test_bad_address_is_recipient_error(
    server: CaptureServer, context: AdapterContext
) -> None:
    server.respond(
        400, {"message": "to parameter is not a valid address. please check documentation"}
    )
    with pytest.raises(RecipientError):
        await adapter(server, context).send(text_message())


async def test_other_400_is_configuration_error(
    server: CaptureServer, context: AdapterContext
) -> None:
    server.respond(400, {"message": "from parameter is missing"})
    with pytest.raises(ConfigurationError):
        await adapter(server, context).send(text_message())


async def test_5xx_is_transient(server: CaptureServer, context: AdapterContext) -> None:
    server.respond(502, "bad gateway")
    with pytest.raises(TransientError) as info:
        await adapter(server, context).send(text_message())
    assert type(info.value) is TransientError


async def test_probe(server: CaptureServer, context: AdapterContext) -> None:
    mg = adapter(server, context)
    server.respond(200, {"domain": {"name": "mg.clinic-a.example", "state": "active"}})
    await mg.probe()
    assert server.requests[-1].method == "GET"
    assert server.requests[-1].path == "/v4/domains/mg.clinic-a.example"
    assert_valid("mailgun", server.requests[-1], host_url=HOST)
    server.respond(401, "Forbidden")
    with pytest.raises(ConfigurationError):
        await mg.probe()
    assert all(r.method == "GET" for r in server.requests)
