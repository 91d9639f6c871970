"""Twilio: X-Twilio-Signature (the known vector), SHA-256 rules, callbacks and inbound SMS."""

from __future__ import annotations

import pytest

from clinicomm.providers.base import Channel
from clinicomm.providers.shared.credentials import TwilioCredentials
from clinicomm.providers.webhooks import (
    DeliveryEvent,
    EventType,
    InboundMessage,
    WebhookAuthError,
    WebhookRequest,
    twilio,
)
from tests.support.webhooks import flip_byte, form_request, raw

# PROVIDER-FACTS §2 / §8 item 13: Twilio's documented example.
VECTOR_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
VECTOR_TOKEN = "12345"
VECTOR_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+12349013030",
    "Digits": "1234",
    "From": "+12349013030",
    "To": "+18005551212",
}
VECTOR_SIGNATURE = "0/KCTR6DLpKmkAf8muzZqo1nDgQ="

URL = "https://hooks.example.com/api/v1/webhooks/twilio/clinic-1"
TOKEN = "auth-token-abcdef"
CREDS = TwilioCredentials.model_validate(
    {"accountSid": "ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX", "authToken": TOKEN,
     "fromNumber": "+15017122661"}
)


def vector_request(url: str = VECTOR_URL, params: dict[str, str] | None = None,
                   signature: str = VECTOR_SIGNATURE, **headers: str) -> WebhookRequest:
    from urllib.parse import urlencode

    body = urlencode(params or VECTOR_PARAMS).encode()
    return form_request(url, body, {"X-Twilio-Signature": signature, **headers})


def test_known_vector_is_computed_by_our_code() -> None:
    assert twilio.signature(VECTOR_URL, VECTOR_PARAMS.items(), VECTOR_TOKEN) == VECTOR_SIGNATURE


async def test_known_vector_request_verifies() -> None:
    creds = CREDS.model_copy(update={"auth_token": type(CREDS.auth_token)(VECTOR_TOKEN)})
    await twilio.verify(vector_request(), creds)


@pytest.mark.parametrize(
    "change",
    ["param", "url", "token"],
)
async def test_known_vector_fails_when_anything_changes(change: str) -> None:
    token = "54321" if change == "token" else VECTOR_TOKEN
    creds = CREDS.model_copy(update={"auth_token": type(CREDS.auth_token)(token)})
    params = {**VECTOR_PARAMS, "Digits": "1235"} if change == "param" else VECTOR_PARAMS
    url = VECTOR_URL.replace("bar=2", "bar=3") if change == "url" else VECTOR_URL
    with pytest.raises(WebhookAuthError):
        await twilio.verify(vector_request(url, params), creds)


async def test_sha256_when_signature_settings_say_so() -> None:
    creds = CREDS.model_copy(update={"webhook_shared_key": type(CREDS.auth_token)("rule-key")})
    sig = twilio.signature(VECTOR_URL, VECTOR_PARAMS.items(), "rule-key", sha256=True)
    settings = {"X-Twilio-Webhooks-Signature-Settings": "key=KSXXXX,algorithm=HMAC_SHA256"}
    await twilio.verify(vector_request(signature=sig, **settings), creds)
    # The SHA-1 signature is not accepted when the header names SHA-256.
    with pytest.raises(WebhookAuthError):
        await twilio.verify(vector_request(**settings), creds)


async def test_default_port_variant_is_accepted() -> None:
    body = raw("twilio", "status_delivered.form")
    req = form_request(URL, body)
    sig = twilio.signature("https://hooks.example.com:443/api/v1/webhooks/twilio/clinic-1",
                           req.form, TOKEN)
    await twilio.verify(form_request(URL, body, {"X-Twilio-Signature": sig}), CREDS)


async def test_fixture_valid_changed_and_missing() -> None:
    body = raw("twilio", "status_delivered.form")
    sig = twilio.signature(URL, form_request(URL, body).form, TOKEN)
    await twilio.verify(form_request(URL, body, {"X-Twilio-Signature": sig}), CREDS)
    with pytest.raises(WebhookAuthError):
        await twilio.verify(form_request(URL, flip_byte(body, 30), {"X-Twilio-Signature": sig}),
                            CREDS)
    with pytest.raises(WebhookAuthError, match="missing"):
        await twilio.verify(form_request(URL, body), CREDS)


def test_parse_status_callback() -> None:
    [event] = twilio.parse(form_request(URL, raw("twilio", "status_delivered.form")))
    assert isinstance(event, DeliveryEvent)
    assert event.event_type is EventType.DELIVERED
    assert event.provider_message_id == "SMXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"
    assert event.event_id == "SMXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX:delivered"
    assert event.recipient == "+15558675310"
    assert event.channel is Channel.SMS


def test_parse_21610_and_unknown_status() -> None:
    [event] = twilio.parse(form_request(URL, raw("twilio", "status_21610.form")))
    assert event.event_type is EventType.FAILED
    assert isinstance(event, DeliveryEvent) and event.error == {"code": "21610"}
    [odd] = twilio.parse(form_request(URL, raw("twilio", "status_unknown.form")))
    assert odd.event_type is EventType.UNKNOWN
    assert isinstance(odd, DeliveryEvent) and odd.channel is Channel.WHATSAPP
    assert odd.raw["MessageStatus"] == "partially_delivered"


def test_parse_inbound_stop() -> None:
    [event] = twilio.parse(form_request(URL, raw("twilio", "inbound_stop.form")))
    assert isinstance(event, InboundMessage)
    assert event.sender == "+15558675310"
    assert event.text == "STOP"
    assert event.channel is Channel.SMS
