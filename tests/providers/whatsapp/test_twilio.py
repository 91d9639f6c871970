"""Twilio WhatsApp adapter against a local server and Twilio's official v2010 spec."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from openapi_core.exceptions import OpenAPIError

from clinicomm.providers import registry
from clinicomm.providers.base import AdapterContext, Channel
from clinicomm.providers.errors import ComplianceError, ConfigurationError, ProviderError
from clinicomm.providers.shared.http import basic_auth
from clinicomm.providers.whatsapp.twilio import TwilioWhatsAppAdapter
from tests.providers.twilio_cases import (
    CONTENT_SID,
    ERROR_CASES,
    ERROR_IDS,
    MESSAGE_SID,
    SID,
    created,
    creds,
    twilio_error,
)
from tests.support.http_capture import CaptureServer
from tests.support.messaging import (
    CANARY,
    PATIENT,
    assert_no_secret,
    build,
    template_message,
    text_message,
)
from tests.support.specs import assert_valid

WA = Channel.WHATSAPP
HOST = "https://api.twilio.com"


def adapter(
    server: CaptureServer, http: aiohttp.ClientSession, **extra: Any
) -> TwilioWhatsAppAdapter:
    made = build(TwilioWhatsAppAdapter, creds(server.url, "whatsapp:+15005550006", **extra), http)
    assert isinstance(made, TwilioWhatsAppAdapter)
    return made


def test_registered() -> None:
    assert registry.get(WA, "twilio").adapter is TwilioWhatsAppAdapter


async def test_text_message_matches_the_official_spec(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(201, created())
        result = await adapter(server, http).send(text_message(WA))
    assert result.provider_message_id == MESSAGE_SID
    assert result.provider_status == "queued"
    (request,) = server.requests
    assert request.path == f"/2010-04-01/Accounts/{SID}/Messages.json"
    assert request.content_type == "application/x-www-form-urlencoded"
    assert request.headers["Authorization"] == basic_auth(SID, CANARY)["Authorization"]
    assert dict(request.form()) == {
        "To": f"whatsapp:{PATIENT}",
        "From": "whatsapp:+15005550006",
        "Body": "Your appointment is at 10:30",
    }
    assert_valid("twilio", request, host_url=HOST)


async def test_template_goes_as_content_sid(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(201, created())
        a = adapter(server, http, templates={"appointmentReminder": CONTENT_SID},
                    messagingServiceSid="MG" + "c" * 32)
        await a.send(template_message(WA))
    (request,) = server.requests
    form = dict(request.form())
    assert form["ContentSid"] == CONTENT_SID
    assert json.loads(form["ContentVariables"]) == {"1": "Ana", "2": "10:30", "10": "last"}
    assert form["MessagingServiceSid"] == "MG" + "c" * 32
    assert "From" not in form
    assert "Body" not in form
    assert_valid("twilio", request, host_url=HOST)


async def test_unmapped_template_or_param_mismatch_is_local(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        with pytest.raises(ConfigurationError, match="ContentSid"):
            await adapter(server, http).send(template_message(WA))
        a = adapter(server, http, templates={"appointmentReminder": CONTENT_SID},
                    templateParams={"appointmentReminder": 2})
        with pytest.raises(ConfigurationError, match="takes 2"):
            await a.send(template_message(WA))
    assert server.requests == []


@pytest.mark.parametrize(("status", "code", "expected"), ERROR_CASES, ids=ERROR_IDS)
async def test_error_classification(
    http: aiohttp.ClientSession, status: int, code: int | None, expected: type[ProviderError]
) -> None:
    async with CaptureServer() as server:
        body = twilio_error(code, status) if code is not None else "Too bad"
        server.respond(status, body, headers={"Retry-After": "4"})
        with pytest.raises(expected) as info:
            await adapter(server, http).send(text_message(WA))
    assert type(info.value) is expected
    assert info.value.code == (str(code) if code is not None else None)
    if status == 429:
        assert info.value.retry_after == 4  # type: ignore[attr-defined]
    assert len(server.requests) == 1
    assert_no_secret(info.value, info.value.to_dict())


async def test_63016_window_closed_carries_code(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(400, twilio_error(63016, 400, "Outside messaging window"))
        with pytest.raises(ComplianceError) as info:
            await adapter(server, http).send(text_message(WA))
    assert info.value.code == "63016"


async def test_probe_gets_the_account(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(200, {"sid": SID, "status": "active"})
        server.respond(401, twilio_error(20003, 401, "Authenticate"))
        a = adapter(server, http)
        await a.probe()
        with pytest.raises(ConfigurationError):
            await a.probe()
    assert server.requests[0].method == "GET"
    assert server.requests[0].path == f"/2010-04-01/Accounts/{SID}.json"
    assert_valid("twilio", server.requests[0], host_url=HOST)


def test_repr_never_shows_secrets() -> None:
    model = TwilioWhatsAppAdapter.credentials_model.model_validate(
        creds("http://x", "whatsapp:+15005550006")
    )
    a = TwilioWhatsAppAdapter(model, AdapterContext())
    assert_no_secret(a, model, model.public_dict())


def test_spec_rejects_a_malformed_request() -> None:
    """The validator really validates: no `To`, or a bad account path, fails."""
    from multidict import MultiDict

    from tests.support.http_capture import CapturedRequest

    ct = "application/x-www-form-urlencoded"
    bad = CapturedRequest("POST", f"/2010-04-01/Accounts/{SID}/Messages.json", MultiDict(),
                          {"Content-Type": ct, "Authorization": "Basic YTpi"},
                          b"From=whatsapp%3A%2B1&Body=x", ct)
    with pytest.raises(OpenAPIError):
        assert_valid("twilio", bad, host_url=HOST)


async def test_template_map_with_content_variables_and_status_callback(
    http: aiohttp.ClientSession,
) -> None:
    """`templates.otp = {contentSid, contentVariables}`: the request's named variables fill
    the Content template's numbered ones; a per-message StatusCallback rides along."""
    from dataclasses import replace

    entry = {"contentSid": CONTENT_SID, "contentVariables": {"1": "code", "2": "minutes"}}
    async with CaptureServer() as server:
        server.respond(201, created())
        a = adapter(server, http, templates={"otp": entry})
        message = replace(template_message(WA, name="otp",
                                           variables={"code": "482913", "minutes": "10"}),
                          status_callback="https://comms.example/api/v1/webhooks/twilio/c1")
        await a.send(message)
        with pytest.raises(ConfigurationError, match="needs variables"):
            await a.send(template_message(WA, name="otp", variables={"code": "1"}))
    (request,) = server.requests
    form = dict(request.form())
    assert form["ContentSid"] == CONTENT_SID
    assert json.loads(form["ContentVariables"]) == {"1": "482913", "2": "10"}
    assert form["StatusCallback"] == "https://comms.example/api/v1/webhooks/twilio/c1"
    assert "Body" not in form
    assert_valid("twilio", request, host_url=HOST)


def test_content_sid_must_look_like_one() -> None:
    from pydantic import ValidationError

    model = TwilioWhatsAppAdapter.credentials_model
    with pytest.raises(ValidationError):
        model.model_validate(creds("http://x", "whatsapp:+15005550006",
                                   templates={"otp": {"contentSid": "not-a-sid"}}))
