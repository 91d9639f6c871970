"""MessageBird webhooks: Conversations (WhatsApp) events and SMS status reports.

* Signature: the current scheme, `MessageBird-Signature-JWT`, an HMAC JWT (HS256; HS384 and
  HS512 accepted as the official validators do) signed with the signing key, issuer
  `MessageBird`, valid between `nbf` and `exp`, with `url_hash` = hex SHA-256 of the full URL
  and `payload_hash` = hex SHA-256 of the body (present exactly when there is a body).
  https://developers.messagebird.com/docs/verify-http-requests
  The legacy `MessageBird-Signature` + `MessageBird-Request-Timestamp` HMAC is not accepted:
  it does not cover the URL's host and MessageBird replaced it with the JWT.
* Conversations: `{"type": "message.created"|"message.updated", "message": {"id",
  "platform", "to", "from", "direction": sent|received, "status", "content": {"text"},
  "createdDatetime", "updatedDatetime"}}`.
* SMS status report: a GET (or form POST) with `id`, `recipient`, `status`
  (delivered|delivery_failed|expired|sent|buffered), `statusDatetime`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jwt

from clinicomm.providers.base import Channel
from clinicomm.providers.shared.credentials import MessageBirdCredentials
from clinicomm.providers.webhooks.base import (
    DeliveryEvent,
    EventType,
    InboundMessage,
    WebhookAuthError,
    WebhookContext,
    WebhookEvent,
    WebhookPayloadError,
    WebhookRequest,
    check_fresh,
    constant_time_equal,
    error_of,
    from_iso,
    from_unix,
    phone_or_none,
    require_secret,
)

PROVIDER = "messagebird"
CREDENTIALS = MessageBirdCredentials
SIGNATURE_HEADER = "MessageBird-Signature-JWT"
_LEEWAY = 1.0  # seconds of clock skew allowed on nbf/exp

STATUS_MAP = {
    "accepted": EventType.ACCEPTED,
    "pending": EventType.ACCEPTED,
    "buffered": EventType.ACCEPTED,
    "sent": EventType.SENT,
    "transmitted": EventType.SENT,
    "delivered": EventType.DELIVERED,
    "read": EventType.READ,
    "failed": EventType.FAILED,
    "rejected": EventType.FAILED,
    "delivery_failed": EventType.FAILED,
    "expired": EventType.FAILED,
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def verify(
    request: WebhookRequest,
    credentials: MessageBirdCredentials,
    context: WebhookContext | None = None,
) -> None:
    """Raise `WebhookAuthError` unless the JWT is valid now and hashes this URL and body."""
    key = require_secret(credentials.signing_key, "signingKey")
    token = request.header(SIGNATURE_HEADER)
    if not token:
        raise WebhookAuthError(f"missing {SIGNATURE_HEADER}")
    try:
        # Time claims are checked below against the context's clock (testable, one source).
        claims = jwt.decode(
            token.strip(),
            key,
            algorithms=["HS256", "HS384", "HS512"],
            issuer="MessageBird",
            options={
                "require": ["iss", "nbf", "exp", "url_hash"],
                "verify_exp": False,
                "verify_nbf": False,
            },
        )
    except jwt.PyJWTError as exc:
        raise WebhookAuthError(f"JWT rejected: {type(exc).__name__}") from exc
    now = (context or WebhookContext()).now().timestamp()
    if float(claims["nbf"]) > now + _LEEWAY:
        raise WebhookAuthError("JWT is not valid yet (nbf)")
    if float(claims["exp"]) <= now - _LEEWAY:
        raise WebhookAuthError("JWT has expired (exp)")
    check_fresh(from_unix(claims.get("iat", claims["nbf"])), context or WebhookContext(), "JWT iat")
    if not constant_time_equal(_sha256(request.url.encode()), str(claims["url_hash"])):
        raise WebhookAuthError("url_hash does not match the URL")
    payload_hash = claims.get("payload_hash")
    if payload_hash is None:
        if request.body:
            raise WebhookAuthError("a body is present but the JWT has no payload_hash")
    elif not request.body or not constant_time_equal(_sha256(request.body), str(payload_hash)):
        raise WebhookAuthError("payload_hash does not match the body")


def parse(request: WebhookRequest) -> list[WebhookEvent]:
    """A Conversations event (JSON body) or an SMS status report (query or form)."""
    if not request.body or request.form:
        return _sms_report(request.form_dict() or dict(request.query))
    data = request.json()
    message = data.get("message") if isinstance(data, dict) else None
    if not isinstance(message, dict) or not message.get("id"):
        raise WebhookPayloadError("not a MessageBird Conversations webhook (no message.id)")
    channel = Channel.WHATSAPP if message.get("platform") == "whatsapp" else Channel.SMS
    when = from_iso(message.get("updatedDatetime") or message.get("createdDatetime"))
    status = str(message.get("status") or "")
    if message.get("direction") == "received":
        sender = phone_or_none(message.get("from"))
        if sender is None:
            raise WebhookPayloadError("inbound message without a usable from")
        text = (message.get("content") or {}).get("text")
        return [
            InboundMessage(
                provider=PROVIDER,
                event_id=str(message["id"]),
                channel=channel,
                sender=sender,
                to=str(message.get("to") or "") or None,
                text=text if isinstance(text, str) else None,
                occurred_at=when,
                raw=data,
            )
        ]
    error = message.get("error") if isinstance(message.get("error"), dict) else None
    return [
        DeliveryEvent(
            provider=PROVIDER,
            event_id=f"{message['id']}:{status}",
            provider_message_id=str(message["id"]),
            event_type=STATUS_MAP.get(status, EventType.UNKNOWN),
            occurred_at=when,
            recipient=phone_or_none(message.get("to")),
            channel=channel,
            error=error_of(error.get("code"), error.get("description")) if error else None,
            raw=data,
        )
    ]


def _sms_report(params: dict[str, Any]) -> list[WebhookEvent]:
    if not params.get("id") or not params.get("status"):
        raise WebhookPayloadError("not a MessageBird status report (no id/status)")
    status = str(params["status"])
    return [
        DeliveryEvent(
            provider=PROVIDER,
            event_id=f"{params['id']}:{status}",
            provider_message_id=str(params["id"]),
            event_type=STATUS_MAP.get(status, EventType.UNKNOWN),
            occurred_at=from_iso(params.get("statusDatetime")),
            recipient=phone_or_none(params.get("recipient")),
            channel=Channel.SMS,
            error=error_of(params.get("statusErrorCode"), params.get("statusReason")),
            raw=dict(params),
        )
    ]
