"""WhatsApp Cloud API (Meta) webhooks: statuses and inbound messages on the `messages` field.

* Signature: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(App Secret, raw body)>`; the
  legacy SHA-1 `X-Hub-Signature` (`sha1=`) is refused. The raw bytes are verified, never
  re-serialized JSON (Meta signs its escaped-unicode form). PROVIDER-FACTS §1.5.
* Subscription: `GET ?hub.mode=subscribe&hub.verify_token=…&hub.challenge=…` is answered
  with the challenge only when the token matches (`handshake`).
* Statuses: `entry[].changes[].value.statuses[]` with `id` (wamid), `status`
  (sent|delivered|read|failed|…), `timestamp`, `recipient_id` (a wa_id), `errors[]`.
  https://developers.facebook.com/documentation/business-messaging/whatsapp/webhooks/reference/messages/status/
  A `read` can arrive with no `delivered` before it: `read` implies delivered. `played`
  (a voice message was played) implies read.
* Marketing preferences: the `user_preferences` field (`value.user_preferences[]` with
  `wa_id`, `category: marketing_messages`, `value` stop|resume|signup) is the patient's
  "Stop promotions" / "Resume" choice. It is not a message: it opens no window. `stop`
  suppresses marketing messages only; `resume` and `signup` lift that. A `failed` status with
  error 131050 ("this recipient has chosen to stop receiving marketing messages on WhatsApp
  from your business") records the same marketing-only opt-out.
  https://developers.facebook.com/docs/whatsapp/cloud-api/webhooks/reference/user_preferences/
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from clinicomm.providers.base import Channel
from clinicomm.providers.phone import from_wa_id
from clinicomm.providers.webhooks.base import (
    DeliveryEvent,
    EventType,
    ForeignEventError,
    InboundMessage,
    OptOut,
    WebhookAuthError,
    WebhookContext,
    WebhookEvent,
    WebhookPayloadError,
    WebhookRequest,
    constant_time_equal,
    error_of,
    from_unix,
    phone_or_none,
    require_secret,
)
from clinicomm.providers.whatsapp.meta_business import MetaBusinessCredentials

PROVIDER = "meta_business"
ALIASES = ("meta", "whatsapp")
CREDENTIALS = MetaBusinessCredentials
SIGNATURE_HEADER = "X-Hub-Signature-256"

STATUS_MAP = {
    "sent": EventType.SENT,
    "delivered": EventType.DELIVERED,
    "read": EventType.READ,
    "played": EventType.READ,
    "failed": EventType.FAILED,
}
#: A marketing message failed because the recipient stopped marketing messages.
MARKETING_OPT_OUT_CODE = "131050"
#: `user_preferences[].value` for marketing messages → the opt-out it records.
MARKETING_PREFERENCES = {
    "stop": OptOut.MARKETING_STOP,
    "resume": OptOut.MARKETING_RESUME,
    "signup": OptOut.MARKETING_RESUME,
}


async def verify(
    request: WebhookRequest,
    credentials: MetaBusinessCredentials,
    context: WebhookContext | None = None,
) -> None:
    """Raise `WebhookAuthError` unless the body carries a valid `sha256=` App Secret HMAC;
    `ForeignEventError` when a change's `metadata.phone_number_id` is not the clinic's number,
    or an entry's id is not its WABA (`businessAccountId`, when configured). One app secret
    can serve several clinics; the HMAC alone does not say whose event it is."""
    secret = require_secret(credentials.app_secret, "appSecret")
    header = request.header(SIGNATURE_HEADER)
    if not header:
        raise WebhookAuthError(f"missing {SIGNATURE_HEADER}")
    algorithm, _, given = header.strip().partition("=")
    if algorithm != "sha256" or not given:
        raise WebhookAuthError("signature must be sha256=<hex>")
    expected = hmac.new(secret.encode(), request.body, hashlib.sha256).hexdigest()
    if not constant_time_equal(expected, given.lower()):
        raise WebhookAuthError("signature does not match the body")
    _check_account(request, credentials)


def _check_account(request: WebhookRequest, credentials: MetaBusinessCredentials) -> None:
    try:
        data = request.json()
    except WebhookPayloadError:
        return  # parse() answers 400
    entries = data.get("entry") if isinstance(data, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        waba = entry.get("id")
        own_waba = credentials.business_account_id
        if own_waba and waba is not None and str(waba) != own_waba:
            raise ForeignEventError("entry id is not the clinic's WhatsApp Business Account")
        for change in entry.get("changes") or []:
            value = change.get("value") if isinstance(change, dict) else None
            metadata = value.get("metadata") if isinstance(value, dict) else None
            number = metadata.get("phone_number_id") if isinstance(metadata, dict) else None
            if number is not None and str(number) != credentials.phone_number_id:
                raise ForeignEventError("phone_number_id is not the clinic's number")


def handshake(query: dict[str, str], credentials: MetaBusinessCredentials) -> str:
    """The `hub.challenge` to echo for a subscription `GET`; `WebhookAuthError` otherwise."""
    token = require_secret(credentials.verify_token, "verifyToken")
    if query.get("hub.mode") != "subscribe":
        raise WebhookAuthError("hub.mode must be subscribe")
    if not constant_time_equal(token, query.get("hub.verify_token", "")):
        raise WebhookAuthError("hub.verify_token does not match")
    return query.get("hub.challenge", "")


def parse(request: WebhookRequest) -> list[WebhookEvent]:
    """Status reports and inbound messages of every entry and change, in order."""
    data = request.json()
    if not isinstance(data, dict) or not isinstance(data.get("entry"), list):
        raise WebhookPayloadError("not a WhatsApp webhook (no entry list)")
    events: list[WebhookEvent] = []
    for entry in data["entry"]:
        for change in (entry or {}).get("changes") or []:
            value = (change or {}).get("value") or {}
            if not isinstance(value, dict):
                continue
            to = ((value.get("metadata") or {}).get("display_phone_number")) or None
            for status in value.get("statuses") or []:
                if isinstance(status, dict):
                    events.append(_status(status))
            for message in value.get("messages") or []:
                if isinstance(message, dict):
                    inbound = _inbound(message, to)
                    if inbound is not None:
                        events.append(inbound)
            for preference in value.get("user_preferences") or []:
                if isinstance(preference, dict):
                    choice = _preference(preference, to)
                    if choice is not None:
                        events.append(choice)
    return events


def _preference(item: dict[str, Any], to: str | None) -> InboundMessage | None:
    """A marketing preference change, as an inbound event that opens no window."""
    sender = _wa(item.get("wa_id"))
    opt_out = MARKETING_PREFERENCES.get(str(item.get("value") or "").lower())
    if sender is None or opt_out is None or item.get("category") != "marketing_messages":
        return None
    when = item.get("timestamp")
    return InboundMessage(
        provider=PROVIDER,
        event_id=f"pref:{item.get('wa_id')}:{item.get('value')}:{when}",
        channel=Channel.WHATSAPP,
        sender=sender,
        to=to,
        text=None,
        occurred_at=from_unix(when),
        raw=item,
        keyword="none",
        opens_window=False,
        opt_out=opt_out,
    )


def _wa(raw: Any) -> str | None:
    try:
        return from_wa_id(str(raw)) if raw else None
    except ValueError:
        return phone_or_none(str(raw)) if raw else None


def _status(item: dict[str, Any]) -> DeliveryEvent:
    wamid = str(item.get("id") or "")
    status = str(item.get("status") or "")
    errors = item.get("errors") or []
    first = errors[0] if errors and isinstance(errors[0], dict) else {}
    detail = (first.get("error_data") or {}).get("details") if first else None
    marketing_stop = str(first.get("code")) == MARKETING_OPT_OUT_CODE if first else False
    return DeliveryEvent(
        provider=PROVIDER,
        event_id=f"{wamid}:{status}",
        provider_message_id=wamid or None,
        event_type=STATUS_MAP.get(status, EventType.UNKNOWN),
        occurred_at=from_unix(item.get("timestamp")),
        recipient=_wa(item.get("recipient_id")),
        channel=Channel.WHATSAPP,
        error=error_of(first.get("code"), detail or first.get("title")) if first else None,
        opt_out=OptOut.MARKETING_STOP if marketing_stop else None,
        raw=item,
    )


def _inbound(item: dict[str, Any], to: str | None) -> InboundMessage | None:
    sender = _wa(item.get("from"))
    if sender is None:
        return None
    kind = item.get("type")
    text: str | None = None
    if kind == "text":
        text = (item.get("text") or {}).get("body")
    elif kind == "button":  # a quick-reply button of a template ("STOP promotions")
        text = (item.get("button") or {}).get("text")
    elif kind == "interactive":
        reply = item.get("interactive") or {}
        text = (reply.get("button_reply") or reply.get("list_reply") or {}).get("title")
    return InboundMessage(
        provider=PROVIDER,
        event_id=str(item.get("id") or ""),
        channel=Channel.WHATSAPP,
        sender=sender,
        to=to,
        text=text if isinstance(text, str) else None,
        occurred_at=from_unix(item.get("timestamp")),
        raw=item,
    )
