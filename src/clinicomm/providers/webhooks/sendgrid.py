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
  part before that suffix is the id the adapter stored. A `dropped` event (SendGrid refused
  the message before sending it) carries an `sg_message_id` that is only the suffix
  (`filter0093p1las1…`); its id is then the local part of `smtp-id`
  (`<X-Message-Id@ismtpd…>`), as captured in django-anymail's tests.
* `dropped` reasons "Bounced Address", "Unsubscribed Address" and "Spam Reporting Address"
  mean the address is on SendGrid's bounce, unsubscribe or spam-report suppression list
  (https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/event#dropped):
  the delivery fails and our own suppression list learns the same (`OptOut`).
"""

from __future__ import annotations

import base64
import binascii
import re
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
    OptOut,
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

#: `dropped` reasons that name a SendGrid suppression list → the opt-out it proves.
DROPPED_OPT_OUTS = {
    "bounced address": OptOut.BOUNCE,
    "unsubscribed address": OptOut.UNSUBSCRIBE,
    "spam reporting address": OptOut.COMPLAINT,
}
#: Where SendGrid's routing suffix starts in an `sg_message_id`.
_SUFFIX = re.compile(r"\.(?:filter|recvd|geopod|ismtpd)[^.]*\.", re.IGNORECASE)
_SUFFIX_ONLY = re.compile(r"^(?:filter|recvd|geopod|ismtpd)", re.IGNORECASE)


def message_id(item: dict[str, Any]) -> str | None:
    """The send answer's `X-Message-Id` an event refers to (see the module docstring)."""
    sg_id = str(item.get("sg_message_id") or "")
    if sg_id and not _SUFFIX_ONLY.match(sg_id):
        found = _SUFFIX.search(sg_id + ".")
        return sg_id[: found.start()] if found else sg_id
    smtp_id = str(item.get("smtp-id") or "").strip().strip("<>")
    local, _, host = smtp_id.partition("@")
    if local and ("sendgrid" in host.lower() or host.lower().startswith("ismtpd")):
        return local
    return None


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
    provider_id = message_id(item)
    error = None
    if kind in (EventType.BOUNCED, EventType.FAILED, EventType.DEFERRED):
        error = error_of(item.get("status"), item.get("reason") or item.get("response"))
    opt_out = None
    if name == "dropped":
        opt_out = DROPPED_OPT_OUTS.get(str(item.get("reason") or "").strip().lower())
    return DeliveryEvent(
        provider=PROVIDER,
        event_id=str(item.get("sg_event_id") or f"{provider_id}:{name}:{item.get('timestamp')}"),
        provider_message_id=provider_id,
        event_type=kind,
        occurred_at=from_unix(item.get("timestamp")),
        recipient=email_or_none(item.get("email")),
        channel=Channel.EMAIL,
        error=error,
        bounce_permanent=permanent,
        opt_out=opt_out,
        raw=item,
    )
