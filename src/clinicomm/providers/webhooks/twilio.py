"""Twilio status callbacks and inbound messages (SMS and WhatsApp), form-encoded POSTs.

* Signature: `X-Twilio-Signature` = base64(HMAC-SHA1(AuthToken, URL + each POST parameter's
  name and value, sorted by name, no separators)).
  https://www.twilio.com/docs/usage/webhooks/webhooks-security
  When a Webhook Rule matched, `X-Twilio-Webhooks-Signature-Settings: key=…,algorithm=
  HMAC_SHA256` says the same string was signed with HMAC-SHA256 and the rule's SharedKey
  (`webhookSharedKey`; the auth token when none is set).
  https://raw.githubusercontent.com/twilio/twilio-node/HEAD/examples/WebhookSignatureValidation.md
  Like Twilio's own validators we also try the URL with the default port added or removed,
  since proxies differ on it. JSON-bodied webhooks (`bodySHA256`) are not used for Messaging.
* Status callback fields: `MessageSid`, `MessageStatus`, `ErrorCode`, `From`, `To`
  (`whatsapp:+1…` on WhatsApp). No timestamp: `occurred_at` is None (arrival time is used).
  An inbound message has `SmsStatus=received` (or no `MessageStatus`) and `Body`.
* Advanced Opt-Out: when the Messaging Service matched one of its opt-out, opt-in or help
  keywords (custom ones too, e.g. "BAJA"), the inbound request carries `OptOutType` =
  `STOP`, `START` or `HELP`; that decision wins over reading the body. HELP changes
  nothing. https://www.twilio.com/docs/messaging/tutorials/advanced-opt-out
* `ErrorCode` 30005 (unknown destination handset) and 30006 (landline or unreachable
  carrier) on an SMS mean the number cannot receive texts: a permanent bounce, the number
  is suppressed for SMS. https://www.twilio.com/docs/api/errors/30005 and /30006
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

from clinicomm.providers.base import Channel
from clinicomm.providers.shared.credentials import TwilioCredentials
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
    phone_or_none,
    require_secret,
)

PROVIDER = "twilio"
#: 21610: the number replied STOP to this sender (PROVIDER-FACTS §8 item 18).
OPT_OUT_CODES = frozenset({"21610"})
#: The number cannot receive SMS at all (unknown handset, landline): a hard bounce.
SMS_BOUNCE_CODES = frozenset({"30005", "30006"})
#: Advanced Opt-Out's `OptOutType` → our keyword decision ("none": changes nothing).
OPT_OUT_TYPES = {"STOP": "stop", "START": "start", "HELP": "none"}
#: Twilio expects TwiML in the answer to an inbound message: an empty response sends nothing.
ANSWER = ('<?xml version="1.0" encoding="UTF-8"?><Response></Response>', "text/xml")
CREDENTIALS = TwilioCredentials
SIGNATURE_HEADER = "X-Twilio-Signature"
SETTINGS_HEADER = "X-Twilio-Webhooks-Signature-Settings"

#: https://www.twilio.com/docs/messaging/api/message-resource#message-status-values
STATUS_MAP = {
    "accepted": EventType.ACCEPTED,
    "scheduled": EventType.ACCEPTED,
    "queued": EventType.ACCEPTED,
    "sending": EventType.ACCEPTED,
    "sent": EventType.SENT,
    "delivered": EventType.DELIVERED,
    "read": EventType.READ,
    "undelivered": EventType.FAILED,
    "failed": EventType.FAILED,
    "canceled": EventType.FAILED,
}


def signature(
    url: str, params: Iterable[tuple[str, str]], key: str, *, sha256: bool = False
) -> str:
    """Twilio's signature of a request: base64 HMAC over URL + sorted name/value pairs."""
    data = url + "".join(name + value for name, value in sorted(params))
    digest = hashlib.sha256 if sha256 else hashlib.sha1
    return base64.b64encode(hmac.new(key.encode(), data.encode(), digest).digest()).decode()


def _url_variants(url: str) -> list[str]:
    """The URL as given, and with its default port toggled (Twilio's validators do the same)."""
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    host = parts.hostname or ""
    if parts.port is not None and parts.port == default:
        other = parts._replace(netloc=host)
    elif parts.port is None and default is not None:
        other = parts._replace(netloc=f"{host}:{default}")
    else:
        return [url]
    return [url, urlunsplit(other)]


async def verify(
    request: WebhookRequest,
    credentials: TwilioCredentials,
    context: WebhookContext | None = None,
) -> None:
    """Raise `WebhookAuthError` unless `X-Twilio-Signature` matches the URL and the form;
    `ForeignEventError` when the event's `AccountSid` is not the clinic's `accountSid`."""
    given = request.header(SIGNATURE_HEADER)
    if not given:
        raise WebhookAuthError(f"missing {SIGNATURE_HEADER}")
    settings = (request.header(SETTINGS_HEADER) or "").upper()
    sha256 = "HMAC_SHA256" in settings
    if sha256 and credentials.webhook_shared_key is not None:
        key = require_secret(credentials.webhook_shared_key, "webhookSharedKey")
    else:
        key = require_secret(credentials.auth_token, "authToken")
    params = request.form if request.method == "POST" else ()
    for url in _url_variants(request.url):
        if constant_time_equal(signature(url, params, key, sha256=sha256), given.strip()):
            break
    else:
        raise WebhookAuthError("signature does not match the URL and parameters")
    # An auth token or shared key may serve several accounts (subaccounts of one project):
    # the event's AccountSid must be the clinic's.
    account = (request.form_dict() or dict(request.query)).get("AccountSid")
    if account is not None and account != credentials.account_sid:
        raise ForeignEventError("AccountSid is not the clinic's account")


def parse(request: WebhookRequest) -> list[WebhookEvent]:
    """One status event, or one inbound message, per callback."""
    form = request.form_dict() or dict(request.query)
    sid = form.get("MessageSid") or form.get("SmsSid") or form.get("SmsMessageSid")
    if not sid:
        raise WebhookPayloadError("not a Twilio messaging callback (no MessageSid)")
    status = form.get("MessageStatus") or form.get("SmsStatus") or ""
    channel = (
        Channel.WHATSAPP
        if form.get("To", "").startswith("whatsapp:")
        or form.get("From", "").startswith("whatsapp:")
        else Channel.SMS
    )
    if status == "received" or (not form.get("MessageStatus") and "Body" in form):
        sender = phone_or_none(form.get("From"))
        if sender is None:
            raise WebhookPayloadError("inbound message without a usable From")
        return [
            InboundMessage(
                provider=PROVIDER,
                event_id=sid,
                channel=channel,
                sender=sender,
                to=form.get("To"),
                text=form.get("Body"),
                occurred_at=None,
                raw=dict(form),
                keyword=OPT_OUT_TYPES.get(form.get("OptOutType", "").strip().upper()),
            )
        ]
    code = form.get("ErrorCode")
    kind = STATUS_MAP.get(status, EventType.UNKNOWN)
    unreachable = channel is Channel.SMS and code in SMS_BOUNCE_CODES and kind is EventType.FAILED
    return [
        DeliveryEvent(
            provider=PROVIDER,
            event_id=f"{sid}:{status}",
            provider_message_id=sid,
            event_type=kind,
            occurred_at=None,
            recipient=phone_or_none(form.get("To")),
            channel=channel,
            error=error_of(code, form.get("ErrorMessage")),
            bounce_permanent=True if unreachable else None,
            opt_out=OptOut.BOUNCE if unreachable else None,
            raw=dict(form),
        )
    ]
