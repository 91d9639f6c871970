"""MessageBird WhatsApp adapter: request shapes are those of the official Go SDK fixtures."""

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
from clinicomm.providers.whatsapp.messagebird import MessageBirdWhatsAppAdapter
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

WA = Channel.WHATSAPP


def fixture(name: str) -> Any:
    return json.loads((specs_dir() / "messagebird" / name).read_text())


SEND_RESPONSE = fixture("conversation-messageSendResponse.json")


def as_send_request(start_request: dict[str, Any]) -> dict[str, Any]:
    """/v1/send names the channel `from` where /v1/conversations/start says `channelId`."""
    shaped = dict(start_request)
    shaped["from"] = shaped.pop("channelId")
    return shaped


def creds(url: str, **extra: Any) -> dict[str, Any]:
    return {"accessKey": CANARY, "signingKey": CANARY, "channelId": "chid", "baseUrl": url,
            "templateNamespace": "ns", "templates": {"appointmentReminder": "appt_reminder"},
            **extra}


def adapter(server: CaptureServer, http: aiohttp.ClientSession,
            **extra: Any) -> MessageBirdWhatsAppAdapter:
    made = build(MessageBirdWhatsAppAdapter, creds(server.url, **extra), http)
    assert isinstance(made, MessageBirdWhatsAppAdapter)
    return made


def test_registered() -> None:
    assert registry.get(WA, "messagebird").adapter is MessageBirdWhatsAppAdapter


async def test_text_message_has_the_fixture_shape(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(202, SEND_RESPONSE)
        result = await adapter(server, http).send(text_message(WA))
    assert result.provider_message_id == SEND_RESPONSE["id"]
    assert result.provider_status == "accepted"
    (request,) = server.requests
    assert request.method == "POST"
    assert request.path == "/v1/send"
    assert request.headers["Authorization"] == f"AccessKey {CANARY}"
    body = request.json()
    same_shape(body, as_send_request(fixture("conversation-conversationStartTextRequest.json")))
    assert body == {"to": "14155552671", "from": "chid", "type": "text",
                    "content": {"text": "Your appointment is at 10:30"}}


async def test_hsm_template_has_the_fixture_shape(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(202, SEND_RESPONSE)
        await adapter(server, http).send(template_message(WA))
    body = server.requests[0].json()
    same_shape(body, as_send_request(fixture("conversation-conversationStartHsmRequest.json")))
    assert body["type"] == "hsm"
    assert body["content"]["hsm"] == {
        "namespace": "ns",
        "templateName": "appt_reminder",
        "language": {"policy": "deterministic", "code": "en_US"},
        "params": [{"default": "Ana"}, {"default": "10:30"}, {"default": "last"}],
    }


def test_shape_check_catches_a_wrong_shape() -> None:
    expected = as_send_request(fixture("conversation-conversationStartTextRequest.json"))
    with pytest.raises(AssertionError):
        same_shape({"to": "1", "from": "c", "type": "text", "content": {"body": "x"}}, expected)
    with pytest.raises(AssertionError):
        same_shape({"to": 1, "from": "c", "type": "text", "content": {"text": "x"}}, expected)


async def test_template_checks_are_local(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        with pytest.raises(ConfigurationError, match="takes 1"):
            await adapter(server, http, templateParams={"appt_reminder": 1}).send(
                template_message(WA)
            )
        with pytest.raises(ConfigurationError, match="templateNamespace"):
            await adapter(server, http, templateNamespace=None).send(template_message(WA))
        with pytest.raises(ConfigurationError, match="channelId"):
            await adapter(server, http, channelId=None).send(text_message(WA))
    assert server.requests == []


def mb_error(code: int, description: str, parameter: str | None) -> dict[str, Any]:
    return {"errors": [{"code": code, "description": description, "parameter": parameter}]}


ERROR_CASES: list[tuple[int, Any, type[ProviderError]]] = [
    (401, mb_error(2, "Request not allowed (incorrect access_key)", None), ConfigurationError),
    (422, mb_error(21, "to is not a valid msisdn", "to"), RecipientError),
    (422, mb_error(21, "channelId is invalid", "from"), ConfigurationError),
    (429, mb_error(98, "too many requests", None), RateLimitedError),
    (402, mb_error(25, "Not enough balance", None), ProviderDownError),
    (500, mb_error(99, "internal error", None), TransientError),
    (503, "Service Unavailable", TransientError),
]


@pytest.mark.parametrize(("status", "body", "expected"), ERROR_CASES,
                         ids=[f"{c[0]}-{c[2].__name__}" for c in ERROR_CASES])
async def test_error_classification(
    http: aiohttp.ClientSession, status: int, body: Any, expected: type[ProviderError]
) -> None:
    async with CaptureServer() as server:
        server.respond(status, body, headers={"Retry-After": "5"})
        with pytest.raises(expected) as info:
            await adapter(server, http).send(text_message(WA))
    assert type(info.value) is expected
    if status == 429:
        assert info.value.retry_after == 5  # type: ignore[attr-defined]
    assert len(server.requests) == 1
    assert_no_secret(info.value, info.value.to_dict())


async def test_probe_lists_conversations(http: aiohttp.ClientSession) -> None:
    async with CaptureServer() as server:
        server.respond(200, {"offset": 0, "limit": 1, "count": 0, "totalCount": 0, "items": []})
        server.respond(401, mb_error(2, "Request not allowed", None))
        a = adapter(server, http)
        await a.probe()
        with pytest.raises(ConfigurationError):
            await a.probe()
    assert server.requests[0].method == "GET"
    assert server.requests[0].path == "/v1/conversations"


def test_repr_never_shows_secrets() -> None:
    model = MessageBirdWhatsAppAdapter.credentials_model.model_validate(creds("http://x"))
    assert_no_secret(MessageBirdWhatsAppAdapter(model, AdapterContext()), model,
                     model.public_dict())
