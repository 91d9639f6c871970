"""Vonage SMS adapter: Messages API v1 (`channel: sms`), validated against its spec."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from clinicomm.providers import registry
from clinicomm.providers.base import AdapterContext, Channel
from clinicomm.providers.errors import ConfigurationError, ProviderError
from clinicomm.providers.sms.vonage import VonageSmsAdapter
from tests.providers.vonage_cases import (
    ERROR_CASES,
    ERROR_IDS,
    HOST,
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

SMS = Channel.SMS


def adapter(server: CaptureServer, http: aiohttp.ClientSession, *, use_jwt: bool = False,
            **extra: Any) -> VonageSmsAdapter:
    make = jwt_creds if use_jwt else basic_creds
    made = build(VonageSmsAdapter, make(server.url, **extra), http)
    assert isinstance(made, VonageSmsAdapter)
    return made


def test_registered() -> None:
    assert registry.get(SMS, "vonage").adapter is VonageSmsAdapter


@pytest.mark.parametrize("use_jwt", [False, True], ids=["basic", "jwt"])
async def test_sms_matches_the_spec(http: aiohttp.ClientSession, use_jwt: bool) -> None:
    async with CaptureServer() as server:
        server.respond(202, {"message_uuid": UUID})
        result = await adapter(server, http, use_jwt=use_jwt).send(text_message(SMS))
    assert result.provider_message_id == UUID
    (request,) = server.requests
    assert request.json() == {
        "message_type": "text", "channel": "sms", "to": "14155552671", "from": "447700900001",
        "text": "Your appointment is at 10:30", "client_ref": "dlv-123",
    }
    assert request.headers["Authorization"].startswith("Bearer " if use_jwt else "Basic ")
    assert_valid("vonage-messages", request, host_url=HOST, path=SPEC_PATH)


async def test_alphanumeric_sender_passes_unchanged(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(202, {"message_uuid": UUID})
        await adapter(server, http, fromNumber="Clinic").send(text_message(SMS))
    assert server.requests[0].json()["from"] == "Clinic"
    assert_valid("vonage-messages", server.requests[0], host_url=HOST, path=SPEC_PATH)


async def test_template_is_refused_locally(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        with pytest.raises(ConfigurationError):
            await adapter(server, http).send(template_message(SMS))
    assert server.requests == []


@pytest.mark.parametrize(("status", "body", "expected"), ERROR_CASES, ids=ERROR_IDS)
async def test_error_classification(
    http: aiohttp.ClientSession, status: int, body: Any, expected: type[ProviderError]
) -> None:
    async with CaptureServer() as server:
        server.respond(status, body, headers={"Retry-After": "6"})
        with pytest.raises(expected) as info:
            await adapter(server, http).send(text_message(SMS))
    assert type(info.value) is expected
    if status == 429:
        assert info.value.retry_after == 6  # type: ignore[attr-defined]
    assert len(server.requests) == 1


def test_repr_never_shows_secrets() -> None:
    model = VonageSmsAdapter.credentials_model.model_validate(
        jwt_creds("http://x", apiKey="k", apiSecret=CANARY, privateKey=CANARY)
    )
    assert_no_secret(VonageSmsAdapter(model, AdapterContext()), model, model.public_dict())
