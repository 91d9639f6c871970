"""Bird (Channels API) webhooks: message status events and inbound messages.

* Signature (docs.bird.com, Notifications API "Verifying a webhook subscription"):
  `messagebird-signature` = base64(HMAC-SHA256(signing key, `timestamp + "\\n" + URL + "\\n"
  + SHA-256(body)` with the raw digest bytes)), `messagebird-request-timestamp` the Unix
  timestamp; we also refuse a timestamp outside `WebhookContext.max_age`.
* Body: `{"service": "channels", "event": "<platform>.outbound" | "<platform>.inbound",
  "payload": {"id", "channelId", "status", "reason", "reference", "receiver": {"contacts":
  [{"identifierValue"}]}, "sender": {"contact": {"identifierValue"}}, "body": {"type":
  "text", "text": {"text"}}, "createdAt", "updatedAt"}}`, as in Bird's documentation
  examples. Outbound statuses: accepted/processing/scheduled/sending (queued), sent,
  delivered, read, and failed/delivery_failed/rejected/deleted (failed). Bird publishes no
  OpenAPI file for them: the shapes are derived from its docs and tested with our fixtures.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

from clinicomm.providers.base import Channel
from clinicomm.providers.shared.credentials import BirdCredentials
from clinicomm.providers.webhooks.base import (
    DeliveryEvent,
    EventType,
    InboundMessage,
    WebhookAuthError,
    WebhookContext,
    WebhookEvent,
    WebhookPayloadError,
    WebhookRequest,
    constant_time_equal,
    error_of,
    from_iso,
    from_unix,
    phone_or_none,
    require_secret,
)

PROVIDER = "bird"
CREDENTIALS = BirdCredentials
SIGNATURE_HEADER = "messagebird-signature"
TIMESTAMP_HEADER = "messagebird-request-timestamp"

STATUS_MAP = {
    "accepted": EventType.ACCEPTED,
    "processing": EventType.ACCEPTED,
    "scheduled": EventType.ACCEPTED,
    "sending": EventType.ACCEPTED,
    "sent": EventType.SENT,
    "delivered": EventType.DELIVERED,
    "read": EventType.READ,
    "failed": EventType.FAILED,
    "delivery_failed": EventType.FAILED,
    "rejected": EventType.FAILED,
    "deleted": EventType.FAILED,
}
_CHANNELS = {"whatsapp": Channel.WHATSAPP, "sms": Channel.SMS}


def signature(key: str, timestamp: str, url: str, body: bytes) -> str:
    """Bird's signature of a request (see the module docstring)."""
    digest = hashlib.sha256(body).digest()
    signed = timestamp.encode() + b"\n" + url.encode() + b"\n" + digest
    return base64.b64encode(hmac.new(key.encode(), signed, hashlib.sha256).digest()).decode()


async def verify(
    request: WebhookRequest,
    credentials: BirdCredentials,
    context: WebhookContext | None = None,
) -> None:
    """Raise `WebhookAuthError` unless the signature covers timestamp, URL and body."""
    key = require_secret(credentials.signing_key, "signingKey")
    given = request.header(SIGNATURE_HEADER)
    timestamp = request.header(TIMESTAMP_HEADER)
    if not given or not timestamp:
        raise WebhookAuthError("missing Bird signature or timestamp header")
    if not constant_time_equal(signature(key, timestamp, request.url, request.body), given.strip()):
        raise WebhookAuthError("signature does not match timestamp, URL and body")
    ctx = context or WebhookContext()
    signed = from_unix(timestamp)
    if signed is None or abs((ctx.now() - signed).total_seconds()) > ctx.max_age:
        raise WebhookAuthError("signed timestamp is outside the accepted window")


def parse(request: WebhookRequest) -> list[WebhookEvent]:
    """One status event or one inbound message per POST."""
    data = request.json()
    if not isinstance(data, dict) or not isinstance(data.get("payload"), dict):
        raise WebhookPayloadError("not a Bird webhook (no payload)")
    event = str(data.get("event") or "")
    platform, _, direction = event.partition(".")
    channel = _CHANNELS.get(platform)
    item: dict[str, Any] = data["payload"]
    message_id = str(item.get("id") or "")
    if channel is None or not message_id:
        return []
    when = from_iso(item.get("updatedAt") or item.get("createdAt"))
    if direction == "inbound":
        contact = ((item.get("sender") or {}).get("contact") or {}).get("identifierValue")
        sender = phone_or_none(contact)
        if sender is None:
            raise WebhookPayloadError("inbound message without a usable sender")
        body = item.get("body") or {}
        text = (body.get("text") or {}).get("text") if body.get("type") == "text" else None
        return [
            InboundMessage(
                provider=PROVIDER,
                event_id=message_id,
                channel=channel,
                sender=sender,
                to=str(item.get("channelId") or "") or None,
                text=text if isinstance(text, str) else None,
                occurred_at=when,
                raw=item,
            )
        ]
    status = str(item.get("status") or "")
    contacts = (item.get("receiver") or {}).get("contacts") or []
    first = contacts[0] if contacts and isinstance(contacts[0], dict) else {}
    kind = STATUS_MAP.get(status, EventType.UNKNOWN)
    reason = item.get("reason") or item.get("failure")
    return [
        DeliveryEvent(
            provider=PROVIDER,
            event_id=f"{message_id}:{status}:{item.get('updatedAt')}",
            provider_message_id=message_id,
            event_type=kind,
            occurred_at=when,
            recipient=phone_or_none(first.get("identifierValue")),
            channel=channel,
            error=error_of(None, reason) if kind is EventType.FAILED else None,
            raw=item,
        )
    ]
