"""Postmark webhooks: one JSON object per POST, told apart by `RecordType`.

* Postmark does not sign webhooks; they are protected with HTTP Basic credentials embedded in
  the webhook URL (`https://user:pass@host/...`), which we compare in constant time.
  https://postmarkapp.com/developer/webhooks/webhooks-overview
* RecordType: Delivery, Bounce (`Type` HardBounce/SoftBounce/…, `Inactive` when Postmark
  deactivated the address), SpamComplaint, Open, Click, SubscriptionChange.
  https://postmarkapp.com/developer/webhooks/bounce-webhook
* Bounce types (https://postmarkapp.com/developer/api/bounce-api#bounce-types): a
  `Transient` (2, "delayed"), `SoftBounce` (4096, "unable to temporarily deliver") or
  `DnsError` (256) is not final: the event is `deferred` and a later `Delivery` still
  applies, unless Postmark deactivated the address (`Inactive: true`). `Unsubscribe` (16,
  "Unsubscribe or Remove request") is the recipient unsubscribing, not a bounce.
  Auto-responders, address-change notices, challenge/verification mails and the other
  informational types change nothing.
* SubscriptionChange (https://postmarkapp.com/developer/webhooks/subscription-change-webhook):
  `SuppressSending: true` with `SuppressionReason` HardBounce → bounce, SpamComplaint →
  complaint, ManualSuppression (the recipient unsubscribed, or the sender suppressed) →
  unsubscribe; `SuppressSending: false` is a reactivation → resubscribe.
"""

from __future__ import annotations

import base64
from typing import Any

from clinicomm.providers.base import Channel
from clinicomm.providers.email.postmark import PostmarkCredentials
from clinicomm.providers.webhooks.base import (
    DeliveryEvent,
    EventType,
    OptOut,
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
#: Bounce types that are a delay, not a refusal: the message may still be delivered.
SOFT_BOUNCES = frozenset({"Transient", "SoftBounce", "DnsError"})
#: Bounce types that are notices about the recipient, not about delivery.
INFORMATIONAL = frozenset(
    {"AutoResponder", "AddressChange", "Subscribe", "ChallengeVerification", "OpenRelayTest",
     "SpamNotification", "VirusNotification"}
)
#: SubscriptionChange `SuppressionReason` → the opt-out it records.
SUPPRESSION_REASONS = {
    "HardBounce": OptOut.BOUNCE,
    "SpamComplaint": OptOut.COMPLAINT,
    "ManualSuppression": OptOut.UNSUBSCRIBE,
}
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
    opt_out: OptOut | None = None
    if record == "Bounce":
        bounce_type = str(item.get("Type") or "")
        inactive = bool(item.get("Inactive"))
        permanent = bounce_type in HARD_BOUNCES or inactive
        error = error_of(item.get("TypeCode"), item.get("Details") or item.get("Description"))
        if bounce_type == "Unsubscribe":
            kind, permanent = EventType.UNSUBSCRIBED, None
        elif bounce_type in SOFT_BOUNCES and not inactive:
            kind = EventType.DEFERRED
        elif bounce_type in INFORMATIONAL and not inactive:
            kind, permanent = EventType.UNKNOWN, None
    if record == "SubscriptionChange":
        if item.get("SuppressSending"):
            reason = str(item.get("SuppressionReason") or "")
            opt_out = SUPPRESSION_REASONS.get(reason, OptOut.UNSUBSCRIBE)
            kind = EventType.UNSUBSCRIBED if opt_out is OptOut.UNSUBSCRIBE else EventType.UNKNOWN
        else:
            opt_out = OptOut.RESUBSCRIBE
    when = next((item[f] for f in _TIME_FIELDS if item.get(f)), "")
    message_id = str(item.get("MessageID") or "") or None
    return DeliveryEvent(
        provider=PROVIDER,
        # A suppression and the reactivation after it can share message id and time.
        event_id=f"{message_id}:{record}:{when}"
        + (f":{bool(item.get('SuppressSending'))}" if record == "SubscriptionChange" else ""),
        provider_message_id=message_id,
        event_type=kind,
        occurred_at=from_iso(when),
        recipient=email_or_none(item.get("Recipient") or item.get("Email")),
        channel=Channel.EMAIL,
        error=error,
        bounce_permanent=permanent,
        opt_out=opt_out,
        raw=item,
    )
