"""Postmark: basic auth on the webhook URL, record types."""

from __future__ import annotations

import base64

import pytest

from clinicomm.providers.email.postmark import PostmarkCredentials
from clinicomm.providers.webhooks import DeliveryEvent, EventType, WebhookAuthError, postmark
from tests.support.webhooks import flip_byte, json_request, raw

URL = "https://hooks.example.com/api/v1/webhooks/postmark/clinic-1"
CREDS = PostmarkCredentials.model_validate(
    {"serverToken": "pm-token", "webhookUser": "clinic1", "webhookPassword": "s3cret-pass"}
)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_valid_credentials_are_accepted() -> None:
    await postmark.verify(json_request(URL, raw("postmark", "bounce.json"), basic("clinic1", "s3cret-pass")), CREDS)


async def test_changed_byte_of_credentials_is_rejected() -> None:
    header = basic("clinic1", "s3cret-pass")["Authorization"].encode()
    changed = flip_byte(header, len(header) - 3).decode()
    with pytest.raises(WebhookAuthError):
        await postmark.verify(json_request(URL, raw("postmark", "bounce.json"), {"Authorization": changed}), CREDS)
    with pytest.raises(WebhookAuthError):
        await postmark.verify(json_request(URL, raw("postmark", "bounce.json"), basic("clinic1", "wrong")), CREDS)


async def test_missing_credentials_are_rejected() -> None:
    with pytest.raises(WebhookAuthError, match="missing"):
        await postmark.verify(json_request(URL, raw("postmark", "bounce.json")), CREDS)


def test_parse_hard_bounce_and_delivery() -> None:
    [bounce] = postmark.parse(json_request(URL, raw("postmark", "bounce.json")))
    assert isinstance(bounce, DeliveryEvent)
    assert bounce.event_type is EventType.BOUNCED and bounce.bounce_permanent is True
    assert bounce.provider_message_id == "883953f4-6105-42a2-a16a-77a8eac79483"
    assert bounce.event_id == "883953f4-6105-42a2-a16a-77a8eac79483:Bounce:2019-11-05T16:33:54.9070259Z"
    assert bounce.recipient == "john@example.com"
    assert bounce.occurred_at is not None and bounce.occurred_at.year == 2019
    [delivery] = postmark.parse(json_request(URL, raw("postmark", "delivery.json")))
    assert delivery.event_type is EventType.DELIVERED


def test_unknown_record_type_is_kept() -> None:
    [event] = postmark.parse(json_request(URL, raw("postmark", "inbound.json")))
    assert event.event_type is EventType.UNKNOWN
    assert event.raw["RecordType"] == "Inbound"
