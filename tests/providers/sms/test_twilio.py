"""Twilio SMS adapter against a local server and Twilio's official v2010 spec."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from clinicomm.providers import registry
from clinicomm.providers.base import AdapterContext, Channel
from clinicomm.providers.errors import ComplianceError, ConfigurationError, ProviderError
from clinicomm.providers.shared.http import basic_auth
from clinicomm.providers.sms.twilio import TwilioSmsAdapter
from tests.providers.twilio_cases import (
    ERROR_CASES,
    ERROR_IDS,
    MESSAGE_SID,
    SID,
    created,
    creds,
    twilio_error,
)
from tests.support.http_capture import CaptureServer
from tests.support.messaging import CANARY, PATIENT, assert_no_secret, build, text_message
from tests.support.specs import assert_valid

SMS = Channel.SMS
HOST = "https://api.twilio.com"


def adapter(server: CaptureServer, http: aiohttp.ClientSession, frm: str = "+15005550006",
            **extra: Any) -> TwilioSmsAdapter:
    made = build(TwilioSmsAdapter, creds(server.url, frm, **extra), http)
    assert isinstance(made, TwilioSmsAdapter)
    return made


def test_registered() -> None:
    assert registry.get(SMS, "twilio").adapter is TwilioSmsAdapter


async def test_sms_matches_the_official_spec(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(201, created("accepted"))
        result = await adapter(server, http).send(text_message(SMS))
    assert result.provider_message_id == MESSAGE_SID
    assert result.provider_status == "accepted"
    (request,) = server.requests
    assert request.path == f"/2010-04-01/Accounts/{SID}/Messages.json"
    assert request.headers["Authorization"] == basic_auth(SID, CANARY)["Authorization"]
    assert dict(request.form()) == {"To": PATIENT, "From": "+15005550006",
                                    "Body": "Your appointment is at 10:30"}
    assert_valid("twilio", request, host_url=HOST)


async def test_messaging_service_replaces_from(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(201, created())
        model = TwilioSmsAdapter.credentials_model.model_validate(
            {"accountSid": SID, "authToken": CANARY, "messagingServiceSid": "MG" + "1" * 32,
             "baseUrl": server.url}
        )
        await TwilioSmsAdapter(model, AdapterContext(http=http)).send(text_message(SMS))
    form = dict(server.requests[0].form())
    assert form["MessagingServiceSid"] == "MG" + "1" * 32
    assert "From" not in form
    assert_valid("twilio", server.requests[0], host_url=HOST)


async def test_whatsapp_sender_for_sms_is_configuration(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        with pytest.raises(ConfigurationError):
            await adapter(server, http, frm="whatsapp:+15005550006").send(text_message(SMS))
        with pytest.raises(ConfigurationError):  # nothing to send
            await adapter(server, http).send(text_message(SMS, text=""))
    assert server.requests == []


@pytest.mark.parametrize(("status", "code", "expected"), ERROR_CASES, ids=ERROR_IDS)
async def test_error_classification(
    http: aiohttp.ClientSession, status: int, code: int | None, expected: type[ProviderError]
) -> None:
    async with CaptureServer() as server:
        body = twilio_error(code, status) if code is not None else ""
        server.respond(status, body, headers={"Retry-After": "2"})
        with pytest.raises(expected) as info:
            await adapter(server, http).send(text_message(SMS))
    assert type(info.value) is expected
    if status == 429:
        assert info.value.retry_after == 2  # type: ignore[attr-defined]
    assert len(server.requests) == 1
    assert_no_secret(info.value, info.value.to_dict())


async def test_21610_opt_out_is_compliance_with_code(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(400, twilio_error(21610, 400,
                                         f"Attempt to send to unsubscribed recipient {PATIENT}"))
        with pytest.raises(ComplianceError) as info:
            await adapter(server, http).send(text_message(SMS))
    assert info.value.code == "21610"
    assert PATIENT not in (info.value.detail or "")


async def test_probe(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(200, {"sid": SID})
        await adapter(server, http).probe()
    assert server.requests[0].path == f"/2010-04-01/Accounts/{SID}.json"


def test_repr_never_shows_secrets() -> None:
    model = TwilioSmsAdapter.credentials_model.model_validate(creds("http://x", "+15005550006"))
    assert_no_secret(TwilioSmsAdapter(model, AdapterContext()), model, model.public_dict())
