"""Bird Channels API (provider `bird`, WhatsApp and SMS) and its webhooks, against a local
server. Bird publishes no OpenAPI file (tests/provider_specs/README.md): request shapes are
checked field by field against Bird's documented examples (docs.bird.com: "Send a message",
message type "Template", "Verifying a webhook subscription")."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest

from clinicomm.providers import registry
from clinicomm.providers.base import Channel
from clinicomm.providers.errors import (
    ConfigurationError,
    ProviderDownError,
    ProviderError,
    RateLimitedError,
    RecipientError,
    TransientError,
)
from clinicomm.providers.webhooks import EventType, InboundMessage, WebhookAuthError, bird
from tests.support.http_capture import CaptureServer
from tests.support.messaging import CANARY, PATIENT, build, template_message, text_message
from tests.support.webhooks import context, json_request, raw

WS, CH = "ws-0001", "ch-0002"


def creds(url: str, **extra: Any) -> dict[str, Any]:
    return {"accessKey": CANARY, "workspaceId": WS, "channelId": CH, "baseUrl": url,
            "templates": {"appointmentReminder": "proj-123"}, "signingKey": "sign-key", **extra}


@pytest.mark.parametrize("channel", [Channel.WHATSAPP, Channel.SMS])
def test_registered_on_both_channels(channel: Channel) -> None:
    assert registry.get(channel, "bird").adapter.key == "bird"


@pytest.mark.parametrize("channel", [Channel.WHATSAPP, Channel.SMS])
async def test_text_message(http: aiohttp.ClientSession, channel: Channel) -> None:
    adapter_cls = registry.get(channel, "bird").adapter
    async with CaptureServer() as server:
        server.respond(202, {"id": "msg-1", "status": "accepted"})
        result = await build(adapter_cls, creds(server.url), http).send(text_message(channel))
    assert (result.provider_message_id, result.provider_status) == ("msg-1", "accepted")
    (request,) = server.requests
    assert request.path == f"/workspaces/{WS}/channels/{CH}/messages"
    assert request.headers["Authorization"] == f"AccessKey {CANARY}"
    assert request.json() == {
        "receiver": {"contacts": [{"identifierValue": PATIENT}]},
        "reference": "dlv-123",
        "body": {"type": "text", "text": {"text": "Your appointment is at 10:30"}},
    }


async def test_template_by_project(http: aiohttp.ClientSession) -> None:
    adapter_cls = registry.get(Channel.WHATSAPP, "bird").adapter
    async with CaptureServer() as server:
        server.respond(202, {"id": "msg-2", "status": "accepted"})
        await build(adapter_cls, creds(server.url), http).send(
            template_message(Channel.WHATSAPP, variables={"name": "Ana", "time": "10:30"}))
        with pytest.raises(ConfigurationError, match="projectId"):
            await build(adapter_cls, creds(server.url), http).send(
                template_message(Channel.WHATSAPP, name="unknown"))
    body = server.requests[0].json()
    assert "body" not in body
    assert body["template"] == {
        "projectId": "proj-123", "version": "latest", "locale": "en_US",
        "parameters": [{"type": "string", "key": "name", "value": "Ana"},
                       {"type": "string", "key": "time", "value": "10:30"}],
    }


@pytest.mark.parametrize(("status", "body", "expected"), [
    (401, {"code": "Unauthorized", "message": "bad key"}, ConfigurationError),
    (404, {"code": "NotFound", "message": "channel not found"}, ConfigurationError),
    (402, {"code": "PaymentRequired", "message": "balance"}, ProviderDownError),
    (422, {"code": "InvalidPayload", "message": "receiver identifierValue invalid"},
     RecipientError),
    (429, {"code": "TooManyRequests", "message": "slow down"}, RateLimitedError),
    (503, {"code": "Unavailable", "message": "later"}, TransientError),
])
async def test_errors(http: aiohttp.ClientSession, status: int, body: Any,
                      expected: type[ProviderError]) -> None:
    adapter_cls = registry.get(Channel.SMS, "bird").adapter
    async with CaptureServer() as server:
        server.respond(status, body, headers={"Retry-After": "3"})
        with pytest.raises(ProviderError) as info:
            await build(adapter_cls, creds(server.url), http).send(text_message(Channel.SMS))
    assert isinstance(info.value, expected)
    assert CANARY not in str(info.value.to_dict())


def _signed(name: str, url: str, key: str = "sign-key", ts: str | None = None) -> Any:
    body = raw("bird", name)
    stamp = ts or str(int(time.time()))
    return json_request(url, body, {"messagebird-signature": bird.signature(key, stamp, url, body),
                                    "messagebird-request-timestamp": stamp})


async def test_webhook_signature() -> None:
    model = registry.get(Channel.SMS, "bird").credentials_model
    good = model.model_validate(creds("http://x"))
    url = "https://comms.example/api/v1/webhooks/bird/c1"
    await bird.verify(_signed("status_delivered.json", url), good, context())
    with pytest.raises(WebhookAuthError):
        await bird.verify(_signed("status_delivered.json", url, key="other"), good, context())
    elsewhere = _signed("status_delivered.json", url + "x")
    moved = json_request(url, elsewhere.body, dict(elsewhere.headers))
    with pytest.raises(WebhookAuthError):  # signed for another URL
        await bird.verify(moved, good, context())
    with pytest.raises(WebhookAuthError):  # stale
        await bird.verify(_signed("status_delivered.json", url, ts=str(int(time.time()) - 3600)),
                          good, context())


def test_webhook_parse() -> None:
    (status,) = bird.parse(json_request("https://x/", raw("bird", "status_delivered.json")))
    assert not isinstance(status, InboundMessage)
    assert status.event_type is EventType.DELIVERED
    assert status.provider_message_id == "9f6c2a1e-3b1d-4c3a-9d2e-1a2b3c4d5e6f"
    assert status.recipient == PATIENT and status.channel is Channel.WHATSAPP
    (inbound,) = bird.parse(json_request("https://x/", raw("bird", "inbound_stop.json")))
    assert isinstance(inbound, InboundMessage)
    assert inbound.sender == PATIENT and inbound.text == "STOP" and inbound.channel is Channel.SMS
