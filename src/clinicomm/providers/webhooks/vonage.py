"""Vonage Messages API webhooks (status and inbound, SMS and WhatsApp), signed JWTs.

* `Authorization: Bearer <JWT>` signed HS256 with the account's signature secret; its
  `payload_hash` claim, when present, is the hex SHA-256 of the raw body.
  https://developer.vonage.com/en/messages/concepts/signed-webhooks
* Status: `{"message_uuid", "to", "from", "timestamp", "status": submitted|delivered|read|
  rejected|undeliverable, "error": {"type", "title", "detail"}, "channel"}`.
  Inbound: `{"message_uuid", "to", "from", "timestamp", "channel", "message_type", "text"}`.
  Numbers are digits without `+`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jwt

from clinicomm.providers.base import Channel
from clinicomm.providers.shared.credentials import VonageCredentials
from clinicomm.providers.webhooks.base import (
    DeliveryEvent,
    EventType,
    ForeignEventError,
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

PROVIDER = "vonage"
CREDENTIALS = VonageCredentials

STATUS_MAP = {
    "submitted": EventType.SENT,
    "delivered": EventType.DELIVERED,
    "read": EventType.READ,
    "rejected": EventType.FAILED,
    "undeliverable": EventType.FAILED,
}
_CHANNELS = {"sms": Channel.SMS, "whatsapp": Channel.WHATSAPP}


async def verify(
    request: WebhookRequest,
    credentials: VonageCredentials,
    context: WebhookContext | None = None,
) -> None:
    """Raise `WebhookAuthError` unless the bearer JWT is signed with the signature secret,
    its `iat` is fresh (`check_fresh`) and its `payload_hash` (required) is the SHA-256 of
    the body; `ForeignEventError` when its `api_key` or `application_id` is not the clinic's."""
    secret = require_secret(credentials.signature_secret, "signatureSecret")
    header = request.header("Authorization") or ""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise WebhookAuthError("missing bearer JWT")
    try:
        claims = jwt.decode(
            token.strip(),
            secret,
            algorithms=["HS256"],
            options={"require": ["iat"], "verify_iat": False},  # check_fresh below
        )
    except jwt.PyJWTError as exc:
        raise WebhookAuthError(f"JWT rejected: {type(exc).__name__}") from exc
    expected = claims.get("payload_hash")
    if not isinstance(expected, str) or not expected:
        raise WebhookAuthError("JWT has no payload_hash")
    actual = hashlib.sha256(request.body).hexdigest()
    if not constant_time_equal(actual, expected.lower()):
        raise WebhookAuthError("payload_hash does not match the body")
    ctx = context or WebhookContext()
    check_fresh(from_unix(claims.get("iat")), ctx, "JWT iat")
    api_key = claims.get("api_key")
    if credentials.api_key and api_key is not None and str(api_key) != credentials.api_key:
        raise ForeignEventError("JWT api_key is not the clinic's")
    application = claims.get("application_id")
    if (
        credentials.application_id
        and application is not None
        and str(application) != credentials.application_id
    ):
        raise ForeignEventError("JWT application_id is not the clinic's")


def parse(request: WebhookRequest) -> list[WebhookEvent]:
    """One status event or one inbound message per POST."""
    item = request.json()
    if not isinstance(item, dict) or not item.get("message_uuid"):
        raise WebhookPayloadError("not a Vonage Messages webhook (no message_uuid)")
    channel = _CHANNELS.get(str(item.get("channel") or ""), Channel.SMS)
    if "status" not in item:
        sender = phone_or_none(item.get("from"))
        if sender is None:
            raise WebhookPayloadError("inbound message without a usable from")
        text = item.get("text")
        return [
            InboundMessage(
                provider=PROVIDER,
                event_id=str(item["message_uuid"]),
                channel=channel,
                sender=sender,
                to=str(item.get("to") or "") or None,
                text=text if isinstance(text, str) else None,
                occurred_at=from_iso(item.get("timestamp")),
                raw=item,
            )
        ]
    return [_status(item, channel)]


def _status(item: dict[str, Any], channel: Channel) -> DeliveryEvent:
    status = str(item.get("status") or "")
    err: dict[str, Any] = item["error"] if isinstance(item.get("error"), dict) else {}
    code = err.get("title") or (str(err.get("type") or "").rsplit("/", 1)[-1] or None)
    return DeliveryEvent(
        provider=PROVIDER,
        event_id=f"{item['message_uuid']}:{status}:{item.get('timestamp')}",
        provider_message_id=str(item["message_uuid"]),
        event_type=STATUS_MAP.get(status, EventType.UNKNOWN),
        occurred_at=from_iso(item.get("timestamp")),
        recipient=phone_or_none(item.get("to")),
        channel=channel,
        error=error_of(code, err.get("detail")) if err else None,
        raw=item,
    )
