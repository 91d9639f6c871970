"""MessageBird SMS adapter: REST SMS API, answer shaped as the official SDK's fixture."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from clinicomm.providers import registry
from clinicomm.providers.base import AdapterContext, Channel
from clinicomm.providers.errors import (
    ConfigurationError,
    ProviderDownError,
    ProviderError,
    RateLimitedError,
    RecipientError,
    TransientError,
)
from clinicomm.providers.sms.messagebird import MessageBirdSmsAdapter
from tests.support.http_capture import CaptureServer
from tests.support.messaging import (
    CANARY,
    assert_no_secret,
    build,
    same_shape,
    template_message,
    text_message,
)
from tests.support.specs import specs_dir

SMS = Channel.SMS
MESSAGE_OBJECT = json.loads((specs_dir() / "messagebird" / "sms-messageObject.json").read_text())
NOT_FOUND = json.loads((specs_dir() / "messagebird" / "sms-messageNotFound.json").read_text())

# The request is what the fixture's message object was created from: the fixture's keys
# `originator` and `body` as they are, `recipients` as the list of msisdns it expands.
REQUEST_SHAPE = {
    "originator": MESSAGE_OBJECT["originator"],
    "body": MESSAGE_OBJECT["body"],
    "recipients": ["31612345678"],
    "reference": "ref",
}


def creds(url: str, **extra: Any) -> dict[str, Any]:
    return {"accessKey": CANARY, "originator": "Clinic", "baseUrl": url, **extra}


def adapter(server: CaptureServer, http: aiohttp.ClientSession,
            **extra: Any) -> MessageBirdSmsAdapter:
    made = build(MessageBirdSmsAdapter, creds(server.url, **extra), http)
    assert isinstance(made, MessageBirdSmsAdapter)
    return made


def test_registered() -> None:
    assert registry.get(SMS, "messagebird").adapter is MessageBirdSmsAdapter


async def test_sms_request_and_fixture_answer(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(201, MESSAGE_OBJECT)
        result = await adapter(server, http).send(text_message(SMS))
    assert result.provider_message_id == MESSAGE_OBJECT["id"]
    (request,) = server.requests
    assert request.path == "/messages"
    assert request.headers["Authorization"] == f"AccessKey {CANARY}"
    body = request.json()
    same_shape(body, REQUEST_SHAPE)
    assert body == {"originator": "Clinic", "recipients": ["14155552671"],
                    "body": "Your appointment is at 10:30", "reference": "dlv-123"}
    # The answer's recipient is the same number, as MessageBird echoes it.
    assert str(MESSAGE_OBJECT["recipients"]["items"][0]["recipient"]).isdigit()


async def test_local_refusals(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        with pytest.raises(ConfigurationError, match="originator"):
            await adapter(server, http, originator=None).send(text_message(SMS))
        with pytest.raises(ConfigurationError):
            await adapter(server, http).send(template_message(SMS))
        with pytest.raises(RecipientError):
            await adapter(server, http).send(text_message(SMS, to="+0123456"))
    assert server.requests == []


ERROR_CASES: list[tuple[int, Any, type[ProviderError]]] = [
    (401, {"errors": [{"code": 2, "description": "Request not allowed", "parameter": None}]},
     ConfigurationError),
    (422, {"errors": [{"code": 9, "description": "no (correct) recipients found",
                       "parameter": "recipients"}]}, RecipientError),
    (422, {"errors": [{"code": 9, "description": "originator is invalid",
                       "parameter": "originator"}]}, ConfigurationError),
    (429, {"errors": [{"code": 98, "description": "Too many requests", "parameter": None}]},
     RateLimitedError),
    (422, {"errors": [{"code": 25, "description": "Not enough balance", "parameter": None}]},
     ProviderDownError),
    (404, NOT_FOUND, ConfigurationError),
    (500, "oops", TransientError),
]


@pytest.mark.parametrize(("status", "body", "expected"), ERROR_CASES,
                         ids=[f"{c[0]}-{c[2].__name__}" for c in ERROR_CASES])
async def test_error_classification(
    http: aiohttp.ClientSession, status: int, body: Any, expected: type[ProviderError]
) -> None:
    async with CaptureServer() as server:
        server.respond(status, body, headers={"Retry-After": "9"})
        with pytest.raises(expected) as info:
            await adapter(server, http).send(text_message(SMS))
    assert type(info.value) is expected
    if status == 429:
        assert info.value.retry_after == 9  # type: ignore[attr-defined]
    assert len(server.requests) == 1


async def test_probe_reads_balance(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(200, {"payment": "prepaid", "type": "credits", "amount": 10})
        await adapter(server, http).probe()
    assert (server.requests[0].method, server.requests[0].path) == ("GET", "/balance")


def test_repr_never_shows_secrets() -> None:
    model = MessageBirdSmsAdapter.credentials_model.model_validate(
        creds("http://x", signingKey=CANARY)
    )
    assert_no_secret(MessageBirdSmsAdapter(model, AdapterContext()), model, model.public_dict())
