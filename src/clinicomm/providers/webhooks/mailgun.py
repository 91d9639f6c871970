"""Mailgun webhooks (the JSON kind): `{"signature": {...}, "event-data": {...}}`.

* Signature in the body: `signature.signature` = hex HMAC-SHA256(webhook signing key,
  `timestamp + token`). We also refuse a timestamp older than `WebhookContext.max_age` (300 s
  by default) and a token already seen (`WebhookContext.seen_tokens`).
  https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/securing-webhooks
* Events: accepted, delivered, failed (`severity` permanent|temporary), opened, clicked,
  unsubscribed, complained. `event-data.id` is the event's id; `message.headers.message-id`
  is the send answer's `id` without its angle brackets (the adapter stored it with them).
  https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/webhooks
* `rejected`: Mailgun refused the message before sending it (`reject.reason`): the delivery
  fails. `failed` + `permanent` with reason `suppress-bounce`, `suppress-unsubscribe` or
  `suppress-complaint`: Mailgun dropped it because the address is on its bounce,
  unsubscribe or complaint list; we record the same opt-out.
  https://documentation.mailgun.com/docs/mailgun/user-manual/events/events
Legacy form-encoded webhooks (`timestamp`, `token`, `signature` and `event` as form fields)
are not supported, as Mailgun's current webhooks replaced them: a correctly signed one is
answered 400 "format unsupported" (`WebhookUnsupportedError`), an incorrectly signed one 401.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from clinicomm.providers.base import Channel
from clinicomm.providers.email.mailgun import MailgunCredentials
from clinicomm.providers.webhooks.base import (
    DeliveryEvent,
    EventType,
    OptOut,
    WebhookAuthError,
    WebhookContext,
    WebhookEvent,
    WebhookPayloadError,
    WebhookRequest,
    WebhookUnsupportedError,
    check_fresh,
    constant_time_equal,
    email_or_none,
    error_of,
    from_unix,
    require_secret,
)

PROVIDER = "mailgun"
CREDENTIALS = MailgunCredentials

EVENT_MAP = {
    "accepted": EventType.ACCEPTED,
    "delivered": EventType.DELIVERED,
    "opened": EventType.OPENED,
    "clicked": EventType.CLICKED,
    "complained": EventType.COMPLAINED,
    "unsubscribed": EventType.UNSUBSCRIBED,
    "rejected": EventType.FAILED,
}
#: A permanent `failed` because the address is on one of Mailgun's suppression lists.
SUPPRESSED_REASONS = {
    "suppress-bounce": OptOut.BOUNCE,
    "suppress-unsubscribe": OptOut.UNSUBSCRIBE,
    "suppress-complaint": OptOut.COMPLAINT,
}


async def verify(
    request: WebhookRequest,
    credentials: MailgunCredentials,
    context: WebhookContext | None = None,
) -> None:
    """Raise `WebhookAuthError` on a bad HMAC, a stale timestamp or a reused token."""
    key = require_secret(credentials.webhook_signing_key, "webhookSigningKey")
    ctx = context or WebhookContext()
    legacy = request.form_dict() if request.form else {}
    if legacy:
        sig: Any = legacy
    else:
        try:
            data = request.json()
        except WebhookPayloadError as exc:
            raise WebhookAuthError("missing signature (body is not JSON)") from exc
        sig = data.get("signature") if isinstance(data, dict) else None
    if not isinstance(sig, dict):
        raise WebhookAuthError("missing signature object")
    timestamp, token, given = (str(sig.get(k) or "") for k in ("timestamp", "token", "signature"))
    if not (timestamp and token and given):
        raise WebhookAuthError("signature needs timestamp, token and signature")
    expected = hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
    if not constant_time_equal(expected, given.lower()):
        raise WebhookAuthError("signature does not match timestamp and token")
    check_fresh(from_unix(timestamp), ctx, "signed timestamp")
    # Only a correctly signed token is remembered, so garbage cannot fill the store.
    if not await ctx.seen_tokens.add_if_new(f"mailgun:{token}", ctx.max_age * 2):
        raise WebhookAuthError("token was already used (replay)")
    if legacy:
        raise WebhookUnsupportedError(
            "Mailgun legacy form-encoded webhooks are not supported: "
            "configure the JSON webhooks (event-data) instead"
        )


def parse(request: WebhookRequest) -> list[WebhookEvent]:
    """One event from `event-data`."""
    data = request.json()
    item = data.get("event-data") if isinstance(data, dict) else None
    if not isinstance(item, dict):
        raise WebhookPayloadError("not a Mailgun webhook (no event-data)")
    return [_event(item)]


def _event(item: dict[str, Any]) -> DeliveryEvent:
    name = str(item.get("event") or "")
    kind = EVENT_MAP.get(name, EventType.UNKNOWN)
    permanent: bool | None = None
    error = None
    opt_out: OptOut | None = None
    if name == "failed":
        permanent = item.get("severity") == "permanent"
        # A temporary failure is retried by Mailgun; a permanent one is a bounce or a drop.
        kind = EventType.BOUNCED if permanent else EventType.DEFERRED
        status = item.get("delivery-status") or {}
        error = error_of(
            status.get("code"),
            status.get("description") or status.get("message") or item.get("reason"),
        )
        opt_out = SUPPRESSED_REASONS.get(str(item.get("reason") or "")) if permanent else None
        if opt_out is not None and opt_out is not OptOut.BOUNCE:
            # Dropped for an unsubscribe or complaint: it failed, the address did not bounce.
            kind, permanent = EventType.FAILED, None
    elif name == "rejected":
        reject = item.get("reject") or {}
        error = error_of(None, reject.get("reason") or reject.get("description"))
    headers = (item.get("message") or {}).get("headers") or {}
    message_id = headers.get("message-id")
    recipient = email_or_none(item.get("recipient"))
    return DeliveryEvent(
        provider=PROVIDER,
        event_id=str(item.get("id") or f"{message_id}:{name}:{item.get('timestamp')}:{recipient}"),
        provider_message_id=f"<{message_id}>" if message_id else None,
        event_type=kind,
        occurred_at=from_unix(item.get("timestamp")),
        recipient=recipient,
        channel=Channel.EMAIL,
        error=error,
        bounce_permanent=permanent,
        opt_out=opt_out,
        raw=item,
    )
