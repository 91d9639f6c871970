"""MessageBird: MessageBird-Signature-JWT against MessageBird's own test vectors; payloads."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

import jwt
import pytest

from clinicomm.providers.base import Channel
from clinicomm.providers.shared.credentials import MessageBirdCredentials
from clinicomm.providers.webhooks import (
    DeliveryEvent,
    EventType,
    InboundMessage,
    WebhookAuthError,
    WebhookRequest,
    messagebird,
)
from tests.support.webhooks import context, flip_byte, json_request, load, raw

VECTORS = load("messagebird", "jwt_vectors.json")
NOW = datetime.fromisoformat(VECTORS["timestamp"])
CREDS = MessageBirdCredentials.model_validate(
    {"accessKey": "live_x", "channelId": "619747f6", "signingKey": VECTORS["secret"]}
)
URL = "https://hooks.example.com/api/v1/webhooks/messagebird/clinic-1"


def vector_request(case: dict[str, Any]) -> WebhookRequest:
    body = case.get("payload", "").encode()
    return WebhookRequest.build(
        case["url"], case["method"], {"MessageBird-Signature-JWT": case["token"]}, body
    )


@pytest.mark.parametrize("case", VECTORS["vectors"], ids=lambda c: c["name"])
async def test_messagebird_published_vectors(case: dict[str, Any]) -> None:
    ctx = context(now=lambda: NOW)
    if case["valid"]:
        await messagebird.verify(vector_request(case), CREDS, ctx)
    else:
        with pytest.raises(WebhookAuthError):
            await messagebird.verify(vector_request(case), CREDS, ctx)


def sign(url: str, body: bytes, key: str = VECTORS["secret"]) -> dict[str, str]:
    now = int(NOW.timestamp())
    claims: dict[str, Any] = {"iss": "MessageBird", "nbf": now, "exp": now + 60, "jti": "x",
                              "url_hash": hashlib.sha256(url.encode()).hexdigest()}
    if body:
        claims["payload_hash"] = hashlib.sha256(body).hexdigest()
    return {"MessageBird-Signature-JWT": jwt.encode(claims, key, algorithm="HS256")}


async def test_fixture_valid_changed_missing() -> None:
    body = raw("messagebird", "conversation_status.json")
    ctx = context(now=lambda: NOW)
    await messagebird.verify(json_request(URL, body, sign(URL, body)), CREDS, ctx)
    with pytest.raises(WebhookAuthError, match="payload_hash"):
        await messagebird.verify(json_request(URL, flip_byte(body), sign(URL, body)), CREDS, ctx)
    with pytest.raises(WebhookAuthError, match="url_hash"):
        await messagebird.verify(json_request(URL + "x", body, sign(URL, body)), CREDS, ctx)
    with pytest.raises(WebhookAuthError, match="missing"):
        await messagebird.verify(json_request(URL, body), CREDS, ctx)


def test_parse_status_inbound_and_sms_report() -> None:
    [status] = messagebird.parse(json_request(URL, raw("messagebird", "conversation_status.json")))
    assert isinstance(status, DeliveryEvent)
    assert status.event_type is EventType.DELIVERED and status.channel is Channel.WHATSAPP
    assert status.provider_message_id == "ddb150149e2c4036a48f581544e22cfe"
    assert status.recipient == "+31612345678"
    [inbound] = messagebird.parse(json_request(URL, raw("messagebird", "conversation_inbound.json")))
    assert isinstance(inbound, InboundMessage)
    assert inbound.text == "UNSTOP" and inbound.sender == "+31612345678"
    # SMS status report as a GET (the ruby SDK's example query).
    report_url = (URL + "?recipient=31612345678&reference=FOO&statusDatetime=2019-01-11T09%3A17%3A11%2B00%3A00"
                  "&id=eef0ab57a9e049be946f3821568c2b2e&status=delivered&mccmnc=20408&ported=1")
    [sms] = messagebird.parse(WebhookRequest.build(report_url, "GET"))
    assert sms.event_type is EventType.DELIVERED and sms.channel is Channel.SMS
    assert sms.provider_message_id == "eef0ab57a9e049be946f3821568c2b2e"


def test_unknown_status_is_kept() -> None:
    data = load("messagebird", "conversation_status.json")
    data["message"]["status"] = "clicked_somewhere"
    [event] = messagebird.parse(json_request(URL, json.dumps(data).encode()))
    assert event.event_type is EventType.UNKNOWN
    assert event.raw["message"]["status"] == "clicked_somewhere"
