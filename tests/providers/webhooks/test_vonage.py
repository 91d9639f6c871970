"""Vonage Messages API: signed JWT webhooks (HS256 + payload_hash), status and inbound."""

from __future__ import annotations

import hashlib
import time

import jwt
import pytest

from clinicomm.providers.base import Channel
from clinicomm.providers.shared.credentials import VonageCredentials
from clinicomm.providers.webhooks import (
    DeliveryEvent,
    EventType,
    InboundMessage,
    WebhookAuthError,
    vonage,
)
from tests.support.webhooks import flip_byte, json_request, raw

URL = "https://hooks.example.com/api/v1/webhooks/vonage/clinic-1"
SECRET = "vonage-signature-secret-0123456789abcdef"
CREDS = VonageCredentials.model_validate(
    {"apiKey": "abcd1234", "apiSecret": "x", "fromNumber": "447700900001", "signatureSecret": SECRET}
)


def bearer(body: bytes, secret: str = SECRET, with_hash: bool = True) -> dict[str, str]:
    claims = {"iat": int(time.time()), "jti": "c5ba8f24-1a14-4c10-bfdf-3fbe8ce511b5",
              "iss": "Vonage", "api_key": "abcd1234", "application_id": "aaaaaaaa-bbbb-cccc"}
    if with_hash:
        claims["payload_hash"] = hashlib.sha256(body).hexdigest()
    return {"Authorization": "Bearer " + jwt.encode(claims, secret, algorithm="HS256")}


async def test_valid_jwt_is_accepted() -> None:
    body = raw("vonage", "status_read.json")
    await vonage.verify(json_request(URL, body, bearer(body)), CREDS)


async def test_jwt_without_payload_hash_is_refused() -> None:
    """Issue 13: without payload_hash the JWT does not cover the body (any body would pass)."""
    body = raw("vonage", "status_read.json")
    with pytest.raises(WebhookAuthError, match="payload_hash"):
        await vonage.verify(json_request(URL, body, bearer(body, with_hash=False)), CREDS)


async def test_changed_byte_is_rejected() -> None:
    body = raw("vonage", "status_read.json")
    with pytest.raises(WebhookAuthError, match="payload_hash"):
        await vonage.verify(json_request(URL, flip_byte(body), bearer(body)), CREDS)


async def test_missing_or_foreign_jwt_is_rejected() -> None:
    body = raw("vonage", "status_read.json")
    with pytest.raises(WebhookAuthError, match="missing"):
        await vonage.verify(json_request(URL, body), CREDS)
    with pytest.raises(WebhookAuthError):
        await vonage.verify(json_request(URL, body, bearer(body, "another-secret-of-32-bytes-long!")), CREDS)
    none_alg = jwt.encode({"iat": 1}, None, algorithm="none")
    with pytest.raises(WebhookAuthError):
        await vonage.verify(json_request(URL, body, {"Authorization": f"Bearer {none_alg}"}), CREDS)


def test_parse_status_inbound_and_error() -> None:
    [read] = vonage.parse(json_request(URL, raw("vonage", "status_read.json")))
    assert isinstance(read, DeliveryEvent)
    assert read.event_type is EventType.READ and read.channel is Channel.WHATSAPP
    assert read.recipient == "+447700900000"
    assert read.event_id == "aaaaaaaa-bbbb-4ccc-8ddd-0123456789ab:read:2025-02-03T12:14:25Z"
    [rejected] = vonage.parse(json_request(URL, raw("vonage", "status_rejected.json")))
    assert isinstance(rejected, DeliveryEvent)
    assert rejected.event_type is EventType.FAILED and rejected.channel is Channel.SMS
    assert rejected.error == {"code": "1300", "reason": "Not part of the provider network"}
    [inbound] = vonage.parse(json_request(URL, raw("vonage", "inbound_text.json")))
    assert isinstance(inbound, InboundMessage)
    assert inbound.sender == "+447700900001" and inbound.text == "Hello there"


def test_unknown_status_is_kept() -> None:
    body = raw("vonage", "status_read.json").replace(b'"read"', b'"accepted_by_carrier"')
    [event] = vonage.parse(json_request(URL, body))
    assert event.event_type is EventType.UNKNOWN
    assert event.raw["status"] == "accepted_by_carrier"


def _jwt(body: bytes, **claims: object) -> dict[str, str]:
    base: dict[str, object] = {"iat": int(time.time()), "payload_hash": hashlib.sha256(body).hexdigest()}
    base.update(claims)
    return {"Authorization": "Bearer " + jwt.encode(base, SECRET, algorithm="HS256")}


async def test_replayed_jwt_is_refused() -> None:
    """Issue 13 finding 3: a JWT with an `iat` from 2001 was accepted; now stale is refused,
    and so is one dated more than 60 s ahead."""
    body = raw("vonage", "status_read.json")
    with pytest.raises(WebhookAuthError, match="older than"):
        await vonage.verify(json_request(URL, body, _jwt(body, iat=978307200)), CREDS)
    with pytest.raises(WebhookAuthError, match="future"):
        await vonage.verify(json_request(URL, body, _jwt(body, iat=int(time.time()) + 120)), CREDS)


async def test_foreign_api_key_or_application_is_foreign() -> None:
    from clinicomm.providers.shared.credentials import VonageCredentials
    from clinicomm.providers.webhooks import ForeignEventError

    body = raw("vonage", "status_read.json")
    own = VonageCredentials.model_validate(
        {"apiKey": "abcd1234", "apiSecret": "s", "applicationId": "app-own",
         "privateKey": "k", "signatureSecret": SECRET, "fromNumber": "+15550100"}
    )
    await vonage.verify(json_request(URL, body, _jwt(body, api_key="abcd1234")), own)
    with pytest.raises(ForeignEventError):
        await vonage.verify(json_request(URL, body, _jwt(body, api_key="other-key")), own)
    with pytest.raises(ForeignEventError):
        await vonage.verify(json_request(URL, body, _jwt(body, application_id="app-x")), own)
