"""Meta WhatsApp webhooks: X-Hub-Signature-256, handshake, statuses and inbound messages."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime

import pytest

from clinicomm.providers.base import Channel
from clinicomm.providers.webhooks import (
    DeliveryEvent,
    EventType,
    InboundMessage,
    WebhookAuthError,
    WebhookNotConfiguredError,
    meta,
)
from clinicomm.providers.whatsapp.meta_business import MetaBusinessCredentials
from tests.support.webhooks import flip_byte, json_request, raw

URL = "https://hooks.example.com/api/v1/webhooks/meta_business/clinic-1"
SECRET = "app-secret-0123456789"
CREDS = MetaBusinessCredentials.model_validate(
    {"apiKey": "token", "phoneNumberId": "106540352242922", "appSecret": SECRET,
     "verifyToken": "verify-me"}
)


def signed(body: bytes, secret: str = SECRET, prefix: str = "sha256") -> dict[str, str]:
    algo = hashlib.sha256 if prefix == "sha256" else hashlib.sha1
    return {"X-Hub-Signature-256": f"{prefix}=" + hmac.new(secret.encode(), body, algo).hexdigest()}


async def test_valid_signature_is_accepted() -> None:
    body = raw("meta", "statuses.json")
    await meta.verify(json_request(URL, body, signed(body)), CREDS)


async def test_header_name_is_case_insensitive() -> None:
    body = raw("meta", "statuses.json")
    sig = signed(body)["X-Hub-Signature-256"]
    await meta.verify(json_request(URL, body, {"x-hub-signature-256": sig}), CREDS)


async def test_one_changed_byte_is_rejected() -> None:
    body = raw("meta", "statuses.json")
    with pytest.raises(WebhookAuthError):
        await meta.verify(json_request(URL, flip_byte(body), signed(body)), CREDS)


async def test_missing_signature_is_rejected() -> None:
    with pytest.raises(WebhookAuthError, match="missing"):
        await meta.verify(json_request(URL, raw("meta", "statuses.json")), CREDS)


async def test_sha1_prefix_is_rejected_even_when_correct() -> None:
    body = raw("meta", "statuses.json")
    headers = {"X-Hub-Signature-256": signed(body, prefix="sha1")["X-Hub-Signature-256"]}
    with pytest.raises(WebhookAuthError, match="sha256"):
        await meta.verify(json_request(URL, body, headers), CREDS)


async def test_wrong_secret_is_rejected() -> None:
    body = raw("meta", "statuses.json")
    with pytest.raises(WebhookAuthError):
        await meta.verify(json_request(URL, body, signed(body, "other")), CREDS)


async def test_no_app_secret_refuses_everything() -> None:
    creds = CREDS.model_copy(update={"app_secret": None})
    body = raw("meta", "statuses.json")
    with pytest.raises(WebhookNotConfiguredError):
        await meta.verify(json_request(URL, body, signed(body)), creds)


def test_handshake_echoes_challenge_only_for_the_right_token() -> None:
    query = {"hub.mode": "subscribe", "hub.verify_token": "verify-me", "hub.challenge": "1158201444"}
    assert meta.handshake(query, CREDS) == "1158201444"
    with pytest.raises(WebhookAuthError):
        meta.handshake({**query, "hub.verify_token": "nope"}, CREDS)
    with pytest.raises(WebhookAuthError):
        meta.handshake({**query, "hub.mode": "unsubscribe"}, CREDS)


def test_parse_statuses() -> None:
    events = meta.parse(json_request(URL, raw("meta", "statuses.json")))
    assert [e.event_type for e in events] == [
        EventType.READ, EventType.DELIVERED, EventType.FAILED, EventType.UNKNOWN,
    ]
    read = events[0]
    assert isinstance(read, DeliveryEvent)
    assert read.provider_message_id == "wamid.HBgLMTY1MDM4Nzk0MzkVAgARGBJDQjZCMzlEQUE4OTJBMTE4RTUA"
    assert read.event_id == read.provider_message_id + ":read"
    assert read.recipient == "+16505551234"  # wa_id → canonical E.164
    assert read.channel is Channel.WHATSAPP
    assert read.occurred_at == datetime.fromtimestamp(1750263773, UTC)
    failed = events[2]
    assert isinstance(failed, DeliveryEvent)
    assert failed.error is not None and failed.error["code"] == "131047"
    unknown = events[3]
    assert unknown.raw["status"] == "deleted"  # kept for the record


def test_parse_inbound_text() -> None:
    [event] = meta.parse(json_request(URL, raw("meta", "inbound_text.json")))
    assert isinstance(event, InboundMessage)
    assert event.sender == "+16505551234"
    assert event.text == "Stop"
    assert event.channel is Channel.WHATSAPP
    assert event.to == "15550783881"


async def test_event_of_another_number_or_waba_is_foreign() -> None:
    """Issue 13: the HMAC proves the app, not the clinic; the number (and the WABA when set)
    must be the clinic's own."""
    from clinicomm.providers.webhooks import ForeignEventError

    body = raw("meta", "statuses.json")
    other_number = CREDS.model_copy(update={"phone_number_id": "999999999999999"})
    with pytest.raises(ForeignEventError, match="phone_number_id"):
        await meta.verify(json_request(URL, body, signed(body)), other_number)
    other_waba = CREDS.model_copy(update={"business_account_id": "111111111111111"})
    with pytest.raises(ForeignEventError, match="Business Account"):
        await meta.verify(json_request(URL, body, signed(body)), other_waba)
    own_waba = CREDS.model_copy(update={"business_account_id": "102290129340398"})
    await meta.verify(json_request(URL, body, signed(body)), own_waba)
