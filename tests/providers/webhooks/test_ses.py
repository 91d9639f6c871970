"""SES through SNS: certificate URL, topic, SNS signature v1/v2 with a local certificate."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from clinicomm.providers.email.ses import SesCredentials
from clinicomm.providers.webhooks import DeliveryEvent, EventType, WebhookAuthError, ses
from tests.support.webhooks import context, flip_byte, json_request, load, raw

URL = "https://hooks.example.com/api/v1/webhooks/ses/clinic-1"
TOPIC = "arn:aws:sns:us-west-2:123456789012:MyTopic"
CERT_URL = "https://sns.us-west-2.amazonaws.com/SimpleNotificationService-f3ecfb7224c7233fe7bb5f59f96de52f.pem"
CREDS = SesCredentials.model_validate(
    {"region": "us-west-2", "accessKeyId": "AKIA", "secretAccessKey": "x", "snsTopicArns": [TOPIC]}
)

_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _certificate() -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(_KEY.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1))
        .sign(_KEY, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


CERT = _certificate()
FETCHED: list[str] = []


async def fetch(url: str) -> bytes:
    FETCHED.append(url)
    return CERT


def sns_message(note: str | None = None, version: str = "2", **overrides: Any) -> dict[str, Any]:
    """The docs' SNS envelope carrying an SES notification fixture, signed with our key."""
    msg = load("ses", "sns_envelope.json")
    if note is not None:
        msg["Message"] = raw("ses", note).decode().strip()
    fresh = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")  # within the 300 s window
    msg.update(
        {"SignatureVersion": version, "SigningCertURL": CERT_URL, "Timestamp": fresh, **overrides}
    )
    algo = hashes.SHA1() if version == "1" else hashes.SHA256()
    sig = _KEY.sign(ses.string_to_sign(msg), padding.PKCS1v15(), algo)
    msg["Signature"] = base64.b64encode(sig).decode()
    return msg


def req(msg: dict[str, Any]) -> Any:
    return json_request(URL, json.dumps(msg).encode(), {"x-amz-sns-message-type": msg["Type"]})


@pytest.mark.parametrize("version", ["1", "2"])
async def test_valid_signature_is_accepted(version: str) -> None:
    await ses.verify(req(sns_message("bounce.json", version)), CREDS, context(fetch_certificate=fetch))
    assert FETCHED[-1] == CERT_URL


async def test_subscription_confirmation_is_verified() -> None:
    msg = load("ses", "subscription_confirmation.json")
    msg["SignatureVersion"] = "2"
    msg["Timestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    msg["Signature"] = base64.b64encode(
        _KEY.sign(ses.string_to_sign(msg), padding.PKCS1v15(), hashes.SHA256())
    ).decode()
    await ses.verify(req(msg), CREDS, context(fetch_certificate=fetch))
    assert ses.subscribe_url(req(msg)) == msg["SubscribeURL"]
    assert ses.parse(req(msg)) == []


async def test_changed_byte_is_rejected() -> None:
    msg = sns_message("bounce.json")
    body = json.dumps(msg).encode()
    i = body.index(b"jane@example.com")
    with pytest.raises(WebhookAuthError):
        await ses.verify(json_request(URL, flip_byte(body, i)), CREDS, context(fetch_certificate=fetch))


async def test_missing_signature_is_rejected() -> None:
    msg = sns_message("bounce.json")
    del msg["Signature"]
    with pytest.raises(WebhookAuthError):
        await ses.verify(req(msg), CREDS, context(fetch_certificate=fetch))


@pytest.mark.parametrize(
    "cert_url",
    [
        "http://sns.us-west-2.amazonaws.com/cert.pem",
        "https://sns.us-west-2.amazonaws.com.evil.example/cert.pem",
        "https://evil.example/sns.us-west-2.amazonaws.com/cert.pem",
        "https://sns.us-west-2.amazonaws.com:8443/cert.pem",
        "https://s3.amazonaws.com/cert.pem",
    ],
)
async def test_bad_cert_host_is_rejected_before_any_fetch(cert_url: str) -> None:
    FETCHED.clear()
    msg = sns_message("bounce.json", SigningCertURL=cert_url)
    with pytest.raises(WebhookAuthError, match="SigningCertURL"):
        await ses.verify(req(msg), CREDS, context(fetch_certificate=fetch))
    assert FETCHED == []


async def test_wrong_topic_is_rejected() -> None:
    msg = sns_message("bounce.json", TopicArn="arn:aws:sns:us-west-2:999999999999:OtherClinic")
    with pytest.raises(WebhookAuthError, match="TopicArn"):
        await ses.verify(req(msg), CREDS, context(fetch_certificate=fetch))


def test_parse_bounce_complaint_delivery() -> None:
    [bounce] = ses.parse(req(sns_message("bounce.json")))
    assert isinstance(bounce, DeliveryEvent)
    assert bounce.event_type is EventType.BOUNCED and bounce.bounce_permanent is True
    assert bounce.recipient == "jane@example.com"
    assert bounce.provider_message_id == "00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa0680-000000"
    assert bounce.event_id == "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324"
    assert bounce.error is not None and bounce.error["code"] == "5.1.1"
    assert "<email>" in bounce.error["reason"]  # the address in the diagnostic is redacted
    [complaint] = ses.parse(req(sns_message("complaint.json")))
    assert complaint.event_type is EventType.COMPLAINED
    [delivered] = ses.parse(req(sns_message("delivery.json")))
    assert delivered.event_type is EventType.DELIVERED


def test_transient_bounce_is_not_permanent() -> None:
    note = load("ses", "bounce.json")
    note["bounce"]["bounceType"] = "Transient"
    msg = sns_message(None, Message=json.dumps(note))
    [event] = ses.parse(req(msg))
    assert isinstance(event, DeliveryEvent) and event.bounce_permanent is False


def test_unknown_notification_is_kept() -> None:
    msg = sns_message(None, Message=json.dumps({"eventType": "Subscription-Preferences", "mail": {"messageId": "m1", "destination": ["a@example.com"]}}))
    [event] = ses.parse(req(msg))
    assert event.event_type is EventType.UNKNOWN
    assert event.raw["eventType"] == "Subscription-Preferences"
