"""Vonage WhatsApp adapter against the Messages API v1 spec (with the required-fix patch)."""

from __future__ import annotations

from typing import Any

import aiohttp
import jwt
import pytest
from openapi_core.exceptions import OpenAPIError

from clinicomm.providers import registry
from clinicomm.providers.base import AdapterContext, Channel
from clinicomm.providers.errors import ConfigurationError, ProviderError
from clinicomm.providers.shared.http import basic_auth
from clinicomm.providers.whatsapp.vonage import VonageWhatsAppAdapter
from tests.providers.vonage_cases import (
    APP_ID,
    ERROR_CASES,
    ERROR_IDS,
    HOST,
    PUBLIC_PEM,
    SPEC_PATH,
    UUID,
    basic_creds,
    jwt_creds,
)
from tests.support.http_capture import CaptureServer
from tests.support.messaging import (
    CANARY,
    assert_no_secret,
    build,
    template_message,
    text_message,
)
from tests.support.specs import assert_valid

WA = Channel.WHATSAPP


def adapter(server: CaptureServer, http: aiohttp.ClientSession, *, use_jwt: bool = False,
            **extra: Any) -> VonageWhatsAppAdapter:
    make = jwt_creds if use_jwt else basic_creds
    made = build(VonageWhatsAppAdapter, make(server.url, **extra), http)
    assert isinstance(made, VonageWhatsAppAdapter)
    return made


def test_registered() -> None:
    assert registry.get(WA, "vonage").adapter is VonageWhatsAppAdapter


async def test_text_with_basic_auth_matches_the_spec(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(202, {"message_uuid": UUID})
        result = await adapter(server, http).send(text_message(WA))
    assert result.provider_message_id == UUID
    (request,) = server.requests
    assert request.path == "/v1/messages"
    assert request.headers["Authorization"] == basic_auth("abcd1234", CANARY)["Authorization"]
    assert request.json() == {
        "message_type": "text", "channel": "whatsapp", "to": "14155552671",
        "from": "447700900001", "text": "Your appointment is at 10:30", "client_ref": "dlv-123",
    }
    assert_valid("vonage-messages", request, host_url=HOST, path=SPEC_PATH)


async def test_template_with_jwt_matches_the_spec(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(202, {"message_uuid": UUID}, times=2)
        a = adapter(server, http, use_jwt=True, templates={"appointmentReminder": "ns:appt"})
        await a.send(template_message(WA))
        await a.send(template_message(WA))
    request = server.requests[0]
    body = request.json()
    assert body["message_type"] == "template"
    assert body["template"] == {"name": "ns:appt", "parameters": ["Ana", "10:30", "last"]}
    assert body["whatsapp"] == {"policy": "deterministic", "locale": "en_US"}
    scheme, token = request.headers["Authorization"].split(" ", 1)
    assert scheme == "Bearer"
    claims = jwt.decode(token, PUBLIC_PEM, algorithms=["RS256"])
    assert claims["application_id"] == APP_ID
    assert claims["exp"] > claims["iat"]
    # The token is reused, not signed per message.
    assert server.requests[1].headers["Authorization"] == request.headers["Authorization"]
    assert_valid("vonage-messages", request, host_url=HOST, path=SPEC_PATH)


async def test_template_param_mismatch_is_local(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        a = adapter(server, http, templateParams={"appointmentReminder": 5})
        with pytest.raises(ConfigurationError, match="takes 5"):
            await a.send(template_message(WA))
    assert server.requests == []


async def test_bad_private_key_is_configuration_without_leaking(
    http: aiohttp.ClientSession,
) -> None:
    async with CaptureServer() as server:
        a = adapter(server, http, use_jwt=True, privateKey=CANARY)
        with pytest.raises(ConfigurationError) as info:
            await a.send(text_message(WA))
    assert server.requests == []
    assert_no_secret(info.value, info.value.to_dict())


@pytest.mark.parametrize(("status", "body", "expected"), ERROR_CASES, ids=ERROR_IDS)
async def test_error_classification(
    http: aiohttp.ClientSession, status: int, body: Any, expected: type[ProviderError]
) -> None:
    async with CaptureServer() as server:
        server.respond(status, body, headers={"Retry-After": "6"})
        with pytest.raises(expected) as info:
            await adapter(server, http).send(text_message(WA))
    assert type(info.value) is expected
    if status == 429:
        assert info.value.retry_after == 6  # type: ignore[attr-defined]
    assert len(server.requests) == 1
    assert_no_secret(info.value, info.value.to_dict())


async def test_probe(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(200, {"value": 10.5, "autoReload": False})
        server.respond(401, {"title": "unauthorized"})
        a = adapter(server, http)
        await a.probe()
        with pytest.raises(ConfigurationError):
            await a.probe()
        await adapter(server, http, use_jwt=True).probe()  # local key check, no call
    assert [r.path for r in server.requests] == ["/account/get-balance"] * 2


def test_repr_never_shows_secrets() -> None:
    for make in (basic_creds, jwt_creds):
        model = VonageWhatsAppAdapter.credentials_model.model_validate(
            make("http://x", apiSecret=CANARY, privateKey=CANARY, apiKey="k", applicationId="a")
        )
        assert_no_secret(VonageWhatsAppAdapter(model, AdapterContext()), model,
                         model.public_dict())


def test_spec_rejects_a_malformed_request() -> None:
    """The validator really validates: a WhatsApp text without `text` fails."""
    from multidict import MultiDict

    from tests.support.http_capture import CapturedRequest

    bad = CapturedRequest("POST", "/v1/messages", MultiDict(),
                          {"Content-Type": "application/json", "Authorization": "Basic YTpi"},
                          b'{"message_type":"text","channel":"whatsapp","to":"14155552671",'
                          b'"from":"447700900001"}', "application/json")
    with pytest.raises(OpenAPIError):
        assert_valid("vonage-messages", bad, host_url=HOST, path=SPEC_PATH)
