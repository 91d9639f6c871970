"""Postmark adapter: real requests checked against Postmark's official OpenAPI; classified errors.

The official file is the old Swagger one: it has no `MessageStream` or `Metadata` fields and no
`additionalProperties: false`, so both pass as extra fields (asserted here), and its template
request wrongly requires both TemplateId and TemplateAlias (relaxed in tests/support/specs.py).
"""

from __future__ import annotations

import pytest

from clinicomm.providers.base import AdapterContext, OutboundMessage
from clinicomm.providers.email.postmark import PostmarkAdapter, PostmarkCredentials
from clinicomm.providers.errors import (
    ConfigurationError,
    RateLimitedError,
    RecipientError,
    TransientError,
)
from tests.providers.email.conftest import CANARY, html_message, template_message, text_message
from tests.support.http_capture import CaptureServer
from tests.support.specs import assert_valid

HOST = "https://api.postmarkapp.com"
OK = {
    "To": "patient@example.com",
    "SubmittedAt": "2024-01-01T10:00:00Z",
    "MessageID": "0a129aee-e1cd-480d-b08d-4f48548ff48d",
    "ErrorCode": 0,
    "Message": "OK",
}


def adapter(server: CaptureServer, context: AdapterContext, **kw: object) -> PostmarkAdapter:
    creds = PostmarkCredentials.model_validate(
        {"serverToken": CANARY, "baseUrl": server.url, "messageStream": "reminders", **kw}
    )
    return PostmarkAdapter(creds, context)


@pytest.mark.parametrize(
    ("message", "path"),
    [
        (text_message(), "/email"),
        (html_message(), "/email"),
        (template_message(), "/email/withTemplate"),
        (template_message("12345"), "/email/withTemplate"),
    ],
    ids=["text", "html", "template-alias", "template-id"],
)
async def test_request_matches_official_spec(
    server: CaptureServer, context: AdapterContext, message: OutboundMessage, path: str
) -> None:
    server.respond(200, OK)
    result = await adapter(server, context).send(message)
    assert result.provider_message_id == OK["MessageID"]
    request = server.requests[0]
    assert request.method == "POST"
    assert request.path == path
    assert request.headers["X-Postmark-Server-Token"] == CANARY
    assert request.headers["Accept"] == "application/json"
    assert request.content_type == "application/json"
    assert_valid("postmark", request, host_url=HOST)
    body = request.json()
    assert body["MessageStream"] == "reminders"
    assert body["Metadata"] == {"ref": "dlv_0001"}
    if path == "/email/withTemplate":
        assert ("TemplateId" in body) != ("TemplateAlias" in body)  # exactly one
        assert body["TemplateModel"] == {"time": "10:30", "clinic": "Clinic A"}
    else:
        assert body.get("TextBody") or body.get("HtmlBody")


async def test_body_fields(server: CaptureServer, context: AdapterContext) -> None:
    server.respond(200, OK, times=2)
    pm = adapter(server, context)
    await pm.send(html_message())
    await pm.send(template_message("42"))
    plain, template = (r.json() for r in server.requests)
    assert plain["From"] == "Clinic A <clinic@clinic-a.example>"
    assert plain["To"] == "patient@example.com"
    assert plain["Subject"] == "Appointment confirmed"
    assert plain["TextBody"] == "See you at 10:30."
    assert plain["HtmlBody"].startswith("<p>")
    assert template["TemplateId"] == 42
    assert "TemplateAlias" not in template


async def test_spec_check_is_live(server: CaptureServer, context: AdapterContext) -> None:
    """A template request without To fails the official spec: the check is real."""
    server.respond(200, OK)
    await adapter(server, context).send(template_message())
    request = server.requests[0]
    request.body = request.body.replace(b'"To"', b'"Xx"')
    with pytest.raises(Exception, match="To"):
        assert_valid("postmark", request, host_url=HOST)


async def postmark_error(
    server: CaptureServer, context: AdapterContext, status: int, code: int, message: str
) -> Exception:
    server.respond(status, {"ErrorCode": code, "Message": message})
    with pytest.raises(Exception) as info:
        await adapter(server, context).send(text_message())
    return info.value


async def test_error_code_10_is_configuration(
    server: CaptureServer, context: AdapterContext
) -> None:
    error = await postmark_error(server, context, 401, 10, "Bad or missing Server API token.")
    assert isinstance(error, ConfigurationError)


async def test_error_code_406_is_recipient(
    server: CaptureServer, context: AdapterContext
) -> None:
    error = await postmark_error(
        server, context, 422, 406,
        "You tried to send to recipient(s) that have been marked as inactive.",
    )
    assert isinstance(error, RecipientError)
    assert error.code == "406"


async def test_error_code_300_bad_to_is_recipient(
    server: CaptureServer, context: AdapterContext
) -> None:
    error = await postmark_error(
        server, context, 422, 300,
        "Error parsing 'To': Illegal email address 'patient'. It must contain the '@' symbol.",
    )
    assert isinstance(error, RecipientError)
    assert "patient@" not in str(error.detail)


async def test_error_code_300_other_is_configuration(
    server: CaptureServer, context: AdapterContext
) -> None:
    error = await postmark_error(
        server, context, 422, 300, "Provide either email TextBody or HtmlBody or both."
    )
    assert isinstance(error, ConfigurationError)


@pytest.mark.parametrize("code", [400, 412, 413])
async def test_sender_and_account_codes_are_configuration(
    server: CaptureServer, context: AdapterContext, code: int
) -> None:
    error = await postmark_error(server, context, 422, code, "Sender signature problem")
    assert isinstance(error, ConfigurationError)


async def test_429_is_rate_limited(server: CaptureServer, context: AdapterContext) -> None:
    server.respond(429, {"ErrorCode": 429, "Message": "Rate limit exceeded"},
                   headers={"Retry-After": "2"})
    with pytest.raises(RateLimitedError) as info:
        await adapter(server, context).send(text_message())
    assert info.value.retry_after == 2


async def test_5xx_is_transient(server: CaptureServer, context: AdapterContext) -> None:
    server.respond(500, {"ErrorCode": 1, "Message": "Internal error"})
    with pytest.raises(TransientError) as info:
        await adapter(server, context).send(text_message())
    assert type(info.value) is TransientError


async def test_probe(server: CaptureServer, context: AdapterContext) -> None:
    pm = adapter(server, context)
    server.respond(200, {"ID": 1, "Name": "Clinic A"})
    await pm.probe()
    assert server.requests[-1].method == "GET"
    assert server.requests[-1].path == "/server"
    assert_valid("postmark", server.requests[-1], host_url=HOST)
    server.respond(401, {"ErrorCode": 10, "Message": "Bad or missing Server API token."})
    with pytest.raises(ConfigurationError):
        await pm.probe()
