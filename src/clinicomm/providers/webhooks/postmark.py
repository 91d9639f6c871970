"""Postmark webhooks: one JSON object per POST, told apart by `RecordType`.

* Postmark does not sign webhooks; they are protected with HTTP Basic credentials embedded in
  the webhook URL (`https://user:pass@host/...`), which we compare in constant time.
  https://postmarkapp.com/developer/webhooks/webhooks-overview
* RecordType: Delivery, Bounce (`Type` HardBounce/SoftBounce/…, `Inactive` when Postmark
  deactivated the address), SpamComplaint, Open, Click, SubscriptionChange.
  https://postmarkapp.com/developer/webhooks/bounce-webhook
"""

from __future__ import annotations

import base64
from typing import Any

from clinicomm.providers.base import Channel
from clinicomm.providers.email.postmark import PostmarkCredentials
from clinicomm.providers.webhooks.base import (
    DeliveryEvent,
    EventType,
    WebhookAuthError,
    WebhookContext,
    WebhookEvent,
    WebhookPayloadError,
    WebhookRequest,
    constant_time_equal,
    email_or_none,
    error_of,
    from_iso,
    require_secret,
)

PROVIDER = "postmark"
CREDENTIALS = PostmarkCredentials

RECORD_MAP = {
    "Delivery": EventType.DELIVERED,
    "Bounce": EventType.BOUNCED,
    "SpamComplaint": EventType.COMPLAINED,
    "Open": EventType.OPENED,
    "Click": EventType.CLICKED,
}
#: Bounce types after which the address must never be tried again.
#: https://postmarkapp.com/developer/api/bounce-api#bounce-types
HARD_BOUNCES = frozenset({"HardBounce", "BadEmailAddress", "ManuallyDeactivated", "SpamComplaint"})
_TIME_FIELDS = ("DeliveredAt", "BouncedAt", "ReceivedAt", "ChangedAt")


async def verify(
    request: WebhookRequest,
    credentials: PostmarkCredentials,
    context: WebhookContext | None = None,
) -> None:
    """Raise `WebhookAuthError` unless `Authorization: Basic` carries the configured pair."""
    user = require_secret(credentials.webhook_user, "webhookUser")
    password = require_secret(credentials.webhook_password, "webhookPassword")
    header = request.header("Authorization") or ""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        raise WebhookAuthError("missing basic authorization")
    expected = base64.b64encode(f"{user}:{password}".encode()).decode()
    if not constant_time_equal(expected, value.strip()):
        raise WebhookAuthError("basic credentials do not match")


def parse(request: WebhookRequest) -> list[WebhookEvent]:
    """One event per POST."""
    item = request.json()
    if not isinstance(item, dict) or "RecordType" not in item:
        raise WebhookPayloadError("not a Postmark webhook (no RecordType)")
    return [_event(item)]


def _event(item: dict[str, Any]) -> DeliveryEvent:
    record = str(item.get("RecordType"))
    kind = RECORD_MAP.get(record, EventType.UNKNOWN)
    permanent: bool | None = None
    error = None
    if record == "Bounce":
        bounce_type = str(item.get("Type") or "")
        permanent = bounce_type in HARD_BOUNCES or bool(item.get("Inactive"))
        error = error_of(item.get("TypeCode"), item.get("Description") or item.get("Details"))
    if record == "SubscriptionChange" and item.get("SuppressSending"):
        kind = EventType.UNSUBSCRIBED
    when = next((item[f] for f in _TIME_FIELDS if item.get(f)), "")
    message_id = str(item.get("MessageID") or "") or None
    return DeliveryEvent(
        provider=PROVIDER,
        event_id=f"{message_id}:{record}:{when}",
        provider_message_id=message_id,
        event_type=kind,
        occurred_at=from_iso(when),
        recipient=email_or_none(item.get("Recipient") or item.get("Email")),
        channel=Channel.EMAIL,
        error=error,
        bounce_permanent=permanent,
        raw=item,
    )
