"""SendGrid Event Webhook: a JSON array of events, signed with ECDSA P-256.

* Signature: `X-Twilio-Email-Event-Webhook-Signature` is a base64 DER ECDSA signature, with
  SHA-256, over `X-Twilio-Email-Event-Webhook-Timestamp` + the raw body, verified with the
  clinic's verification key (`webhookPublicKey`, base64 DER or PEM).
  https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/getting-started-event-webhook-security-features
  SendGrid documents no replay window; `WebhookContext.sendgrid_max_age` sets one.
* Events: processed, dropped, delivered, deferred, bounce (`type` bounce|blocked), open,
  click, spamreport, unsubscribe, group_unsubscribe, group_resubscribe; each has
  `sg_event_id`, `sg_message_id`, `email`, `timestamp`.
  https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/event
* `sg_message_id` is the send answer's `X-Message-Id` followed by `.filter…`/`.recvd…`: the
  part before the first dot is the id the adapter stored.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import replace
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from clinicomm.providers.base import Channel
from clinicomm.providers.email.sendgrid import SendGridCredentials
from clinicomm.providers.webhooks.base import (
    DeliveryEvent,
    EventType,
    WebhookAuthError,
    WebhookContext,
    WebhookEvent,
    WebhookNotConfiguredError,
    WebhookPayloadError,
    WebhookRequest,
    check_fresh,
    email_or_none,
    error_of,
    from_unix,
    require_secret,
)

PROVIDER = "sendgrid"
CREDENTIALS = SendGridCredentials
SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"

EVENT_MAP = {
    "processed": EventType.ACCEPTED,
    "delivered": EventType.DELIVERED,
    "deferred": EventType.DEFERRED,
    "bounce": EventType.BOUNCED,
    "dropped": EventType.FAILED,
    "open": EventType.OPENED,
    "click": EventType.CLICKED,
    "spamreport": EventType.COMPLAINED,
    "unsubscribe": EventType.UNSUBSCRIBED,
    "group_unsubscribe": EventType.UNSUBSCRIBED,
}


def load_public_key(text: str) -> ec.EllipticCurvePublicKey:
    """The verification key from PEM or the console's base64 DER; must be EC P-256."""
    try:
        if "BEGIN PUBLIC KEY" in text:
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = serialization.load_der_public_key(base64.b64decode(text))
    except (ValueError, binascii.Error) as exc:
        raise WebhookNotConfiguredError("webhookPublicKey is not a readable public key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise WebhookNotConfiguredError("webhookPublicKey must be an ECDSA P-256 key")
    return key


async def verify(
    request: WebhookRequest,
    credentials: SendGridCredentials,
    context: WebhookContext | None = None,
) -> None:
    """Raise `WebhookAuthError` unless the ECDSA signature covers timestamp + body."""
    key = load_public_key(require_secret(credentials.webhook_public_key, "webhookPublicKey"))
    signature = request.header(SIGNATURE_HEADER)
    timestamp = request.header(TIMESTAMP_HEADER)
    if not signature or not timestamp:
        raise WebhookAuthError("missing SendGrid signature or timestamp header")
    try:
        der = base64.b64decode(signature, validate=True)
        key.verify(der, timestamp.encode() + request.body, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, binascii.Error, ValueError) as exc:
        raise WebhookAuthError("signature does not match timestamp and body") from exc
    ctx = context or WebhookContext()
    if ctx.sendgrid_max_age is not None:
        ctx = replace(ctx, max_age=ctx.sendgrid_max_age)
    check_fresh(from_unix(timestamp), ctx, "signed timestamp")


def parse(request: WebhookRequest) -> list[WebhookEvent]:
    """One event per array item."""
    data = request.json()
    if not isinstance(data, list):
        raise WebhookPayloadError("SendGrid posts a JSON array of events")
    return [_event(item) for item in data if isinstance(item, dict)]


def _event(item: dict[str, Any]) -> DeliveryEvent:
    name = str(item.get("event") or "")
    kind = EVENT_MAP.get(name, EventType.UNKNOWN)
    permanent: bool | None = None
    if kind is EventType.BOUNCED:
        # `type: blocked` is a block by the receiving server (often temporary); `bounce` is
        # a hard bounce that SendGrid adds to its own suppression list.
        permanent = item.get("type", "bounce") == "bounce"
    message_id = str(item.get("sg_message_id") or "").split(".", 1)[0] or None
    error = None
    if kind in (EventType.BOUNCED, EventType.FAILED, EventType.DEFERRED):
        error = error_of(item.get("status"), item.get("reason") or item.get("response"))
    return DeliveryEvent(
        provider=PROVIDER,
        event_id=str(item.get("sg_event_id") or f"{message_id}:{name}:{item.get('timestamp')}"),
        provider_message_id=message_id,
        event_type=kind,
        occurred_at=from_unix(item.get("timestamp")),
        recipient=email_or_none(item.get("email")),
        channel=Channel.EMAIL,
        error=error,
        bounce_permanent=permanent,
        raw=item,
    )
