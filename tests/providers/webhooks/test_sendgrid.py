"""SendGrid signed Event Webhook (ECDSA P-256) and event mapping."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from clinicomm.providers.email.sendgrid import SendGridCredentials
from clinicomm.providers.webhooks import (
    DeliveryEvent,
    EventType,
    WebhookAuthError,
    WebhookNotConfiguredError,
    sendgrid,
)
from tests.support.webhooks import context, flip_byte, json_request, load, raw

URL = "https://hooks.example.com/api/v1/webhooks/sendgrid/clinic-1"
VECTOR = load("sendgrid", "signed_vector.json")
CREDS = SendGridCredentials.model_validate({"apiKey": "SG.x", "webhookPublicKey": VECTOR["public_key"]})


def headers(signature: str, timestamp: str) -> dict[str, str]:
    return {
        "X-Twilio-Email-Event-Webhook-Signature": signature,
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
    }


async def test_sendgrid_published_vector_is_accepted() -> None:
    req = json_request(URL, VECTOR["payload"].encode(), headers(VECTOR["signature"], VECTOR["timestamp"]))
    signed_at = datetime.fromtimestamp(int(VECTOR["timestamp"]), UTC)
    await sendgrid.verify(req, CREDS, context(now=lambda: signed_at))
    # The same vector today is a replay: refused (issue 13).
    with pytest.raises(WebhookAuthError, match="older than"):
        await sendgrid.verify(req, CREDS, context())
    [event] = sendgrid.parse(req)
    assert event.event_type is EventType.FAILED  # dropped
    assert event.provider_message_id == "LRzXl_NHStOGhQ4kofSm_A"


async def test_changed_byte_or_timestamp_is_rejected() -> None:
    body = VECTOR["payload"].encode()
    with pytest.raises(WebhookAuthError):
        await sendgrid.verify(
            json_request(URL, flip_byte(body), headers(VECTOR["signature"], VECTOR["timestamp"])),
            CREDS,
        )
    with pytest.raises(WebhookAuthError):
        await sendgrid.verify(
            json_request(URL, body, headers(VECTOR["signature"], "1600112503")), CREDS
        )


async def test_missing_signature_is_rejected() -> None:
    with pytest.raises(WebhookAuthError, match="missing"):
        await sendgrid.verify(json_request(URL, VECTOR["payload"].encode()), CREDS)


async def test_pem_key_and_local_signature_on_the_docs_fixture() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    creds = SendGridCredentials.model_validate({"apiKey": "SG.x", "webhookPublicKey": pem})
    body = raw("sendgrid", "events.json")
    ts = "1700000000"
    sig = base64.b64encode(private.sign(ts.encode() + body, ec.ECDSA(hashes.SHA256()))).decode()
    await sendgrid.verify(
        json_request(URL, body, headers(sig, ts)),
        creds,
        context(now=lambda: datetime.fromtimestamp(1700000000, UTC)),
    )
    # The replay window (300 s by default): far from "now" it is refused, in both directions.
    ctx = context(now=lambda: datetime.fromtimestamp(1700001000, UTC))
    with pytest.raises(WebhookAuthError, match="older than"):
        await sendgrid.verify(json_request(URL, body, headers(sig, ts)), creds, ctx)
    ctx = context(now=lambda: datetime.fromtimestamp(1700000000 - 61, UTC))
    with pytest.raises(WebhookAuthError, match="future"):
        await sendgrid.verify(json_request(URL, body, headers(sig, ts)), creds, ctx)


async def test_non_p256_key_is_a_configuration_error() -> None:
    key = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    creds = SendGridCredentials.model_validate(
        {"apiKey": "SG.x", "webhookPublicKey": base64.b64encode(key).decode()}
    )
    with pytest.raises(WebhookNotConfiguredError):
        await sendgrid.verify(json_request(URL, b"[]", headers("x", "1")), creds)


def test_parse_every_documented_event() -> None:
    events = sendgrid.parse(json_request(URL, raw("sendgrid", "events.json")))
    assert [e.event_type for e in events] == [
        EventType.ACCEPTED, EventType.DEFERRED, EventType.DELIVERED, EventType.OPENED,
        EventType.CLICKED, EventType.BOUNCED, EventType.FAILED, EventType.COMPLAINED,
        EventType.UNSUBSCRIBED, EventType.UNKNOWN,
    ]
    # The X-Message-Id is everything before the `.filter…` routing suffix (it has dots in
    # this older sample: smtp-id <14c5d75ce93.dfd.64b469@ismtpd-555>).
    assert all(e.provider_message_id == "14c5d75ce93.dfd.64b469" for e in events)
    bounce = events[5]
    assert isinstance(bounce, DeliveryEvent)
    assert bounce.bounce_permanent is True
    assert bounce.error == {"code": "5.0.0", "reason": "500 unknown recipient"}
    assert bounce.event_id == "6g4ZI7SA-xmRDv57GoPIPw=="
    assert bounce.recipient == "example@test.com"
    assert events[-1].raw["event"] == "group_resubscribe"
