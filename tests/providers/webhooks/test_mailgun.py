"""Mailgun: HMAC in the body, replay window, token reuse, event mapping."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime

import pytest

from clinicomm.providers.email.mailgun import MailgunCredentials
from clinicomm.providers.webhooks import DeliveryEvent, EventType, WebhookAuthError, mailgun
from tests.support.webhooks import context, flip_byte, json_request, load, raw

URL = "https://hooks.example.com/api/v1/webhooks/mailgun/clinic-1"
KEY = "key-webhook-signing-0123"
CREDS = MailgunCredentials.model_validate(
    {"apiKey": "key-x", "domain": "mg.example.com", "webhookSigningKey": KEY}
)
NOW = 1_700_000_000


def signed_body(name: str = "delivered.json", ts: int = NOW, token: str | None = None) -> bytes:
    data = load("mailgun", name)
    token = token or hashlib.sha256(f"{name}{ts}".encode()).hexdigest()[:50]
    sig = hmac.new(KEY.encode(), f"{ts}{token}".encode(), hashlib.sha256).hexdigest()
    data["signature"] = {"timestamp": str(ts), "token": token, "signature": sig}
    return json.dumps(data).encode()


def at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


async def test_valid_signature_is_accepted() -> None:
    await mailgun.verify(json_request(URL, signed_body()), CREDS, context(now=lambda: at(NOW + 5)))


async def test_changed_signature_byte_is_rejected() -> None:
    body = signed_body()
    i = body.index(b'"signature": "') + len(b'"signature": "') + 3
    with pytest.raises(WebhookAuthError):
        await mailgun.verify(json_request(URL, flip_byte(body, i)), CREDS, context(now=lambda: at(NOW)))


async def test_missing_signature_is_rejected() -> None:
    data = load("mailgun", "delivered.json")
    del data["signature"]
    with pytest.raises(WebhookAuthError, match="missing"):
        await mailgun.verify(json_request(URL, json.dumps(data).encode()), CREDS, context())


async def test_docs_signature_fails_with_our_key() -> None:
    # The fixture's own signature was made with Mailgun's example key, not ours.
    with pytest.raises(WebhookAuthError):
        await mailgun.verify(json_request(URL, raw("mailgun", "delivered.json")), CREDS,
                             context(now=lambda: at(1529006854)))


async def test_old_timestamp_is_rejected() -> None:
    ctx = context(now=lambda: at(NOW + 301))
    with pytest.raises(WebhookAuthError, match="older than"):
        await mailgun.verify(json_request(URL, signed_body()), CREDS, ctx)
    ahead = context(now=lambda: at(NOW - 61))
    with pytest.raises(WebhookAuthError, match="future"):
        await mailgun.verify(json_request(URL, signed_body()), CREDS, ahead)


async def test_reused_token_is_rejected() -> None:
    ctx = context(now=lambda: at(NOW))
    body = signed_body(token="t" * 50)
    await mailgun.verify(json_request(URL, body), CREDS, ctx)
    with pytest.raises(WebhookAuthError, match="already used"):
        await mailgun.verify(json_request(URL, body), CREDS, ctx)


def test_parse_delivered_and_permanent_failure() -> None:
    [ok] = mailgun.parse(json_request(URL, raw("mailgun", "delivered.json")))
    assert ok.event_type is EventType.DELIVERED
    assert ok.provider_message_id == "<20130503182626.18666.16540@sandbox.mailgun.org>"
    assert ok.event_id == "CPgfbmQMTCKtHW6uIWtuVe"
    [bad] = mailgun.parse(json_request(URL, raw("mailgun", "failed_permanent.json")))
    assert isinstance(bad, DeliveryEvent)
    assert bad.event_type is EventType.BOUNCED and bad.bounce_permanent is True
    assert bad.error == {"code": "605", "reason": "Not delivering to previously bounced address"}
    assert bad.recipient == "alice@example.com"


def test_unknown_event_is_kept() -> None:
    data = load("mailgun", "delivered.json")
    data["event-data"]["event"] = "list_member_uploaded"
    [event] = mailgun.parse(json_request(URL, json.dumps(data).encode()))
    assert event.event_type is EventType.UNKNOWN
    assert event.raw["event"] == "list_member_uploaded"
